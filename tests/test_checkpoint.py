"""Checkpoints both ways with transformers, every tower layout, strict errors and atomic saves."""

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
from conftest import hf_dual_model, hf_text_config, hf_vision_config, max_diff, pixels, randomize, text_batch
from safetensors.numpy import load_file, save_file

import dualenc



def rewrite(path, rename=lambda k: k, drop=(), add=None, dtype=None):
    """Rewrites model.safetensors in a checkpoint dir with renamed/dropped/added tensors."""
    file = os.path.join(path, "model.safetensors")
    tensors = {rename(k): v for k, v in load_file(file).items() if k not in drop}
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    tensors.update(add or {})
    save_file(tensors, file, metadata={"format": "pt"})


def tree_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: np.array_equal(x, y), a, b)))


@pytest.mark.parametrize("vision,text", [("vit", "bert"), ("clip", "roberta"), ("vit", "roberta")])
def test_dualenc_saves_transformers_loads(vision, text, tmp_path):
    import transformers

    config = dualenc.DualEncoderConfig(
        vision=dualenc.config.tower_config_from_dict(hf_vision_config(vision).to_dict()),
        text=dualenc.config.tower_config_from_dict(hf_text_config(text).to_dict()), projection_dim=16)
    params = dualenc.init(jax.random.key(3), config)
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape), params)
    dualenc.save_pretrained(tmp_path / "ours", config, params)
    model, info = transformers.VisionTextDualEncoderModel.from_pretrained(tmp_path / "ours",
                                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = text_batch(config.text)
    px = pixels(2)
    with torch.no_grad():
        ref = model.eval()(**{k: torch.tensor(v) for k, v in batch.items()}, pixel_values=torch.tensor(px))
    out = dualenc.apply(params, config, **batch, pixel_values=px)
    assert max_diff(out.logits_per_image, ref.logits_per_image) <= 1e-4
    assert max_diff(out.image_embeds, ref.image_embeds) <= 1e-5
    config2, params2 = dualenc.load_pretrained(tmp_path / "ours")
    assert config2 == config
    assert isinstance(params2["text"]["encoder"], tuple)  # the per-layer layout, as init's
    for a, b in zip(params2["text"]["encoder"], params["text"]["encoder"]):
        np.testing.assert_allclose(a["mlp"]["fc1"]["kernel"], b["mlp"]["fc1"]["kernel"], rtol=0, atol=0)
    _, stacked = dualenc.load_pretrained(tmp_path / "ours", stacked=True)
    assert tree_equal(stacked, dualenc.stack_layers(params2))


def test_transformers_4x_clip_layout_and_half_precision(hf_dir):
    model = hf_dual_model("clip", "bert", seed=2)
    path = hf_dir(model)
    _, params = dualenc.load_pretrained(path)
    rewrite(path, rename=lambda k: k.replace("vision_model.", "vision_model.vision_model.", 1))
    _, params_4x = dualenc.load_pretrained(path)
    assert tree_equal(params, params_4x)
    for dtype in (np.float16, __import__("ml_dtypes").bfloat16):
        half = hf_dir(model)
        rewrite(half, dtype=dtype)
        _, p = dualenc.load_pretrained(half)
        leaf = p["vision"]["encoder"][0]["mlp"]["fc1"]["kernel"]
        assert leaf.dtype == np.float32
        assert 0 < max_diff(leaf, params["vision"]["encoder"][0]["mlp"]["fc1"]["kernel"]) < 2e-3


def test_sharded_checkpoint(hf_dir, tmp_path):
    model = hf_dual_model("vit", "bert", seed=4)
    path = str(tmp_path / "sharded")
    model.save_pretrained(path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    _, sharded = dualenc.load_pretrained(path)
    _, single = dualenc.load_pretrained(hf_dir(model))
    assert tree_equal(sharded, single)


def tower_reference(module, kind, **inputs):
    with torch.no_grad():
        return module.eval()(**{k: torch.tensor(v) for k, v in inputs.items()})


@pytest.mark.parametrize("source", ["ViTModel", "ViTForImageClassification", "CLIPVisionModel", "CLIPVisionModel4x",
                                    "CLIPModel"])
def test_vision_towers_from_single_checkpoints(source, tmp_path):
    import transformers

    kind = "vit" if source.startswith("ViT") else "clip"
    vc = hf_vision_config(kind)
    module = {
        "ViTModel": lambda: transformers.ViTModel(vc),
        "ViTForImageClassification": lambda: transformers.ViTForImageClassification(vc),
        "CLIPVisionModel": lambda: transformers.CLIPVisionModel(vc),
        "CLIPVisionModel4x": lambda: transformers.CLIPVisionModel(vc),
        "CLIPModel": lambda: transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vc.to_dict(), text_config=dict(vocab_size=99, **{k: v for k, v in vc.to_dict().items()
                                                                          if k in ("hidden_size",)}))),
    }[source]()
    randomize(module, seed=11)
    module.save_pretrained(tmp_path / "vision")
    if source == "CLIPVisionModel4x":
        rewrite(tmp_path / "vision", rename=lambda k: "vision_model." + k)
    text = randomize(transformers.BertModel(hf_text_config("bert")), seed=1)
    text.save_pretrained(tmp_path / "text")
    with pytest.warns(dualenc.NewlyInitializedWarning) as record:
        config, params = dualenc.from_vision_text_pretrained(tmp_path / "vision", tmp_path / "text",
                                                             key=jax.random.key(0), projection_dim=8)
    message = str(record[-1].message)
    assert "visual_projection" in message and "logit_scale" in message
    assert ("vision/pooler" in message) == (source == "ViTForImageClassification")
    px = pixels(2)
    reference_module = {"ViTForImageClassification": lambda: module.vit, "CLIPModel": lambda: module.vision_model}
    ref = tower_reference(reference_module.get(source, lambda: module)(), kind, pixel_values=px)
    out = dualenc.vit.apply(params["vision"], config.vision, px)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    if source != "ViTForImageClassification":
        assert max_diff(out.pooler_output, ref.pooler_output) <= 1e-5
    assert params["visual_projection"]["kernel"].shape == (32, 8)
    assert float(params["logit_scale"]) == pytest.approx(2.6592)


@pytest.mark.parametrize("source", ["BertModel", "BertForMaskedLM", "legacy", "RobertaModel", "XLMRobertaModel"])
def test_text_towers_from_single_checkpoints(source, tmp_path):
    import transformers

    tc = hf_text_config("roberta" if "Roberta" in source else "bert")
    module = {
        "BertModel": lambda: transformers.BertModel(tc),
        "BertForMaskedLM": lambda: transformers.BertForMaskedLM(tc),
        "legacy": lambda: transformers.BertModel(tc),
        "RobertaModel": lambda: transformers.RobertaModel(tc),
        "XLMRobertaModel": lambda: transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**tc.to_dict())),
    }[source]()
    randomize(module, seed=12)
    module.save_pretrained(tmp_path / "text")
    if source == "legacy":  # TF-era layout: bert. prefix, LayerNorm gamma/beta, a stray position_ids buffer
        def legacy(name):
            name = "bert." + name
            if "LayerNorm" in name:
                name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
            return name
        rewrite(tmp_path / "text", rename=legacy,
                add={"bert.embeddings.position_ids": np.arange(40, dtype=np.int64)[None]})
    hf_dual_model("vit", "bert").vision_model.save_pretrained(tmp_path / "vision")
    with pytest.warns(dualenc.NewlyInitializedWarning) as record:
        config, params = dualenc.from_vision_text_pretrained(tmp_path / "vision", tmp_path / "text",
                                                             key=jax.random.key(0))
    assert ("text/pooler" in str(record[-1].message)) == (source == "BertForMaskedLM")
    batch = text_batch(tc)
    base = module.bert if source == "BertForMaskedLM" else module
    ref = tower_reference(base, "text", **batch)
    out = dualenc.bert.apply(params["text"], config.text, **batch)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    if source != "BertForMaskedLM":
        assert max_diff(out.pooler_output, ref.pooler_output) <= 1e-5
    assert config.projection_dim == 512
    if source == "XLMRobertaModel":
        assert config.text.model_type == "xlm-roberta"


def test_strict_loading_lists_offending_keys(hf_dir):
    model = hf_dual_model("vit", "bert")
    path = hf_dir(model)
    rewrite(path, drop={"text_model.pooler.dense.bias"}, add={"text_model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(dualenc.CheckpointError) as err:
        dualenc.load_pretrained(path)
    message = str(err.value)
    assert "model.safetensors" in message
    assert "missing 1 tensor(s): text_model.pooler.dense.bias" in message
    assert "unexpected 1 tensor(s): text_model.extra.weight" in message

    path = hf_dir(model)
    rewrite(path, add={"visual_projection.weight": np.zeros((16, 31), np.float32)})
    with pytest.raises(dualenc.CheckpointError, match=r"visual_projection.weight \(16, 31\) \(expected \(16, 32\)\)"):
        dualenc.load_pretrained(path)

    path = hf_dir(model)
    rewrite(path, drop={f"vision_model.encoder.layer.{i}.{n}" for i in range(2) for n in (
        "attention.attention.query.weight", "attention.attention.query.bias", "attention.attention.key.weight",
        "attention.attention.key.bias", "attention.attention.value.weight", "attention.attention.value.bias",
        "attention.output.dense.weight", "attention.output.dense.bias", "intermediate.dense.weight",
        "intermediate.dense.bias", "output.dense.weight", "output.dense.bias")})
    with pytest.raises(dualenc.CheckpointError, match=r"missing 24 tensor\(s\).*and 4 more"):
        dualenc.load_pretrained(path)


def test_corrupt_and_unsafe_files_are_named(hf_dir, tmp_path):
    path = hf_dir(hf_dual_model("vit", "bert"))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    for broken in (data[: len(data) // 2], data[:5], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):
        with open(weights, "wb") as f:
            f.write(broken)
        with pytest.raises(dualenc.CheckpointError, match="model.safetensors"):
            dualenc.load_pretrained(path)
    os.remove(weights)
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle; must never be opened")
    with pytest.raises(dualenc.CheckpointError, match="safetensors only.*never unpickles"):
        dualenc.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dualenc.load_pretrained(tmp_path / "nowhere")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "vision-text-dual-encoder", "projection_dim": 8}')
    with pytest.raises(dualenc.ConfigError, match="config.json.*vision_config"):
        dualenc.load_pretrained(path)


def test_save_keeps_other_files_and_rejects_bad_params(tmp_path, hf_dir):
    config, params = dualenc.load_pretrained(hf_dir(hf_dual_model("vit", "bert")))
    target = tmp_path / "ckpt"
    dualenc.save_pretrained(target, config, params)
    (target / "tokenizer.json").write_text("{}")
    (target / "pytorch_model.bin").write_bytes(b"stale")
    dualenc.save_pretrained(target, config, params)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p for p in os.listdir(tmp_path) if "tmp" in p] == []
    broken = {**params, "logit_scale": np.zeros((2,), np.float32)}
    with pytest.raises(dualenc.CheckpointError, match="logit_scale"):
        dualenc.save_pretrained(target, config, broken)
    assert dualenc.load_pretrained(target)[0] == config


def test_siglip_logit_bias_round_trip(tmp_path):
    import transformers

    config = dualenc.DualEncoderConfig(
        vision=dualenc.config.tower_config_from_dict(hf_vision_config("vit").to_dict()),
        text=dualenc.config.tower_config_from_dict(hf_text_config("bert").to_dict()), projection_dim=16,
        logit_scale_init_value=float(np.log(10)), logit_bias_init_value=-10.0)
    params = dualenc.init(jax.random.key(0), config)
    params["logit_bias"] = np.float32(-7.25)
    dualenc.save_pretrained(tmp_path / "siglip", config, params)
    back_config, back = dualenc.load_pretrained(tmp_path / "siglip")
    assert back_config == config and float(back["logit_bias"]) == -7.25
    batch, px = text_batch(config.text), pixels(2)
    plain = {k: v for k, v in params.items() if k != "logit_bias"}
    biased = dualenc.apply(back, config, **batch, pixel_values=px).logits_per_text
    unbiased = dualenc.apply(plain, dataclasses.replace(config, logit_bias_init_value=None), **batch,
                             pixel_values=px).logits_per_text
    np.testing.assert_allclose(biased, unbiased - 7.25, atol=1e-5)
    _, info = transformers.VisionTextDualEncoderModel.from_pretrained(tmp_path / "siglip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_saved_files_get_the_umask_modes_and_temporaries_stay_private(tmp_path, monkeypatch):
    """model.safetensors came out 0600 (the safetensors library's mode); saved files now get what open() and
    mkdir() give under the umask, and a save's temporary directory and files are private until they are renamed."""
    config = dualenc.DualEncoderConfig(
        vision=dualenc.config.tower_config_from_dict(hf_vision_config("vit").to_dict()),
        text=dualenc.config.tower_config_from_dict(hf_text_config("bert").to_dict()), projection_dim=8)
    params = dualenc.init(jax.random.key(0), config)
    seen = []
    write = dualenc.files.write_safetensors

    def watching(path, *args, **kwargs):
        seen.append(os.stat(os.path.dirname(path)).st_mode & 0o777)  # the temporary directory, while written
        write(path, *args, **kwargs)

    monkeypatch.setattr(dualenc.files, "write_safetensors", watching)
    old = os.umask(0o027)
    try:
        dualenc.save_pretrained(tmp_path / "model", config, params)
        dualenc.files.write_text_atomic(str(tmp_path / "note.txt"), "x")
    finally:
        os.umask(old)
    assert seen == [0o700]
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o750
    for name in os.listdir(tmp_path / "model"):
        assert os.stat(tmp_path / "model" / name).st_mode & 0o777 == 0o640, name
    assert os.stat(tmp_path / "note.txt").st_mode & 0o777 == 0o640
