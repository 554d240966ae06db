"""SigLIP from transformers directories: parity with transformers' PyTorch SiglipModel, round trips, towers,
the sigmoid loss and zero-shot rule."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import dualenc
from conftest import TINY, _transformers, hf_text_config, max_diff, pixels, randomize, text_batch

VOCAB = 99
LENGTH = 12


def hf_siglip(seed=0, vision_kw=None, text_kw=None):
    tf = _transformers()
    text = tf.SiglipTextConfig(**{**TINY, "vocab_size": VOCAB, "max_position_embeddings": LENGTH,
                                  "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1, **(text_kw or {})})
    vision = tf.SiglipVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10, **(vision_kw or {})})
    model = tf.SiglipModel(tf.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, seed)
    with torch.no_grad():  # transformers' init zeroes both: a test with zeros would not see them misread
        model.logit_scale.fill_(2.1)
        model.logit_bias.fill_(-1.7)
    return model


def siglip_text(batch=3, seed=0):
    """Rows of mixed lengths padded with the pad token, with an attention mask (SigLIP may be given one)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (batch, LENGTH))
    mask = np.ones((batch, LENGTH), np.int64)
    for row in range(batch):
        n = LENGTH - 3 * row
        ids[row, n - 1] = 1
        ids[row, n:] = 1
        mask[row, n:] = 0
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    model = hf_siglip()
    path = tmp_path_factory.mktemp("siglip") / "model"
    model.save_pretrained(path)
    return model, str(path)


def torch_out(model, text, images, **kw):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in text.items()}, pixel_values=torch.tensor(images), **kw)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "stacked"])
def test_siglip_matches_transformers_every_output(siglip_dir, stacked):
    model, path = siglip_dir
    config, params = dualenc.load_pretrained(path, stacked=stacked)
    assert config.model_type == "siglip" and not config.projections and config.projection_dim == 32
    assert "visual_projection" not in params and float(params["logit_bias"]) == pytest.approx(-1.7)
    text, images = siglip_text(), pixels(2)
    ref = torch_out(model, text, images, output_hidden_states=True, output_attentions=True)
    fwd = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "output_attentions"))
    out = fwd(params, config, **text, pixel_values=images, output_hidden_states=True, output_attentions=True)
    for ours, theirs in ((out.logits_per_image, ref.logits_per_image), (out.logits_per_text, ref.logits_per_text),
                         (out.text_embeds, ref.text_embeds), (out.image_embeds, ref.image_embeds)):
        assert max_diff(ours, theirs) < 1e-5
    for tower, theirs in ((out.text_outputs, ref.text_model_output), (out.vision_outputs, ref.vision_model_output)):
        assert max_diff(tower.last_hidden_state, theirs.last_hidden_state) < 1e-5
        assert max_diff(tower.pooler_output, theirs.pooler_output) < 1e-5
        assert len(tower.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(tower.hidden_states, theirs.hidden_states):
            assert max_diff(a, b) < 1e-5
        for a, b in zip(tower.attentions, theirs.attentions):
            assert max_diff(a, b) < 1e-5
    # Without an attention mask SigLIP attends to the padding too (how the hub models were trained).
    ids_only = {"input_ids": text["input_ids"]}
    ref = torch_out(model, ids_only, images)
    out = dualenc.apply(params, config, **ids_only, pixel_values=images)
    assert max_diff(out.logits_per_text, ref.logits_per_text) < 1e-5
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=torch.tensor(images)).pooler_output
    assert max_diff(dualenc.get_image_features(params, config, images), feats) < 1e-5


def test_siglip_interpolation_bfloat16_and_pooled_only(siglip_dir):
    model, path = siglip_dir
    config, params = dualenc.load_pretrained(path)
    text, images = siglip_text(), pixels(2, size=50)
    ref = torch_out(model, text, images, interpolate_pos_encoding=True)
    out = dualenc.apply(params, config, **text, pixel_values=images, interpolate_pos_encoding=True)
    assert max_diff(out.logits_per_image, ref.logits_per_image) < 1e-5
    bf16 = dualenc.apply(params, config, **text, pixel_values=pixels(2), dtype=jnp.bfloat16)
    f32 = torch_out(model, text, pixels(2))
    assert max_diff(bf16.image_embeds, f32.image_embeds) < 0.1  # reported in the README, not a parity claim
    with pytest.raises(dualenc.InputError, match="attention-pooling head that reads every token"):
        dualenc.apply(params, config, **text, pixel_values=pixels(2), pooled_only=True)
    # The text tower alone supports it (its pooled position, the last, is known).
    full = dualenc.clip_text.apply(params["text"], config.text, **text)
    short = dualenc.clip_text.apply(params["text"], config.text, **text, pooled_only=True)
    np.testing.assert_allclose(short.pooler_output, full.pooler_output, atol=2e-6)


def test_siglip_saves_what_transformers_loads(siglip_dir, tmp_path):
    tf = _transformers()
    model, path = siglip_dir
    config, params = dualenc.load_pretrained(path)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # not simply the loaded bytes
    dualenc.save_pretrained(tmp_path / "ours", config, params)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "siglip" and saved["architectures"] == ["SiglipModel"]
    back, info = tf.SiglipModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back.eval()
    text, images = siglip_text(), pixels(2)
    ref = torch_out(back, text, images)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    assert max_diff(out.logits_per_text, ref.logits_per_text) < 1e-5
    assert float(back.logit_bias) == pytest.approx(-1.69, abs=1e-6)
    config2, params2 = dualenc.load_pretrained(tmp_path / "ours")
    assert config2 == config
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, params2, params)))


def test_vision_tower_without_head_and_single_towers(tmp_path):
    tf = _transformers()
    vision = tf.SiglipVisionModel(tf.SiglipVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10,
                                                           "vision_use_head": False}))
    vision.config._attn_implementation = "eager"
    vision = randomize(vision.eval(), 3)
    vision.save_pretrained(tmp_path / "vision")
    config = dualenc.load_config(tmp_path / "vision")
    assert isinstance(config, dualenc.SiglipVisionConfig) and not config.vision_use_head
    params = dualenc.siglip.init(jax.random.key(0), config)
    assert "head" not in params
    images = pixels(2)
    with torch.no_grad():
        ref = vision(pixel_values=torch.tensor(images)).last_hidden_state
    from dualenc.formats.transformers import load_tower

    config, params, new, _ = load_tower(tmp_path / "vision", jax.random.key(0))
    out = dualenc.siglip.apply(params, config, images)
    assert out.pooler_output is None and not new
    assert max_diff(out.last_hidden_state, ref) < 1e-5
    text = dualenc.SiglipTextConfig(**{**TINY, "vocab_size": VOCAB, "max_position_embeddings": LENGTH})
    with pytest.raises(dualenc.ConfigError, match="vision_use_head false"):
        dualenc.DualEncoderConfig(config, text, projection_dim=32, model_type="siglip", logit_bias_init_value=-10.0)


def test_siglip_vision_tower_in_a_vision_text_dual_encoder(tmp_path):
    """transformers' VisionTextDualEncoderModel takes a SigLIP vision tower (its head's output, projected)."""
    tf = _transformers()
    vision = tf.SiglipVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10})
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(vision, hf_text_config("bert"),
                                                                     projection_dim=16)
    hf = randomize(tf.VisionTextDualEncoderModel(config).eval(), 5)
    hf.vision_model.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / "dual")
    config, params = dualenc.load_pretrained(tmp_path / "dual")
    assert config.model_type == "vision-text-dual-encoder" and config.projections
    assert isinstance(config.vision, dualenc.SiglipVisionConfig)
    text, images = text_batch(config.text), pixels(2)
    ref = torch_out(hf, text, images)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    assert max_diff(out.logits_per_image, ref.logits_per_image) < 1e-5


def test_config_checks():
    vision = dualenc.SiglipVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10})
    text = dualenc.SiglipTextConfig(**{**TINY, "vocab_size": VOCAB, "projection_size": 16})
    assert text.projection_size == 16 and dualenc.SiglipTextConfig(**TINY).projection_size == 32
    with pytest.raises(dualenc.ConfigError, match="projection_dim"):
        dualenc.DualEncoderConfig(vision, text, projection_dim=32, model_type="siglip", logit_bias_init_value=-10.0)
    text = dualenc.SiglipTextConfig(**{**TINY, "vocab_size": VOCAB})
    with pytest.raises(dualenc.ConfigError, match="logit_bias_init_value"):
        dualenc.DualEncoderConfig(vision, text, projection_dim=32, model_type="siglip")
    with pytest.raises(dualenc.ConfigError, match="'siglip' needs SiglipVisionConfig"):
        dualenc.DualEncoderConfig(dualenc.CLIPVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10}), text,
                                  projection_dim=32, model_type="siglip", logit_bias_init_value=-10.0)
    with pytest.raises(dualenc.ConfigError, match="eos_token_id"):
        dualenc.SiglipTextConfig(**TINY, eos_token_id="x")
    config = dualenc.DualEncoderConfig(vision, text, projection_dim=32, model_type="siglip",
                                       logit_scale_init_value=float(np.log(10)), logit_bias_init_value=-10.0)
    assert config.default_loss == "siglip"
    assert dualenc.DualEncoderConfig.from_dict(config.to_dict()) == config


def test_train_step_defaults_to_the_sigmoid_loss_transformers_computes(siglip_dir):
    model, path = siglip_dir
    config, params = dualenc.load_pretrained(path)
    text, images = siglip_text(), pixels(3)
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in text.items()}, pixel_values=torch.tensor(images),
                    return_loss=True).loss.item()
    step = dualenc.train.make_train_step(config, optax.sgd(0.0))  # loss left to the model
    state = dualenc.train.init_state(params, optax.sgd(0.0))
    _, metrics = step(state, {**text, "pixel_values": images})
    assert abs(float(metrics["loss"]) - ref) < 1e-4 * max(1.0, abs(ref))
    clip_step = dualenc.train.make_train_step(config, optax.sgd(0.0), loss="clip")  # overridable
    _, clip_metrics = clip_step(dualenc.train.init_state(params, optax.sgd(0.0)), {**text, "pixel_values": images})
    assert abs(float(clip_metrics["loss"]) - ref) > 1e-3


def test_zero_shot_probabilities_are_per_label_sigmoids(siglip_dir):
    model, path = siglip_dir
    config, params = dualenc.load_pretrained(path)
    rule = dualenc.zero_shot_logit_rule(params, config)
    assert rule == {"logit_scale": pytest.approx(np.exp(2.1), rel=1e-6), "logit_bias": pytest.approx(-1.7)}
    text, images = siglip_text(), pixels(2)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    classifier = np.asarray(out.text_embeds).T
    top, probs = dualenc.zero_shot_predict(out.image_embeds, classifier, k=3, **rule)
    expected = jax.nn.sigmoid(out.logits_per_image)  # the model's own logits, one sigmoid per label
    np.testing.assert_allclose(probs, np.take_along_axis(np.asarray(expected), top, axis=1), atol=1e-5)
    assert not np.allclose(probs.sum(axis=1), 1.0)


def test_towers_of_a_siglip_model_compose(siglip_dir):
    """from_vision_text_pretrained takes either side from a SiglipModel directory (new projections)."""
    model, path = siglip_dir
    with pytest.warns(dualenc.NewlyInitializedWarning, match="visual_projection"):
        config, params = dualenc.from_vision_text_pretrained(path, path, key=jax.random.key(0), projection_dim=8)
    assert config.model_type == "vision-text-dual-encoder" and config.projection_dim == 8
    assert isinstance(config.vision, dualenc.SiglipVisionConfig) and isinstance(config.text, dualenc.SiglipTextConfig)
    text, images = siglip_text(), pixels(2)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    ref = torch_out(model, text, images)
    assert max_diff(out.vision_outputs.pooler_output, ref.vision_model_output.pooler_output) < 1e-5
    assert max_diff(out.text_outputs.pooler_output, ref.text_model_output.pooler_output) < 1e-5
