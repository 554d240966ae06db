"""open_clip's timm SigLIP ViT towers (vision_cfg timm_model_name vit_*_siglip_*, timm_pool "map", timm_proj "none")
with open_clip's SigLIP text tower (no causal mask, last-position pooling, a biased Linear projection), read as a
"siglip" model: parity with open_clip, the SiglipModel folder it converts to, its preprocessing and SentencePiece
tokenizer (hf_tokenizer_name), training, the CLI, and what stays refused.

open_clip passes timm only the model name, so the references are tiny timm VisionTransformers built under test names
(timm's create_model patched, dualenc's name table given the same architectures). Every real name of the table is
checked against timm's own architecture on the meta device (shapes only)."""

import json
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import open_clip_towers as towers
from conftest import _transformers, max_diff
from safetensors.torch import save_file

import dualenc
from dualenc.formats import open_clip_timm
from dualenc.towers import siglip
from dualenc.towers.siglip import SiglipVisionConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("open_clip_timm_vit")

IMAGE, PATCH, WIDTH, LENGTH, VOCAB = 32, 16, 32, 16, 40
# name -> the SIGLIP_VIT row (patch, width, depth, heads, mlp ratio, tanh GELU, image size), for timm and dualenc
TINY = {"vit_test_siglip": (PATCH, WIDTH, 1, 2, 2.0, True, IMAGE),
        "vit_test_siglip_gelu": (8, WIDTH, 2, 4, 1.5, False, IMAGE)}
VISION = {"image_size": IMAGE, "timm_model_name": "vit_test_siglip", "timm_model_pretrained": False,
          "timm_pool": "map", "timm_proj": "none"}
TEXT = {"context_length": LENGTH, "vocab_size": VOCAB, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": WIDTH, "heads": 2, "layers": 1, "mlp_ratio": 2.0,
        "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
        "act_kwargs": {"approximate": "tanh"}}
PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
LABELS = ["red", "green", "blue"]
WORDS = "a photo of the cat dog bird red green blue house car tree river city night day people".split()


@pytest.fixture(scope="module", autouse=True)
def tiny_names():
    """The test names in timm (create_model) and in dualenc's table, for this module's tests."""
    with towers.tiny_timm_names(open_clip_timm.SIGLIP_VIT, TINY, siglip_trunk):
        yield


def siglip_trunk(row, **kw):
    from timm.models.vision_transformer import VisionTransformer

    patch, width, depth, heads, ratio, tanh, size = row
    return VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             mlp_ratio=ratio, class_token=False, act_layer="gelu_tanh" if tanh else None, **kw)


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A small SentencePiece model with SigLIP's special ids (<pad> 0, </s> 1, <unk> 2) and its tokenizer files as
    the hub's SigLIP folders hold them (model_input_names: input_ids alone)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spiece")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(path / "spiece"), vocab_size=VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, minloglevel=2)
    token = dict(lstrip=True, normalized=False, rstrip=True, single_word=False, special=True)
    config = {"added_tokens_decoder": {"1": {"content": "</s>", **token}, "2": {"content": "<unk>", **token}},
              "additional_special_tokens": [], "do_lower_case": True, "eos_token": "</s>",
              "model_input_names": ["input_ids"], "model_max_length": 64, "pad_token": "</s>",
              "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {k: {"content": config[k], **token} for k in ("eos_token", "pad_token", "unk_token")}))
    return path


def model_cfg(vision=None, text=None, embed_dim=WIDTH):
    return {"embed_dim": embed_dim, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {**VISION, **(vision or {})}, "text_cfg": {**TEXT, **(text or {})}}


def is_scale(name, p):
    return p.ndim == 1 and "norm" in name and name.endswith("weight")


def build(cfg, seed=0):
    return towers.build(cfg, seed, scale=is_scale)


def save(model, cfg, path, spiece_dir):
    return towers.save(model, cfg, path, preprocess=PREPROCESS, files=spiece_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spiece_dir):
    cfg = model_cfg()
    model = build(cfg)
    return towers.reference(model, save(model, cfg, tmp_path_factory.mktemp("siglip_vit") / "open_clip", spiece_dir))


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference["path"])


def open_clip_outputs(model, pixels, ids):
    """open_clip's outputs with its image and text features normalised (SigLIP's embeddings)."""
    out = towers.open_clip_outputs(model, pixels, ids)
    return dict(out, image=out["image"] / out["image"].norm(dim=-1, keepdim=True),
                text=out["text"] / out["text"].norm(dim=-1, keepdim=True))


def test_config_processing_and_parity_with_open_clip(reference, loaded):
    config, params = loaded
    v, t = config.vision, config.text
    assert config.model_type == "siglip" and isinstance(v, SiglipVisionConfig)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size) == (
        WIDTH, 64, 1, 2, PATCH)
    assert v.hidden_act == t.hidden_act == "gelu_pytorch_tanh" and v.layer_norm_eps == t.layer_norm_eps == 1e-6
    assert (t.max_position_embeddings, t.projection_size, config.logit_bias_init_value) == (LENGTH, WIDTH, -10)
    processor = dualenc.Processor.from_pretrained(reference["path"])
    texts = [f"a photo of {label}" for label in LABELS] + ["A Red, red HOUSE!", "a tree " * 20]
    batch = processor(text=texts, images=reference["photos"])
    assert max_diff(batch["pixel_values"], reference["pixels"]) < 1e-5  # real photos, open_clip's own transform
    np.testing.assert_array_equal(batch["input_ids"], reference["tokenizer"](texts).numpy())
    assert "attention_mask" not in batch or np.all(np.asarray(batch["attention_mask"]) == 1)
    ids, pixels = batch["input_ids"], reference["pixels"]
    ref = open_clip_outputs(reference["model"], pixels, ids)
    run = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "dtype"))
    out = run(params, config, input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    diffs = dict(image=max_diff(out.image_embeds, ref["image"]), text=max_diff(out.text_embeds, ref["text"]),
                 logits=max_diff(out.logits_per_image, ref["logits"]),
                 trunk=max_diff(out.vision_outputs.last_hidden_state, ref["trunk"]))
    bf16 = run(params, config, input_ids=ids, pixel_values=pixels, dtype=jnp.bfloat16)
    print(f"max |dualenc - open_clip| float32 {diffs}; bfloat16 logits "
          f"{max_diff(bf16.logits_per_image, ref['logits']):.3g}")
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_exact_gelu_and_two_layers_match_open_clip(tmp_path, spiece_dir):
    """SigLIP 1's settings (nn.GELU in timm and in the text tower: no act_kwargs), 2 layers, 8 px patches."""
    cfg = model_cfg({"timm_model_name": "vit_test_siglip_gelu"}, {"layers": 2, "act_kwargs": None})
    model = build(cfg, seed=1)
    config, params = dualenc.load_pretrained(save(model, cfg, tmp_path / "gelu", spiece_dir))
    assert config.vision.hidden_act == config.text.hidden_act == "gelu" and config.vision.num_hidden_layers == 2
    rng = np.random.default_rng(1)
    ids, pixels = rng.integers(0, VOCAB, (2, LENGTH)), rng.standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    ref = open_clip_outputs(model, pixels, ids)
    out = jax.jit(dualenc.apply)(params, config, input_ids=ids, pixel_values=pixels)
    assert max_diff(out.image_embeds, ref["image"]) < 1e-5 and max_diff(out.text_embeds, ref["text"]) < 1e-5
    assert max_diff(out.logits_per_image, ref["logits"]) < 1e-5


def test_saved_folder_loads_back_and_into_transformers(reference, loaded, tmp_path):
    """save_pretrained writes a transformers SiglipModel folder: dualenc reads it back equal, transformers loads it
    with open_clip's logits."""
    config, params = loaded
    dualenc.save_pretrained(tmp_path / "hf", config, params)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["SiglipModel"] and written["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    back_config, back = dualenc.load_pretrained(tmp_path / "hf")
    assert back_config.vision == config.vision and back_config.text == config.text
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    tf = _transformers()
    hf, info = tf.SiglipModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = reference["tokenizer"](LABELS).numpy()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(reference["pixels"]))
    ref = open_clip_outputs(reference["model"], reference["pixels"], ids)
    assert max_diff(theirs.logits_per_image, ref["logits"]) < 1e-5


def test_train_step_and_zero_shot_command(reference, loaded, tmp_path, capsys, monkeypatch):
    from dualenc import train

    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")  # in this process: leave jax's settings alone
    config, params = loaded
    ids = reference["tokenizer"](LABELS).numpy()
    batch = dict(input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(reference["pixels"]))
    optimizer = train.default_optimizer(1e-3, total_steps=2, warmup_steps=0)
    state = train.init_state(params, optimizer, seed=0)
    new, metrics = train.make_train_step(config, optimizer, donate=False)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for path in (("embeddings", "patch", "kernel"), ("head", "probe"), ("head", "attention", "in_proj", "kernel")):
        before, after = params["vision"], new.trainable["vision"]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-5, path

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(reference["path"]))
    towers.check_zero_shot_command(reference, folder, LABELS, tmp_path, capsys)


def test_the_name_table_is_timms():
    """Each real name's architecture (on the meta device: shapes only) has the width, depth, heads, MLP width,
    activation, eps and image size dualenc's config for that name declares, and its tensors rename to exactly the
    names of the SiglipVisionModel table."""
    import timm

    for name, (_, width, *_, size) in open_clip_timm.SIGLIP_VIT.items():
        if name in TINY:
            continue
        with torch.device("meta"):
            trunk = timm.create_model(name, num_classes=0, global_pool="map")
        config = open_clip_timm.vision_config({"timm_model_name": name, "timm_pool": "map", "timm_proj": "none",
                                               "image_size": size}, width, "test")
        act = trunk.blocks[0].mlp.act
        tanh = type(act).__name__ == "GELUTanh" or getattr(act, "approximate", "none") == "tanh"
        assert (config.hidden_act == "gelu_pytorch_tanh") == tanh, name
        assert (trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].attn.num_heads,
                trunk.blocks[0].mlp.fc1.out_features, trunk.patch_embed.patch_size[0], trunk.norm.eps,
                trunk.patch_embed.img_size) == (
            config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.patch_size, config.layer_norm_eps, (size, size)), name
        tensors = {"visual.trunk." + k: np.broadcast_to(np.float32(0), v.shape) for k, v in trunk.state_dict().items()}
        renamed = {re.sub(r"\.layers\.\d+\.", ".layers.{i}.", open_clip_timm.transformers_name(k, v, name, "t")[0])
                   for k, v in open_clip_timm.prepare(tensors, name, "test").items()}
        assert renamed == {"vision_model." + e.hf for e in siglip.table(config)}, name


@pytest.mark.parametrize("vision,text,embed_dim,field", [
    (dict(timm_model_name="vit_base_patch16_siglip_gap_224"), None, WIDTH, "timm_model_name"),
    (dict(timm_model_name="vit_large_patch14_clip_224"), None, WIDTH, "timm_model_name"),
    (dict(timm_pool="avg"), None, WIDTH, "timm_pool"),
    (dict(timm_pool=""), None, WIDTH, "timm_pool"),
    (dict(timm_proj="linear"), None, WIDTH, "timm_proj"),
    (dict(timm_drop_path=0.1), None, WIDTH, "timm_drop_path"),
    (dict(image_size=64), None, WIDTH, "image_size"),
    (None, None, 16, "embed_dim"),
    (None, dict(no_causal_mask=False), WIDTH, "no_causal_mask"),
    (None, dict(pool_type="argmax"), WIDTH, "pool_type"),
    (None, dict(proj_bias=False), WIDTH, "proj_"),  # proj_type "none" reads (tests/test_open_clip_options.py)
    (None, dict(act_kwargs={"approximate": "none"}), WIDTH, "act_kwargs"),
])
def test_unimplemented_configs_are_refused(vision, text, embed_dim, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(vision, text, embed_dim)}))
    with pytest.raises(dualenc.ConfigError, match=field):
        dualenc.load_pretrained(tmp_path)


def test_missing_and_unknown_tensors_are_refused(reference, tmp_path):
    tensors = {k: v.contiguous() for k, v in reference["model"].state_dict().items()}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    tensors["visual.trunk.cls_token"] = torch.ones(1, 1, WIDTH)
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="cls_token"):
        dualenc.load_pretrained(tmp_path)
    del tensors["visual.trunk.cls_token"], tensors["visual.trunk.attn_pool.kv.bias"]
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="attn_pool.q.bias|in_proj_bias"):
        dualenc.load_pretrained(tmp_path)
