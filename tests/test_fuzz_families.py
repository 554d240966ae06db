"""Fuzzing the families issue 26 added (hypothesis, bounded, as tests/test_fuzz.py): open_clip configs of the timm,
Hugging Face and ModifiedResNet towers with a field replaced by junk or dropped, Chinese-CLIP's config.json,
truncated or bit-flipped weights of each, and one family's weights under another's config: each loads, or ends in
dualenc's documented errors naming the file; never a crash."""

import json
import os
import shutil

import pytest
from conftest import TINY, _transformers, randomize
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from test_fuzz import FUZZ, JUNK, TRIED, Checkpoint, expect_documented

import dualenc

# each input reads a whole checkpoint: 60 in the suite, a campaign's number (DUALENC_FUZZ_EXAMPLES) in a campaign
SMALL = settings(FUZZ, max_examples=FUZZ.max_examples if os.environ.get("DUALENC_FUZZ_EXAMPLES") else 60)
TEXT = {"context_length": 16, "vocab_size": 40, "width": 32, "heads": 4, "layers": 1}
# family -> an open_clip model_cfg dualenc reads (the timm ones real, small timm architectures)
FAMILIES = {
    "resnet": {"embed_dim": 16, "quick_gelu": True, "text_cfg": TEXT,
               "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}},
    "convnext": {"embed_dim": 16, "text_cfg": TEXT,
                 "vision_cfg": {"timm_model_name": "convnext_atto", "timm_pool": "", "timm_proj": "linear",
                                "timm_model_pretrained": False, "image_size": 32}},
    "eva": {"embed_dim": 16, "custom_text": True, "text_cfg": TEXT,
            "vision_cfg": {"timm_model_name": "eva02_tiny_patch14_224", "timm_pool": "token", "timm_proj": None,
                           "timm_model_pretrained": False, "image_size": 224}},
    "siglip_vit": {"embed_dim": 768, "custom_text": True, "init_logit_bias": -10,
                   "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map",
                                  "timm_proj": "none", "image_size": 224},
                   "text_cfg": {**TEXT, "width": 768, "heads": 12, "no_causal_mask": True, "pool_type": "last",
                                "proj_bias": True}},
    "hf_text": {"embed_dim": 16, "text_cfg": {"hf_model_name": None, "hf_pooler_type": "mean_pooler",
                                              "hf_proj_type": "mlp", "hf_model_pretrained": False,
                                              "context_length": 16},
                "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 8}},
}
FIELDS = ["timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
          "patch_dropout", "image_size", "layers", "width", "head_width", "hf_model_name", "hf_pooler_type",
          "hf_proj_type", "hf_tokenizer_name", "context_length", "pool_type", "embed_dim", "custom_text"]


@pytest.fixture(scope="module")
def xlmr_config(tmp_path_factory):
    """A local folder with a tiny XLM-RoBERTa config.json (hf_model_name's target; no weights needed)."""
    folder = tmp_path_factory.mktemp("xlmr-config")
    _transformers().XLMRobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=24,
                                     type_vocab_size=1).save_pretrained(folder)
    return str(folder)


def family_cfg(family, xlmr_config):
    cfg = json.loads(json.dumps(FAMILIES[family]))
    if family == "hf_text":
        cfg["text_cfg"]["hf_model_name"] = xlmr_config
    return cfg


@FUZZ
@given(family=st.sampled_from(sorted(FAMILIES)), where=st.sampled_from(["model_cfg", "vision_cfg", "text_cfg"]),
       field=st.sampled_from(FIELDS), value=JUNK, drop=st.booleans())
def test_fuzzed_family_open_clip_config(tmp_path, xlmr_config, family, where, field, value, drop):
    """A family's open_clip_config.json with one field junk or dropped, read by the model and image processor
    loaders (no weights beside it: a config that reads ends in the missing-weights error)."""
    TRIED["family open_clip_config.json"] += 1
    cfg = family_cfg(family, xlmr_config)
    target = cfg if where == "model_cfg" else cfg[where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    for load in (dualenc.load_pretrained, dualenc.ImageProcessor.from_pretrained):
        expect_documented(lambda: load(tmp_path), str(tmp_path))


def chinese_clip(seed=0):
    tf = _transformers()
    config = tf.ChineseCLIPConfig(
        text_config=tf.ChineseCLIPTextConfig(**TINY, vocab_size=40, max_position_embeddings=24).to_dict(),
        vision_config=tf.ChineseCLIPVisionConfig(**TINY, image_size=16, patch_size=8).to_dict(), projection_dim=8)
    return randomize(tf.ChineseCLIPModel(config).eval(), seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, xlmr_config):
    """Saved tiny models: open_clip's ModifiedResNet, ConvNeXt (convnext_atto) and XLM-R text CLIPs, and a
    transformers ChineseCLIPModel; each loads unmutated."""
    import open_clip

    out = {}
    for family in ("resnet", "convnext", "hf_text"):
        cfg = family_cfg(family, xlmr_config)
        kind = open_clip.CustomTextCLIP if family == "hf_text" else open_clip.CLIP  # as open_clip's factory picks
        model = kind(**{k: v for k, v in cfg.items() if k != "custom_text"})
        path = tmp_path_factory.mktemp(f"fuzz-{family}")
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
        out[family] = (path, "open_clip_model.safetensors")
    path = tmp_path_factory.mktemp("fuzz-chinese-clip")
    chinese_clip().save_pretrained(path)
    out["chinese_clip"] = (path, "model.safetensors")
    for path, _ in out.values():
        dualenc.load_pretrained(path)
    return {k: Checkpoint((path, (path / name).read_bytes(), name)) for k, (path, name) in out.items()}


@SMALL
@given(family=st.sampled_from(["resnet", "convnext", "hf_text", "chinese_clip"]), cut=st.floats(0.0, 1.0),
       flip=st.integers(0, 1 << 22))
def test_mutated_family_weights(folders, tmp_path, family, cut, flip):
    """A family's weights truncated at a random point with a random byte flipped."""
    TRIED["family safetensors"] += 1
    path, blob, name = folders[family]
    target = tmp_path / family
    if not target.exists():
        shutil.copytree(path, target)
    data = bytearray(blob[:max(1, int(cut * len(blob)))])
    data[flip % len(data)] ^= 0xFF
    (target / name).write_bytes(bytes(data))
    expect_documented(lambda: dualenc.load_pretrained(target), name)


@pytest.mark.parametrize("weights,config", [("resnet", "convnext"), ("convnext", "resnet"), ("hf_text", "resnet"),
                                            ("resnet", "hf_text"), ("convnext", "hf_text")])
def test_one_familys_weights_under_anothers_config(folders, tmp_path, xlmr_config, weights, config):
    """Mismatched towers: the weights file names the tensors it lacks or does not expect, never a shape error."""
    path, blob, name = folders[weights]
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": family_cfg(config, xlmr_config)}))
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(dualenc.CheckpointError, match=name):
        dualenc.load_pretrained(tmp_path)


@FUZZ
@given(where=st.sampled_from(["vision_config", "text_config", None]),
       field=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                              "vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_act",
                              "layer_norm_eps", "model_type", "projection_dim", "image_size", "patch_size",
                              "pad_token_id", "position_embedding_type"]),
       value=JUNK, drop=st.booleans())
def test_fuzzed_chinese_clip_config_json(folders, tmp_path, where, field, value, drop):
    TRIED["Chinese-CLIP config.json"] += 1
    path = folders["chinese_clip"][0]
    d = json.loads((path / "config.json").read_text())
    target = d if where is None else d[where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_documented(lambda: dualenc.load_config(tmp_path), "config.json")

