"""Configs: transformers' config.json in and out, validation before allocation, static under jit."""

import dataclasses
import json

import jax
import pytest
from conftest import TINY, hf_text_config, hf_vision_config

import dualenc
from dualenc.config import tower_config_from_dict

TINY_VIT = dualenc.ViTConfig(**TINY, image_size=30, patch_size=10)
TINY_BERT = dualenc.BertConfig(**TINY, vocab_size=99, max_position_embeddings=40)


def test_importable_and_hashable():
    config = dualenc.DualEncoderConfig(vision=TINY_VIT, text=TINY_BERT, projection_dim=16)
    assert hash(config) == hash(dataclasses.replace(config))
    assert jax.tree_util.tree_leaves(config) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.projection_dim = 3


@pytest.mark.parametrize("vision", ["vit", "clip"])
@pytest.mark.parametrize("text", ["bert", "roberta"])
def test_reads_and_writes_transformers_config(vision, text, tmp_path):
    import transformers

    hf = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        hf_vision_config(vision, layer_norm_eps=1e-6), hf_text_config(text, hidden_act="gelu_new"),
        projection_dim=24, logit_scale_init_value=1.25)
    hf.save_pretrained(tmp_path)
    config = dualenc.load_config(tmp_path)
    assert config.projection_dim == 24 and config.logit_scale_init_value == 1.25
    assert config.vision.layer_norm_eps == 1e-6 and config.text.hidden_act == "gelu_new"
    assert type(config.vision).__name__ == ("ViTConfig" if vision == "vit" else "CLIPVisionConfig")
    assert type(config.text).__name__ == ("BertConfig" if text == "bert" else "RobertaConfig")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config.to_dict()))
    back = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert back.projection_dim == 24
    for ours, theirs in ((config.vision, back.vision_config), (config.text, back.text_config)):
        for field in dataclasses.fields(ours):
            expected = getattr(ours, field.name)
            if field.name == "pooler_output_size":
                expected = ours.hidden_size
            got = getattr(theirs, field.name)
            assert (tuple(got) if isinstance(got, list) else got) == expected, field.name
    assert dualenc.load_config(tmp_path / "ours") == config


@pytest.mark.parametrize("model_type", ["vit", "clip_vision_model", "clip", "bert", "roberta", "xlm-roberta"])
def test_single_tower_model_types(model_type):
    import transformers

    hf = {
        "vit": lambda: hf_vision_config("vit"),
        "clip_vision_model": lambda: hf_vision_config("clip"),
        "clip": lambda: transformers.CLIPConfig(vision_config=hf_vision_config("clip").to_dict()),
        "bert": lambda: hf_text_config("bert"),
        "roberta": lambda: hf_text_config("roberta"),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**TINY, vocab_size=99),
    }[model_type]()
    config = tower_config_from_dict(hf.to_dict())
    assert config.hidden_size == 32
    if model_type == "xlm-roberta":
        assert isinstance(config, dualenc.RobertaConfig) and config.to_dict()["model_type"] == "xlm-roberta"


def test_clip_vision_config_diff_takes_defaults():
    """transformers 4.x wrote a CLIP config's vision_config as a diff against the defaults."""
    config = tower_config_from_dict({"model_type": "clip", "vision_config": {"patch_size": 16}})
    assert config == dualenc.CLIPVisionConfig(patch_size=16)


BAD_FIELDS = [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -32}, "hidden_size"),
    ({"hidden_size": 30}, "num_attention_heads"),
    ({"hidden_size": 1 << 20}, "hidden_size"),
    ({"num_hidden_layers": 10_000}, "num_hidden_layers"),
    ({"intermediate_size": 37.5}, "intermediate_size"),
    ({"hidden_act": "prelu"}, "hidden_act"),
    ({"hidden_act": "swiglu"}, "hidden_act"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ({"hidden_size": 8192, "intermediate_size": 1 << 18, "num_hidden_layers": 1000}, "parameters"),
]


@pytest.mark.parametrize("change,field", BAD_FIELDS)
def test_bad_values_name_the_field(change, field):
    for base in (TINY_VIT.to_dict(), TINY_BERT.to_dict()):
        with pytest.raises(dualenc.ConfigError, match=field):
            tower_config_from_dict({**base, **change})


@pytest.mark.parametrize("d,field", [
    ({**TINY_VIT.to_dict(), "pooler_output_size": 16}, "pooler_output_size"),
    ({**TINY_VIT.to_dict(), "pooler_act": "softmax"}, "pooler_act"),
    ({**TINY_VIT.to_dict(), "image_size": 5}, "patch_size"),
    ({**TINY_VIT.to_dict(), "image_size": [30, 30, 30]}, "image_size"),
    ({**TINY_VIT.to_dict(), "head_dim": 16}, "head_dim"),
    ({**TINY_VIT.to_dict(), "qkv_bias": "yes"}, "qkv_bias"),
    ({**TINY_BERT.to_dict(), "position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({**TINY_BERT.to_dict(), "is_decoder": True}, "is_decoder"),
    ({**TINY_BERT.to_dict(), "add_cross_attention": True}, "add_cross_attention"),
    ({**TINY_BERT.to_dict(), "pruned_heads": {"0": [1]}}, "pruned_heads"),
    ({**TINY_BERT.to_dict(), "pad_token_id": 500}, "pad_token_id"),
    ({**TINY_BERT.to_dict(), "model_type": "gpt2"}, "model_type"),
    ({**TINY_BERT.to_dict(), "model_type": "roberta", "pad_token_id": 39}, "max_position_embeddings"),
    ({k: v for k, v in TINY_BERT.to_dict().items() if k != "vocab_size"}, "vocab_size"),
    ({k: v for k, v in TINY_VIT.to_dict().items() if k != "patch_size"}, "patch_size"),
    ({k: v for k, v in TINY_VIT.to_dict().items() if k != "model_type"}, "model_type"),
])
def test_unimplemented_or_missing_fields_are_rejected(d, field):
    with pytest.raises(dualenc.ConfigError, match=field):
        tower_config_from_dict(d)


def test_dual_config_requires_both_towers_and_known_types():
    good = dualenc.DualEncoderConfig(vision=TINY_VIT, text=TINY_BERT).to_dict()
    assert dualenc.DualEncoderConfig.from_dict(good).projection_dim == 512
    for key in ("vision_config", "text_config"):
        with pytest.raises(dualenc.ConfigError, match=key):
            dualenc.DualEncoderConfig.from_dict({k: v for k, v in good.items() if k != key})
    swapped = {**good, "vision_config": good["text_config"]}
    with pytest.raises(dualenc.ConfigError, match="vision_config.*model_type"):
        dualenc.DualEncoderConfig.from_dict(swapped)
    unknown = {**good, "vision_config": {**good["vision_config"], "model_type": "swin"}}
    with pytest.raises(dualenc.ConfigError, match="swin"):
        dualenc.DualEncoderConfig.from_dict(unknown)
    with pytest.raises(dualenc.ConfigError, match="projection_dim"):
        dualenc.DualEncoderConfig.from_dict({**good, "projection_dim": 0})
    with pytest.raises(dualenc.ConfigError, match="vision"):
        dualenc.DualEncoderConfig(vision=TINY_BERT, text=TINY_BERT)


def test_config_json_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        dualenc.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(dualenc.ConfigError, match="config.json.*not valid JSON"):
        dualenc.load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(dualenc.ConfigError, match="JSON object"):
        dualenc.load_config(tmp_path)


def test_roberta_max_length():
    config = dualenc.RobertaConfig(**TINY, vocab_size=99, max_position_embeddings=40, pad_token_id=1)
    assert config.max_length == 38


@pytest.mark.parametrize("config", [
    dualenc.ViTConfig(**TINY, image_size=30, patch_size=10), dualenc.CLIPVisionConfig(**TINY, image_size=30, patch_size=10),
    dualenc.ViTConfig(**TINY, image_size=30, patch_size=10, qkv_bias=False),
    dualenc.BertConfig(**TINY, vocab_size=99), dualenc.RobertaConfig(**TINY, vocab_size=99),
    dualenc.CLIPTextConfig(**TINY, vocab_size=99, max_position_embeddings=20)], ids=lambda c: type(c).__name__)
def test_num_params_is_what_init_makes(config):
    """Counted from the shapes init declares (jax.eval_shape), not a formula (the old one said 24,714 for both
    tiny ViT towers), and equal to the reference PyTorch model's count."""
    import jax
    import transformers

    family = dualenc.towers.family(config)
    made = sum(x.size for x in jax.tree_util.tree_leaves(family.init(jax.random.key(0), config)))
    assert config.num_params() == made
    name = type(config).__name__.replace("Config", "")
    d = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    reference = getattr(transformers, name + "Model")(getattr(transformers, name + "Config")(**d))
    assert made == sum(p.numel() for p in reference.parameters())
