"""CLIP from transformers directories: parity with transformers' PyTorch CLIPModel, round trips, tower loading."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dualenc
from conftest import TINY, _transformers, hf_vision_config, max_diff, pixels, randomize

VOCAB = 99
EOS_RULE = 97  # an in-vocabulary eos_token_id: pooled at its first position (ids may hold larger ones)


def hf_clip(eos_token_id=2, seed=0, projection_dim=16, text_kw=None, vision_kw=None):
    tf = _transformers()
    text = tf.CLIPTextConfig(**{**TINY, "vocab_size": VOCAB, "max_position_embeddings": 20, "eos_token_id": eos_token_id,
                                "bos_token_id": 96, "pad_token_id": 1, "projection_dim": projection_dim,
                                **(text_kw or {})})
    vision = hf_vision_config("clip", projection_dim=projection_dim, **(vision_kw or {}))
    config = tf.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    model = tf.CLIPModel(config).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
    return model


def clip_text_batch(eos_token_id, batch=4, length=11, seed=0):
    """Right-padded rows of mixed lengths, each ending in an end-of-text token (the rule's token)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    eos = VOCAB - 1 if eos_token_id == 2 else eos_token_id  # the legacy rule pools at the largest id
    for row in range(batch):
        n = length - 2 * row
        if eos_token_id == 2:
            ids[row, :n][ids[row, :n] == eos] = 5
        ids[row, n - 1] = eos
        mask[row, n:] = 0
        ids[row, n:] = 1
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture(scope="module", params=[2, EOS_RULE], ids=["argmax-rule", "eos-rule"])
def clip_dir(request, tmp_path_factory):
    model = hf_clip(request.param)
    path = tmp_path_factory.mktemp("clip") / "model"
    model.save_pretrained(path)
    return request.param, model, str(path)


def torch_out(model, text, images, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(text["input_ids"]), attention_mask=torch.tensor(text["attention_mask"]),
                     pixel_values=torch.tensor(images), **kw)


def tower_pooled(model, text, images):
    """The pooled outputs of a CLIP's towers themselves (before the projections)."""
    with torch.no_grad():
        return {"text": model.text_model(input_ids=torch.tensor(text["input_ids"]),
                                         attention_mask=torch.tensor(text["attention_mask"])).pooler_output,
                "vision": model.vision_model(pixel_values=torch.tensor(images)).pooler_output}


def test_clip_matches_transformers_every_output(clip_dir):
    eos, model, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    assert config.model_type == "clip" and isinstance(config.text, dualenc.CLIPTextConfig)
    assert config.text.pooling == ("argmax" if eos == 2 else "eos")
    text, images = clip_text_batch(eos), pixels(3)
    ref = torch_out(model, text, images, output_hidden_states=True, output_attentions=True)
    fwd = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "output_attentions"))
    out = fwd(params, config, **text, pixel_values=images, output_hidden_states=True, output_attentions=True)
    towers = tower_pooled(model, text, images)
    for ours, theirs in ((out.logits_per_image, ref.logits_per_image), (out.logits_per_text, ref.logits_per_text),
                         (out.text_embeds, ref.text_embeds), (out.image_embeds, ref.image_embeds),
                         (out.text_outputs.pooler_output, towers["text"]),
                         (out.vision_outputs.pooler_output, towers["vision"])):
        assert max_diff(ours, theirs) < 1e-5
    # transformers 5's CLIPModel reports projected pooler outputs; dualenc's are the towers' own, as
    # CLIPTextModel / CLIPVisionModel (and VisionTextDualEncoderModel) report them.
    image_features = dualenc.get_image_features(params, config, images)
    assert max_diff(image_features, ref.vision_model_output.pooler_output) < 1e-5
    for tower, theirs in ((out.text_outputs, ref.text_model_output), (out.vision_outputs, ref.vision_model_output)):
        assert max_diff(tower.last_hidden_state, theirs.last_hidden_state) < 1e-5
        assert len(tower.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(tower.hidden_states, theirs.hidden_states):
            assert max_diff(a, b) < 1e-5
        for a, b in zip(tower.attentions, theirs.attentions):
            assert max_diff(a, b) < 1e-5
    # The features functions and the bulk path agree with the forward.
    feats = dualenc.get_text_features(params, config, text["input_ids"], text["attention_mask"])
    np.testing.assert_allclose(np.asarray(dualenc.model.normalize(feats)), out.text_embeds, atol=1e-6)


def test_clip_pools_by_the_configs_rule(clip_dir):
    """The two rules pick different positions on the same ids: the wrong one would change the embedding."""
    eos, _, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    ids = np.array([[96, 98, 40, EOS_RULE, 1, 1]])
    positions = dualenc.clip_text.pooled_positions(config.text, jnp.asarray(ids))
    assert int(positions[0]) == (1 if eos == 2 else 3)


def test_clip_interpolate_pos_encoding_and_bfloat16(clip_dir):
    eos, model, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    text, images = clip_text_batch(eos), pixels(2, size=50)
    ref = torch_out(model, text, images, interpolate_pos_encoding=True)
    out = dualenc.apply(params, config, **text, pixel_values=images, interpolate_pos_encoding=True)
    assert max_diff(out.logits_per_image, ref.logits_per_image) < 1e-5
    bf16 = dualenc.apply(params, config, **text, pixel_values=pixels(3), dtype=jnp.bfloat16)
    f32 = torch_out(model, text, pixels(3))
    assert max_diff(bf16.image_embeds, f32.image_embeds) < 0.1  # reported in the README, not a parity claim


def test_clip_saves_what_transformers_loads(clip_dir, tmp_path):
    tf = _transformers()
    eos, model, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # not simply the loaded bytes
    dualenc.save_pretrained(tmp_path / "ours", config, params)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "clip" and saved["architectures"] == ["CLIPModel"]
    back, info = tf.CLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back.eval()
    text, images = clip_text_batch(eos), pixels(2)
    ref = torch_out(back, text, images)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    assert max_diff(out.logits_per_text, ref.logits_per_text) < 1e-5
    config2, params2 = dualenc.load_pretrained(tmp_path / "ours")
    assert config2 == config
    chex_equal = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, params2)
    assert all(jax.tree_util.tree_leaves(chex_equal))


def test_legacy_config_dict_keys_override(tmp_path, clip_dir):
    """transformers 4.x CLIP configs carry text_config_dict / vision_config_dict, which win over *_config."""
    _, _, path = clip_dir
    d = json.loads(open(f"{path}/config.json").read())
    d["text_config_dict"] = {k: d["text_config"][k] for k in ("hidden_size", "num_hidden_layers",
                                                              "num_attention_heads", "intermediate_size",
                                                              "vocab_size", "max_position_embeddings",
                                                              "eos_token_id")}
    d["text_config"]["hidden_act"] = "relu"  # rebuilt from the dict: back to the default quick_gelu
    d["vision_config_dict"] = dict(d["vision_config"])
    d.pop("vision_config")
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = dualenc.load_config(tmp_path)
    assert config.text.hidden_act == "quick_gelu" and config.vision.hidden_size == 32


def test_from_vision_text_pretrained_keeps_a_clips_projections(clip_dir):
    eos, model, path = clip_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error", dualenc.NewlyInitializedWarning)  # nothing is new
        config, params = dualenc.from_vision_text_pretrained(path, path, key=jax.random.key(0))
    assert config.model_type == "vision-text-dual-encoder" and config.projection_dim == 16
    text, images = clip_text_batch(eos), pixels(2)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    assert max_diff(out.logits_per_image, torch_out(model, text, images).logits_per_image) < 1e-5


@pytest.mark.parametrize("vision_cls,text_cls,kept", [
    ("CLIPVisionModelWithProjection", "CLIPTextModelWithProjection", True),
    ("CLIPVisionModel", "CLIPTextModel", False),
])
def test_towers_from_clip_single_tower_classes(vision_cls, text_cls, kept, tmp_path):
    tf = _transformers()
    whole = hf_clip(EOS_RULE, seed=3)
    whole.save_pretrained(tmp_path / "whole")
    getattr(tf, vision_cls).from_pretrained(tmp_path / "whole").save_pretrained(tmp_path / "vision")
    getattr(tf, text_cls).from_pretrained(tmp_path / "whole").save_pretrained(tmp_path / "text")
    with pytest.warns(dualenc.NewlyInitializedWarning) as record:
        config, params = dualenc.from_vision_text_pretrained(tmp_path / "vision", tmp_path / "text",
                                                             key=jax.random.key(0))
    message = str(record[0].message)
    assert "logit_scale" in message and (("projection" in message) != kept)
    # new projections take the size the CLIP towers suggest (their configs' projection_dim), not a fixed 512
    assert config.projection_dim == whole.config.vision_config.projection_dim == 16
    text, images = clip_text_batch(EOS_RULE), pixels(2)
    out = dualenc.apply(params, config, **text, pixel_values=images)
    ref, towers = torch_out(whole, text, images), tower_pooled(whole, text, images)
    assert max_diff(out.text_outputs.pooler_output, towers["text"]) < 1e-5
    assert max_diff(out.vision_outputs.pooler_output, towers["vision"]) < 1e-5
    if kept:
        assert max_diff(out.text_embeds, ref.text_embeds) < 1e-5


def test_vision_text_dual_encoder_with_a_clip_text_tower(hf_dir):
    tf = _transformers()
    clip = hf_clip(EOS_RULE, seed=4)
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        hf_vision_config("vit"), clip.config.text_config, projection_dim=8)
    model = tf.VisionTextDualEncoderModel(config).eval()
    for part in (model.vision_model, model.text_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, 5)
    ours_config, params = dualenc.load_pretrained(hf_dir(model))
    assert isinstance(ours_config.text, dualenc.CLIPTextConfig) and ours_config.model_type != "clip"
    text, images = clip_text_batch(EOS_RULE), pixels(2)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(text["input_ids"]), attention_mask=torch.tensor(text["attention_mask"]),
                    pixel_values=torch.tensor(images))
    out = dualenc.apply(params, ours_config, **text, pixel_values=images)
    assert max_diff(out.logits_per_image, ref.logits_per_image) < 1e-5


def test_clip_text_config_with_bert_weights_is_refused(tmp_path):
    from conftest import hf_dual_model

    hf = hf_dual_model("clip", "bert")
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"] = {**hf_clip().config.text_config.to_dict(), "model_type": "clip_text_model"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(dualenc.CheckpointError, match="missing .*text_model.embeddings.token_embedding"):
        dualenc.load_pretrained(tmp_path)


def test_token_types_refused_and_pooled_only_same_numbers(clip_dir):
    eos, _, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    text = clip_text_batch(eos)
    with pytest.raises(dualenc.InputError, match="token_type_ids"):
        dualenc.get_text_features(params, config, text["input_ids"], token_type_ids=np.zeros_like(text["input_ids"]))
    full = dualenc.apply(params, config, **text, pixel_values=pixels(1))
    for layout in (params, dualenc.unstack_layers(params)):  # scanned and per-layer: the last layer's pooled row
        short = jax.jit(dualenc.apply, static_argnames="pooled_only")(layout, config, **text, pixel_values=pixels(1),
                                                                     pooled_only=True)
        assert short.text_outputs.last_hidden_state.shape == (len(text["input_ids"]), 1, 32)
        np.testing.assert_allclose(short.text_embeds, full.text_embeds, atol=2e-6)
        np.testing.assert_allclose(short.text_outputs.pooler_output, full.text_outputs.pooler_output, atol=2e-6)


def test_clip_trains_and_encodes(clip_dir):
    from dualenc import train

    eos, _, path = clip_dir
    config, params = dualenc.load_pretrained(path)
    text, images = clip_text_batch(eos), pixels(4)
    optimizer = train.clipped_adamw(1e-3, clip_norm=1.0)
    for locked in ((), ("vision",)):
        state = train.init_state(params, optimizer, locked=locked, unlocked_layers=1 if locked else 0)
        step = train.make_train_step(config, optimizer, locked=locked, unlocked_layers=1 if locked else 0)
        state, metrics = step(state, {**text, "pixel_values": images})
        state, metrics2 = step(state, {**text, "pixel_values": images})
        assert np.isfinite(float(metrics["loss"])) and float(metrics2["loss"]) != float(metrics["loss"])
    features = train.tower_features(params, config, "text", text, batch_size=3)
    ref = dualenc.apply(params, config, **text, pixel_values=images).text_outputs.pooler_output
    np.testing.assert_allclose(features, ref, atol=1e-5)


def test_pooled_only_drops_out_the_pooled_row_as_the_full_layer_does():
    config = dualenc.CLIPTextConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=20, attention_dropout=0.3,
                                    eos_token_id=EOS_RULE)
    params = dualenc.clip_text.init(jax.random.key(0), config)
    text = clip_text_batch(EOS_RULE)
    for layout in (params["encoder"], dualenc.layers.stack_layers(params["encoder"])):
        p = {**params, "encoder": layout}
        full, short = (dualenc.clip_text.apply(p, config, **text, dropout_key=jax.random.key(1), pooled_only=flag)
                       for flag in (False, True))
        np.testing.assert_allclose(short.pooler_output, full.pooler_output, atol=2e-6)
    no_drop = dualenc.clip_text.apply(params, config, **text)
    assert max_diff(no_drop.pooler_output, np.asarray(full.pooler_output)) > 1e-3  # dropout did act


def test_processor_of_a_transformers_clip_directory(tmp_path):
    """What transformers' CLIPProcessor saves (processor_config.json, tokenizer.json) gives its ids and pixels."""
    from sklearn.datasets import load_sample_images
    from test_clip_tokenizer import hub_files

    tf = _transformers()
    for name, content in hub_files().items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    tokenizer = tf.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    reference = tf.CLIPProcessor(image_processor=tf.CLIPImageProcessorPil(), tokenizer=tokenizer)
    reference.save_pretrained(tmp_path / "saved")
    ours = dualenc.Processor.from_pretrained(tmp_path / "saved")
    photos, texts = list(load_sample_images().images), ["a photo of a cat", "Two DOGS playing in the snow!"]
    got = ours(text=texts, images=photos)
    want = reference(text=texts, images=photos, padding="max_length", max_length=77, return_tensors="np")
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert max_diff(got["pixel_values"], want["pixel_values"]) < 1e-5
