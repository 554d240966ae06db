"""Bad inputs raise ValueError naming the argument and the shapes, with and without jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, pixels, text_batch

import dualenc

VIT = dualenc.ViTConfig(**TINY, image_size=30, patch_size=10)
BERT = dualenc.BertConfig(**TINY, vocab_size=99, max_position_embeddings=40)
ROBERTA = dualenc.RobertaConfig(**TINY, vocab_size=99, max_position_embeddings=40, pad_token_id=1)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def model(request):
    config = dualenc.DualEncoderConfig(vision=VIT, text=BERT if request.param == "bert" else ROBERTA,
                                       projection_dim=16)
    return config, dualenc.init(jax.random.key(0), config)


@pytest.mark.parametrize("jit", [False, True])
def test_shape_errors(model, jit):
    config, params = model
    fwd = jax.jit(dualenc.apply) if jit else dualenc.apply
    batch, px = text_batch(config.text), pixels(2)
    cases = [
        (dict(pixel_values=px.transpose(0, 2, 3, 1)), r"pixel_values.*channels.*\(2, 30, 30, 3\).*NCHW"),
        (dict(pixel_values=pixels(2, size=40)), r"pixel_values of size 40x40.*30x30.*interpolate_pos_encoding"),
        (dict(pixel_values=px[0]), r"pixel_values must be a 4-D.*\(3, 30, 30\)"),
        (dict(pixel_values=px.astype(np.uint8)), r"pixel_values must be floating point.*uint8"),
        (dict(attention_mask=batch["attention_mask"][:, :5]), r"attention_mask has shape \(3, 5\).*\(3, 9\)"),
        (dict(token_type_ids=batch["token_type_ids"][:2]), r"token_type_ids has shape \(2, 9\)"),
        (dict(input_ids=batch["input_ids"][0]), r"input_ids must be a 2-D"),
        (dict(input_ids=batch["input_ids"].astype(np.float32)), r"input_ids must hold integers"),
    ]
    for change, pattern in cases:
        inputs = {**batch, "pixel_values": px, **change}
        with pytest.raises(ValueError, match=pattern):
            fwd(params, config, **inputs)


def test_sequence_longer_than_position_table(model):
    config, params = model
    limit = 40 if isinstance(config.text, dualenc.BertConfig) else 40 - 1 - 1
    ok = text_batch(config.text, length=limit)
    dualenc.apply(params, config, **ok, pixel_values=pixels(1))
    too_long = text_batch(config.text, length=limit + 1)
    with pytest.raises(ValueError, match=f"sequence length {limit + 1}.*{limit} positions"):
        jax.jit(dualenc.apply)(params, config, **too_long, pixel_values=pixels(1))


def test_check_inputs_catches_values_a_gather_would_misread(model):
    config, _ = model
    batch, px = text_batch(config.text), pixels(2)
    dualenc.check_inputs(config, **batch, pixel_values=px)
    bad_ids = batch["input_ids"].copy()
    bad_ids[0, 1] = 99
    with pytest.raises(dualenc.InputError, match=r"input_ids holds 1 value\(s\) outside \[0, 99\)"):
        dualenc.check_inputs(config, **{**batch, "input_ids": bad_ids})
    bad_types = batch["token_type_ids"].copy()
    bad_types[1, 0] = -1
    with pytest.raises(dualenc.InputError, match="token_type_ids"):
        dualenc.check_inputs(config, **{**batch, "token_type_ids": bad_types})
    with pytest.raises(dualenc.InputError, match="attention_mask"):
        dualenc.check_inputs(config, **{**batch, "attention_mask": batch["attention_mask"] * 3})
    with pytest.raises(dualenc.InputError, match="position_ids"):
        dualenc.check_inputs(config, input_ids=batch["input_ids"], position_ids=np.full((3, 9), 40))
    bad_px = px.copy()
    bad_px[1, 0, 0, 0] = np.nan
    with pytest.raises(dualenc.InputError, match=r"pixel_values holds 1 non-finite"):
        dualenc.check_inputs(config, pixel_values=bad_px)


def test_out_of_range_ids_read_nan_not_a_clamped_row(model):
    config, params = model
    batch = text_batch(config.text)
    batch["input_ids"][0, 2] = 500
    out = jax.jit(dualenc.apply)(params, config, **batch, pixel_values=pixels(2))
    assert np.isnan(out.text_embeds[0]).all() and np.isfinite(out.text_embeds[1:]).all()


def test_flags_must_be_static(model):
    config, params = model
    batch = text_batch(config.text)
    with pytest.raises(ValueError, match="static_argnames=\\('train'"):
        jax.jit(dualenc.apply)(params, config, **batch, pixel_values=pixels(2), train=jnp.array(True))


def test_every_error_is_a_value_error():
    for cls in (dualenc.ConfigError, dualenc.InputError, dualenc.CheckpointError, dualenc.DataError):
        assert issubclass(cls, ValueError)


def test_params_must_match_the_config(model):
    config, params = model
    batch = text_batch(config.text)
    broken = {**params, "text_projection": {}}
    with pytest.raises(dualenc.InputError, match="missing text_projection/kernel"):
        dualenc.apply(broken, config, **batch, pixel_values=pixels(2))
    other = dualenc.DualEncoderConfig(vision=config.vision, text=config.text, projection_dim=8)
    with pytest.raises(dualenc.InputError, match=r"visual_projection/kernel \(32, 16\) \(expected \(32, 8\)\)"):
        jax.jit(dualenc.apply)(params, other, **batch, pixel_values=pixels(2))
    with pytest.raises(dualenc.InputError, match="nested dict"):
        dualenc.get_image_features([params], config, pixels(2))
