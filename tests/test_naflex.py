"""SigLIP 2 NaFlex: parity with transformers' Siglip2Model on photos of mixed aspect ratios in one batch,
round trips, one compile for any mix of shapes, and the input checks."""

import json

import jax
import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images

import dualenc
from conftest import TINY, _transformers, max_diff, randomize

VOCAB = 99
LENGTH = 12
PATCH, MAX_PATCHES = 8, 40


def hf_siglip2(seed=0):
    tf = _transformers()
    text = tf.Siglip2TextConfig(**{**TINY, "vocab_size": VOCAB, "max_position_embeddings": LENGTH,
                                   "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1})
    vision = tf.Siglip2VisionConfig(**{**TINY, "patch_size": PATCH, "num_patches": 16})
    model = tf.Siglip2Model(tf.Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.2)
        model.logit_bias.fill_(-1.3)
    return model


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    model = hf_siglip2()
    path = tmp_path_factory.mktemp("siglip2") / "model"
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def mixed_batch():
    """Crops of real photos, wide, tall, square and tiny, patchified by dualenc's NaFlex processor."""
    china, flower = load_sample_images().images
    crops = [china[:90, :400], flower[:300, :60], china[100:260, 100:260], flower[:20, :11]]
    processor = dualenc.NaFlexImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    batch = processor(crops)
    assert len({tuple(s) for s in batch["spatial_shapes"]}) == 4  # four different grids in one batch
    return batch


def text_ids(batch=3, seed=0):
    return np.random.default_rng(seed).integers(2, VOCAB, (batch, LENGTH))


def torch_out(model, ids, images, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), **{k: torch.tensor(v) for k, v in images.items()}, **kw)


def test_naflex_matches_transformers_on_mixed_aspect_ratios(siglip2_dir, mixed_batch):
    model, path = siglip2_dir
    config, params = dualenc.load_pretrained(path)
    assert config.model_type == "siglip2" and isinstance(config.vision, dualenc.Siglip2VisionConfig)
    ids = text_ids()
    ref = torch_out(model, ids, mixed_batch, output_hidden_states=True, output_attentions=True)
    fwd = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "output_attentions"))
    out = fwd(params, config, input_ids=ids, **mixed_batch, output_hidden_states=True, output_attentions=True)
    for ours, theirs in ((out.logits_per_image, ref.logits_per_image), (out.text_embeds, ref.text_embeds),
                         (out.image_embeds, ref.image_embeds)):
        assert max_diff(ours, theirs) < 1e-5
    vision, theirs = out.vision_outputs, ref.vision_model_output
    assert max_diff(vision.last_hidden_state, theirs.last_hidden_state) < 1e-5  # padding rows included
    for a, b in zip(vision.hidden_states, theirs.hidden_states):
        assert max_diff(a, b) < 1e-5
    for a, b in zip(vision.attentions, theirs.attentions):
        assert max_diff(a, b) < 1e-5
    # Each image alone gives the same embedding as within the mixed batch: the padding is really ignored.
    one = {k: v[1:2] for k, v in mixed_batch.items()}
    alone = dualenc.get_image_features(params, config, **one)
    np.testing.assert_allclose(np.asarray(dualenc.model.normalize(alone))[0], out.image_embeds[1], atol=1e-5)


def test_one_compile_for_any_mix_of_shapes(siglip2_dir, mixed_batch):
    _, path = siglip2_dir
    config, params = dualenc.load_pretrained(path)
    fwd = jax.jit(dualenc.get_image_features)
    first = fwd(params, config, **mixed_batch)
    # jit's cache is per function, shared with other tests' jax.jit(dualenc.get_image_features): count from here
    compiled = fwd._cache_size()
    flipped = dict(mixed_batch)  # other grids (transposed), same padded length
    processor = dualenc.NaFlexImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    china, flower = load_sample_images().images
    flipped = processor([china[:400, :90], flower[:60, :300], china[:50, :50], flower[:11, :20]])
    second = fwd(params, config, **flipped)
    assert fwd._cache_size() == compiled  # the other mix of shapes compiled nothing new
    assert not np.allclose(first, second)


def test_naflex_saves_what_transformers_loads(siglip2_dir, mixed_batch, tmp_path):
    tf = _transformers()
    _, path = siglip2_dir
    config, params = dualenc.load_pretrained(path)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)
    dualenc.save_pretrained(tmp_path / "ours", config, params)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "siglip2" and saved["architectures"] == ["Siglip2Model"]
    back, info = tf.Siglip2Model.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = text_ids()
    ref = torch_out(back.eval(), ids, mixed_batch)
    out = dualenc.apply(params, config, input_ids=ids, **mixed_batch)
    assert max_diff(out.logits_per_text, ref.logits_per_text) < 1e-5
    config2, params2 = dualenc.load_pretrained(tmp_path / "ours")
    assert config2 == config and config2.default_loss == "siglip"


def test_naflex_inputs_are_checked(siglip2_dir, mixed_batch):
    _, path = siglip2_dir
    config, params = dualenc.load_pretrained(path)
    ids = text_ids()
    with pytest.raises(dualenc.InputError, match="needs spatial_shapes"):
        dualenc.apply(params, config, input_ids=ids, pixel_values=mixed_batch["pixel_values"],
                      pixel_attention_mask=mixed_batch["pixel_attention_mask"])
    with pytest.raises(dualenc.InputError, match="patchified images"):
        dualenc.apply(params, config, input_ids=ids, pixel_values=np.zeros((2, 3, 32, 32), np.float32),
                      pixel_attention_mask=mixed_batch["pixel_attention_mask"][:2],
                      spatial_shapes=mixed_batch["spatial_shapes"][:2])
    with pytest.raises(dualenc.InputError, match="interpolate_pos_encoding"):
        dualenc.apply(params, config, input_ids=ids, **mixed_batch, interpolate_pos_encoding=True)
    bad = dict(mixed_batch, spatial_shapes=mixed_batch["spatial_shapes"] * 3)
    with pytest.raises(dualenc.InputError, match=r"spatial_shapes\[0\]"):
        dualenc.check_inputs(config, **bad)
    bad = dict(mixed_batch, pixel_attention_mask=np.ones_like(mixed_batch["pixel_attention_mask"]))
    with pytest.raises(dualenc.InputError, match="pixel_attention_mask must mark"):
        dualenc.check_inputs(config, **bad)
    dualenc.check_inputs(config, input_ids=ids, **mixed_batch)  # the processor's output passes
    # A fixed-resolution model refuses NaFlex inputs instead of ignoring them.
    clip_like = dualenc.DualEncoderConfig(dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                          dualenc.BertConfig(**TINY, vocab_size=VOCAB), projection_dim=8)
    vit_params = dualenc.init(jax.random.key(0), clip_like)
    with pytest.raises(dualenc.InputError, match="spatial_shapes given"):
        dualenc.apply(vit_params, clip_like, input_ids=ids, pixel_values=np.zeros((1, 3, 16, 16), np.float32),
                      spatial_shapes=np.array([[2, 2]]))
