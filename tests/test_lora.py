"""LoRA adapters (dualenc.lora) and PEFT's adapter directories (dualenc.formats.peft), against peft's PyTorch
PeftModel on transformers' CLIPModel and SiglipModel."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dualenc
from conftest import TINY, _transformers, max_diff, pixels, randomize
from dualenc import lora
from dualenc.formats import peft as peft_format
from dualenc.errors import CheckpointError, ConfigError, InputError
from dualenc.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft, save_peft

VOCAB, LENGTH = 99, 12
apply = jax.jit(dualenc.apply)


def hf_model(kind):
    tf = _transformers()
    text = {**TINY, "vocab_size": VOCAB, "max_position_embeddings": LENGTH, "eos_token_id": 2, "bos_token_id": 3,
            "pad_token_id": 1}
    vision = {**TINY, "image_size": 30, "patch_size": 10}
    if kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = tf.SiglipModel(tf.SiglipConfig(text_config={**text, "bos_token_id": None}, vision_config=vision))
    model = randomize(model.eval(), seed=3)
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    return model


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB - 1, (3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    for row in range(3):
        n = LENGTH - 3 * row
        ids[row, n - 1], ids[row, n:], mask[row, n:] = 2, 1, 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


def torch_out(model, batch):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()})


def close(ours, ref):
    for a, b in ((ours.logits_per_image, ref.logits_per_image), (ours.text_embeds, ref.text_embeds),
                 (ours.image_embeds, ref.image_embeds)):
        assert max_diff(a, b) < 1e-5


@pytest.fixture(scope="module", params=["clip", "siglip"])
def saved(request, tmp_path_factory):
    """(kind, transformers model directory, dualenc config, params)."""
    path = tmp_path_factory.mktemp(request.param) / "model"
    hf_model(request.param).save_pretrained(path)
    config, params = dualenc.load_pretrained(path)
    return request.param, path, config, params


def reload(kind, path):
    tf = _transformers()
    model = (tf.CLIPModel if kind == "clip" else tf.SiglipModel).from_pretrained(path).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    return model


def randomized(adapters, seed):
    """The adapters with b drawn too (init's zero b would hide a transposed or misnamed B)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x if path[-1].key == "a" else 0.05 * jax.random.normal(k, x.shape) for (path, x), k in zip(leaves, keys)])


# The LoRA each kind is tested with: CLIP's target names pick out its modules exactly; SigLIP's head has an
# out_proj of its own and one tower only is adapted, so its adapter names the modules by a regular expression.
LORAS = {"clip": lora.LoRA(rank=4, alpha=6, targets="both"),
         "siglip": lora.LoRA(rank=2, alpha=3.5, targets="attention", towers="vision")}


def test_peft_loads_what_dualenc_saves(saved, tmp_path):
    from peft import PeftModel

    kind, path, config, params = saved
    spec = LORAS[kind]
    adapters = randomized(lora.init(jax.random.key(1), params, config, spec), seed=2)
    save_peft(tmp_path / "adapter", adapters, config, spec)
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["r"] == spec.rank and written["lora_alpha"] == spec.alpha and written["peft_type"] == "LORA"
    if kind == "clip":
        assert written["target_modules"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    else:
        assert written["target_modules"].startswith("vision_model") and "head" not in written["target_modules"]
    merged = jax.jit(lora.merge)(params, adapters, spec)
    batch = inputs()
    ours = apply(merged, config, **batch)
    peft_model = PeftModel.from_pretrained(reload(kind, path), tmp_path / "adapter").eval()
    close(ours, torch_out(peft_model, batch))
    assert max_diff(ours.logits_per_image, apply(params, config, **batch).logits_per_image) > 1e-3  # it adapts

    back, spec_back = load_peft(tmp_path / "adapter", params, config)
    assert spec_back == spec
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(adapters)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, back, adapters)))
    back, _ = load_peft(tmp_path / "adapter", dualenc.stack_layers(params), config)  # in the params' layout
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, dualenc.stack_layers(adapters))

    # The merged model is an ordinary checkpoint: save_pretrained, read by transformers without peft.
    dualenc.save_pretrained(tmp_path / "merged", config, merged)
    close(ours, torch_out(reload(kind, tmp_path / "merged"), batch))


def test_dualenc_loads_what_peft_saves(saved, tmp_path):
    from peft import LoraConfig, get_peft_model

    kind, path, config, params = saved
    names = ["q_proj", "v_proj", "fc2"] if kind == "clip" else ["q_proj", "k_proj", "v_proj"]
    peft_model = get_peft_model(reload(kind, path), LoraConfig(r=3, lora_alpha=5, target_modules=names))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    adapters, spec = load_peft(tmp_path / "adapter", params, config)
    parts = ("query", "value", "fc2") if kind == "clip" else ("query", "key", "value")
    assert spec == lora.LoRA(rank=3, alpha=5, targets=parts)
    batch = inputs()
    close(apply(lora.merge(params, adapters, spec), config, **batch), torch_out(peft_model, batch))


def test_load_peft_refuses_what_dualenc_cannot_express(saved, tmp_path, monkeypatch):
    kind, path, config, params = saved
    monkeypatch.setattr(peft_format, "REGEX_SECONDS", 0.2)
    spec = lora.LoRA(rank=2, targets="mlp")
    folder = tmp_path / "adapter"
    save_peft(folder, lora.init(jax.random.key(0), params, config, spec), config, spec)
    original = json.loads((folder / ADAPTER_CONFIG).read_text())
    head = "vision_model.head.mlp.fc1" if kind == "siglip" else None
    cases = [({"use_dora": True}, "'use_dora'"), ({"init_lora_weights": "pissa"}, "init_lora_weights"),
             ({"rank_pattern": {"fc1": 4}}, "rank_pattern"),
             ({"layers_to_transform": [0]}, "layers_to_transform"), ({"r": 0}, "'r'"),
             ({"target_modules": ["embeddings"]}, "matches no module"),
             ({"target_modules": "text_model.encoder.layers.0.mlp.fc1"}, "some layers only"),
             ({"target_modules": ["visual_projection"] if kind == "clip" else ["fc1"]},
              "visual_projection" if kind == "clip" else head),
             ({"target_modules": r"(\w|\.|[a-z])*[^j]"}, "took over 0.2 s"),  # backtracks for ever
             ({"target_modules": "(q_proj"}, "not a valid regular expression")]
    for change, message in cases:
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**original, **change}))
        with pytest.raises(ConfigError, match=message) as caught:
            load_peft(folder, params, config)
        assert str(folder / ADAPTER_CONFIG) in str(caught.value)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**original, "r": 3}))  # the tensors have rank 2
    with pytest.raises(CheckpointError, match=f"{ADAPTER_WEIGHTS}.*wrong shape"):
        load_peft(folder, params, config)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(original))
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    first = sorted(tensors)[0]
    tensors[first.replace("lora_A", "lora_C")] = tensors.pop(first)
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"{ADAPTER_WEIGHTS}: missing 1 tensor\(s\): {first}; unexpected"):
        load_peft(folder, params, config)
    with pytest.raises(ConfigError, match="holds a model"):
        save_peft(path, lora.init(jax.random.key(0), params, config, spec), config, spec)


def tiny_configs():
    text = dict(**TINY, vocab_size=VOCAB, max_position_embeddings=16)
    return {
        "vit-bert": dualenc.DualEncoderConfig(dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                              dualenc.BertConfig(**TINY, vocab_size=VOCAB), projection_dim=8),
        "siglip2": dualenc.DualEncoderConfig(dualenc.Siglip2VisionConfig(**TINY, patch_size=8, num_patches=16),
                                             dualenc.Siglip2TextConfig(**text), projection_dim=32,
                                             model_type="siglip2", logit_bias_init_value=-10.0),
    }


@pytest.mark.parametrize("name", ["vit-bert", "siglip2"])
def test_every_family_in_both_layouts_and_peft_round_trip(name, tmp_path):
    config = tiny_configs()[name]
    spec = lora.LoRA(rank=2, alpha=4, targets=("value", "fc1"))
    params = dualenc.init(jax.random.key(0), config)
    adapters = lora.init(jax.random.key(1), params, config, spec)
    assert len(adapters["text"]["encoder"]) == 2 and set(adapters["text"]["encoder"][0]) == {"attention", "mlp"}
    merged = lora.merge(params, adapters, spec)  # b is zero: the identity
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, merged, params)))
    stacked = dualenc.stack_layers(params)
    same = lora.init(jax.random.key(1), stacked, config, spec)  # the same numbers, stacked
    np.testing.assert_array_equal(same["vision"]["encoder"]["attention"]["value"]["a"][1],
                                  adapters["vision"]["encoder"][1]["attention"]["value"]["a"])
    adapters = randomized(adapters, seed=5)
    per_layer, whole = lora.merge(params, adapters, spec), jax.jit(lora.merge)(stacked, adapters, spec)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                           dualenc.stack_layers(per_layer), whole)
    kernel = params["text"]["encoder"][1]["mlp"]["fc1"]["kernel"]
    ab = adapters["text"]["encoder"][1]["mlp"]["fc1"]
    np.testing.assert_allclose(per_layer["text"]["encoder"][1]["mlp"]["fc1"]["kernel"],
                               kernel + 2.0 * ab["a"] @ ab["b"], atol=1e-6)
    assert np.array_equal(per_layer["text"]["encoder"][1]["mlp"]["fc2"]["kernel"],
                          params["text"]["encoder"][1]["mlp"]["fc2"]["kernel"])
    save_peft(tmp_path / "a", adapters, config, spec)
    back, spec_back = load_peft(tmp_path / "a", stacked, config)
    assert spec_back == spec and isinstance(back["text"]["encoder"], dict)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, dualenc.stack_layers(adapters))


def test_gradients_reach_a_and_b_only():
    config = tiny_configs()["vit-bert"]
    spec = lora.LoRA(rank=2, targets="attention", towers=("text",))
    params = dualenc.init(jax.random.key(0), config)
    ids = np.arange(1, 13).reshape(2, 6) % VOCAB

    def loss(adapters, frozen):
        return jnp.sum(dualenc.get_text_features(lora.merge(frozen, adapters, spec), config, ids) ** 2)

    adapters = lora.init(jax.random.key(1), params, config, spec)
    grad = jax.jit(jax.grad(loss))
    grads = grad(adapters, params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
    layer = grads["text"]["encoder"][0]["attention"]
    assert set(layer) == {"query", "key", "value", "out"} and "vision" not in grads
    # At init b is zero, so a takes no gradient yet (as in LoRA); once b moves, both do.
    assert all(float(jnp.max(jnp.abs(g["b"]))) > 0 and float(jnp.max(jnp.abs(g["a"]))) == 0 for g in layer.values())
    grads = grad(randomized(adapters, seed=6), params)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree_util.tree_leaves(grads))


def test_bad_fields_and_mismatched_adapters_are_refused():
    for kwargs, field in (({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"alpha": -1.0}, "alpha"),
                          ({"targets": "everything"}, "targets"), ({"targets": ("query", "bias")}, "targets"),
                          ({"towers": ("vision", "audio")}, "towers"), ({"towers": ()}, "towers")):
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            lora.LoRA(**kwargs)
    assert lora.LoRA(towers="text").towers == ("text",) and lora.LoRA(targets=["fc1"]).parts == ("fc1",)
    assert hash(lora.LoRA()) == hash(lora.LoRA()) and lora.LoRA(rank=4, alpha=2).scale == 0.5
    config = tiny_configs()["vit-bert"]
    params = dualenc.init(jax.random.key(0), config)
    spec = lora.LoRA(rank=2)
    assert lora.targets(config, spec)[0] == ("vision", "encoder", "attention", "query", "kernel")
    assert len(lora.targets(config, spec)) == 12
    adapters = lora.init(jax.random.key(1), params, config, spec)
    with pytest.raises(InputError, match="rank-3"):
        lora.merge(params, adapters, lora.LoRA(rank=3))
    other = dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=3))
    with pytest.raises(InputError, match="params do not match the config"):
        lora.init(jax.random.key(1), params, other, spec)
