"""open_clip checkpoints: parity with open_clip's own CLIP model, conversion to transformers, refusals."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dualenc
from conftest import _transformers, max_diff, pixels

VOCAB, CONTEXT = 99, 12


def model_cfg(quick_gelu=True, **changes):
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 30, "patch_size": 10, "width": 32, "layers": 2, "head_width": 8},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}}
    for key, value in changes.items():
        if key in ("vision_cfg", "text_cfg"):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def build(cfg, seed=0):
    import open_clip

    kw = {k: v for k, v in cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"],
                           **kw).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(2.1)
    return model


def save(model, cfg, path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def text_ids(batch=3, eot=VOCAB - 1, seed=0):
    """open_clip.tokenize's layout: sot ... eot, then zeros."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, CONTEXT), np.int64)
    for row in range(batch):
        n = CONTEXT - 3 * row
        ids[row, :n] = rng.integers(1, VOCAB - 2, n)
        ids[row, n - 1] = eot
    return ids


@pytest.fixture(scope="module", params=[True, False], ids=["quick_gelu", "gelu"])
def open_clip_dir(request, tmp_path_factory):
    cfg = model_cfg(quick_gelu=request.param)
    model = build(cfg)
    return model, str(save(model, cfg, tmp_path_factory.mktemp("oc") / "model"))


def test_open_clip_matches_open_clip(open_clip_dir):
    model, path = open_clip_dir
    config, params = dualenc.load_pretrained(path)
    assert config.model_type == "clip" and config.vision.hidden_act == config.text.hidden_act
    ids, images = text_ids(), pixels(2)
    with torch.no_grad():
        image_features = model.encode_image(torch.tensor(images))
        text_features = model.encode_text(torch.tensor(ids))
        logits_per_image, logits_per_text = model.get_logits(torch.tensor(images), torch.tensor(ids))
    out = jax.jit(dualenc.apply)(params, config, input_ids=ids, pixel_values=images)
    assert max_diff(dualenc.get_image_features(params, config, images), image_features) < 1e-5
    assert max_diff(dualenc.get_text_features(params, config, ids), text_features) < 1e-5
    assert max_diff(out.logits_per_image, logits_per_image) < 1e-5
    assert max_diff(out.logits_per_text, logits_per_text) < 1e-5


def test_open_clip_converts_to_transformers(open_clip_dir, tmp_path):
    """open_clip -> dualenc -> transformers CLIPModel, the same logits: a converter in one call."""
    tf = _transformers()
    model, path = open_clip_dir
    config, params = dualenc.load_pretrained(path)
    dualenc.save_pretrained(tmp_path / "hf", config, params)
    hf, info = tf.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids, images = text_ids(), pixels(2)
    with torch.no_grad():
        ref = model.get_logits(torch.tensor(images), torch.tensor(ids))[0]
        theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images)).logits_per_image
    assert max_diff(theirs.numpy(), ref) < 1e-5


def test_open_clip_logit_bias_and_eos_pooling(tmp_path):
    cfg = model_cfg(init_logit_bias=-5.0, text_cfg={"pool_type": "eos", "eos_id": 97})
    model = build(cfg, seed=1)
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    config, params = dualenc.load_pretrained(save(model, cfg, tmp_path / "m"))
    assert config.logit_bias_init_value == -5.0 and float(params["logit_bias"]) == -3.5
    ids, images = text_ids(eot=97), pixels(2)
    ids[:, 1] = VOCAB - 1  # a larger id before the eos: the argmax rule would pool there
    with torch.no_grad():
        ref = model.get_logits(torch.tensor(images), torch.tensor(ids))[0]
    out = dualenc.apply(params, config, input_ids=ids, pixel_values=images)
    assert max_diff(out.logits_per_image, ref) < 1e-5


@pytest.mark.parametrize("changes,field", [
    (dict(vision_cfg={"timm_model_name": "vit_base_patch16_224"}), "timm_model_name"),
    (dict(vision_cfg={"layers": [3, 4, 6, 3]}), "layers"),
    (dict(vision_cfg={"ls_init_value": 1e-5}), "ls_init_value"),
    (dict(vision_cfg={"attentional_pool": True}), "attentional_pool"),
    (dict(vision_cfg={"pool_type": "none"}), "pool_type"),  # "avg" reads (tests/test_open_clip_options.py)
    (dict(vision_cfg={"image_size": [30, 40]}), "image_size"),
    (dict(text_cfg={"pool_type": "last"}), "pool_type"),
    (dict(text_cfg={"hf_model_name": "bert-base-uncased"}), "hf_model_name"),
    (dict(text_cfg={"no_causal_mask": True}), "no_causal_mask"),
    (dict(text_cfg={"proj_bias": True}), "proj_bias"),
    (dict(text_cfg={"norm_kwargs": {"elementwise_affine": False}}), "norm_kwargs"),
    (dict(multimodal_cfg=32), "multimodal_cfg"),  # an object reads as CoCa (test_open_clip_coca.py)
    (dict(quick_gelu="yes"), "quick_gelu"),
])
def test_unimplemented_open_clip_configs_are_refused(changes, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(**changes)}))
    with pytest.raises(dualenc.ConfigError, match=field):
        dualenc.load_pretrained(tmp_path)


def test_pickled_open_clip_weights_are_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    with pytest.raises(dualenc.CheckpointError, match="never unpickles"):
        dualenc.load_pretrained(tmp_path)


def test_unknown_open_clip_tensors_are_refused(open_clip_dir, tmp_path):
    model, _ = open_clip_dir
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    del tensors["ln_final.bias"]
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="ls_1.gamma"):
        dualenc.load_pretrained(tmp_path)
    del tensors["visual.transformer.resblocks.0.ls_1.gamma"]
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="final_layer_norm.bias"):
        dualenc.load_pretrained(tmp_path)


def test_openai_template_sets_are_open_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    from dualenc import templates

    assert templates.resolve("openai_imagenet") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert templates.resolve("openai_imagenet_7") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    with pytest.raises(dualenc.InputError, match="known template set"):
        templates.resolve("imagenet")


def test_custom_text_layout_loads(tmp_path):
    """CustomTextCLIP (custom_text: true) keeps the text tower under "text."; the numbers are the same."""
    import open_clip

    cfg = model_cfg(custom_text=True)
    model = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()
    assert any(k.startswith("text.transformer.") for k in model.state_dict())
    config, params = dualenc.load_pretrained(save(model, cfg, tmp_path / "m"))
    ids, images = text_ids(), pixels(2)
    with torch.no_grad():
        ref = model.get_logits(torch.tensor(images), torch.tensor(ids))[0]
    assert max_diff(dualenc.apply(params, config, input_ids=ids, pixel_values=images).logits_per_image, ref) < 1e-5
