"""The seams for new towers and new kinds: a convolutional tower family (BatchNorm statistics as state, no heads,
no encoder stack) registered at run time from this file, and the kinds table driving what the model does."""

import dataclasses
import sys
import types
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dualenc
from dualenc import kinds, layers, losses, model, towers
from dualenc import params as declare
from dualenc.fields import TowerConfig, builds, float_field, int_field
from dualenc.formats.transformers import dual_table
from dualenc.towers.family import Family

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)


# ------------------------------------------------------------------------------------------------ a conv tower

@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ConvConfig(TowerConfig):
    """One 3x3 convolution, BatchNorm (running statistics as state), ReLU, global average pooling."""

    model_types: ClassVar[tuple[str, ...]] = ("toy_conv",)

    num_channels: int = int_field(3, hi=64)
    hidden_size: int = int_field(8)
    image_size: int = int_field(8)
    momentum: float = float_field(0.9, 0.0, 1.0)
    eps: float = float_field(1e-5, hi=1.0, lo_open=True)


def specs(config):
    c, d = config.num_channels, config.hidden_size
    return [declare.Param(("conv", "kernel"), (3, 3, c, d), ("patch", "patch", "channels", "embed"),
                          declare.normal((9 * c) ** -0.5), decay=True),
            *declare.norm(("norm",), d),
            declare.Param(("batch_stats", "mean"), (d,), ("norm",), declare.ZEROS),
            declare.Param(("batch_stats", "var"), (d,), ("norm",), declare.ONES)]


@builds(ConvConfig)
def _build(normal, config):
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)


class ConvOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    state: dict | None = None  # the new BatchNorm statistics, in training


def apply(params, config, pixel_values, *, dropout_key=None, dtype=None):
    x = lax.conv_general_dilated(jnp.transpose(pixel_values, (0, 2, 3, 1)), params["conv"]["kernel"], (1, 1),
                                 "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    stats, new = params["batch_stats"], None
    if dropout_key is None:  # inference: the running statistics
        mean, var = stats["mean"], stats["var"]
    else:  # training: the batch's, and the running ones move towards them
        mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
        m = config.momentum
        new = {"batch_stats": {"mean": m * stats["mean"] + (1 - m) * mean,
                               "var": m * stats["var"] + (1 - m) * var}}
    norm = params["norm"]
    x = (x - layers.lead(mean, 4)) * layers.lead(lax.rsqrt(var + config.eps) * norm["scale"], 4)
    x = jax.nn.relu(x + layers.lead(norm["bias"], 4))
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    return ConvOutput(tokens, jnp.mean(tokens, axis=1), state=new)


def _check(config, pixel_values):
    if np.shape(pixel_values)[1] != config.num_channels:
        raise dualenc.InputError(f"pixel_values must have {config.num_channels} channels")


FAMILIES = (Family("toy_conv", "vision", {"toy_conv": ConvConfig}, sys.modules[__name__], "gap",
                   state=("batch_stats",), check=_check),)


@pytest.fixture
def conv_family():
    towers.register(sys.modules[__name__])
    yield
    towers.unregister(sys.modules[__name__])


def _batch(n=4, length=6):
    rng = np.random.default_rng(0)
    return dict(input_ids=jnp.asarray(rng.integers(0, 99, (n, length)), jnp.int32),
                pixel_values=jnp.asarray(rng.normal(size=(n, 3, 8, 8)), jnp.float32))


def test_a_conv_family_registered_at_run_time_inits_and_applies_under_jit(conv_family):
    config = dualenc.DualEncoderConfig(ConvConfig(), dualenc.BertConfig(**TINY, vocab_size=99), projection_dim=8)
    assert towers.family(config.vision).name == "toy_conv" and towers.config_class("toy_conv") is ConvConfig
    assert ConvConfig().num_params() == 3 * 3 * 3 * 8 + 4 * 8
    params = dualenc.init(jax.random.key(0), config)
    assert sorted(params["vision"]) == ["batch_stats", "conv", "norm"]
    assert params["visual_projection"]["kernel"].shape == (8, 8)
    batch = _batch()
    out = jax.jit(dualenc.apply)(params, config, **batch)
    assert out.logits_per_image.shape == (4, 4) and out.vision_outputs.state is None
    expect = np.exp(params["logit_scale"]) * out.text_embeds @ out.image_embeds.T
    np.testing.assert_allclose(out.logits_per_text, expect, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out.logits_per_image))
    features = dualenc.get_image_features(params, config, batch["pixel_values"])
    np.testing.assert_allclose(model.normalize(features), out.image_embeds, atol=1e-6)
    model.check_inputs(config, **batch)
    assert model.stack_layers(params)["vision"].keys() == params["vision"].keys()
    for flag in ("output_attentions", "pooled_only", "interpolate_pos_encoding"):
        with pytest.raises(dualenc.InputError, match=flag):
            dualenc.apply(params, config, **batch, **{flag: True})
    with pytest.raises(dualenc.InputError, match="channels"):
        model.check_inputs(config, pixel_values=np.zeros((1, 2, 8, 8), np.float32))


def test_state_takes_no_gradient_and_training_updates_it(conv_family):
    config = dualenc.DualEncoderConfig(ConvConfig(), dualenc.BertConfig(**TINY, vocab_size=99), projection_dim=8)
    params = dualenc.init(jax.random.key(1), config)
    weights, state = model.split_state(params, config)
    assert "batch_stats" not in weights["vision"] and set(state) == {"vision"}
    assert model.join_state(weights, state).keys() == params.keys()
    batch = _batch()

    @jax.jit
    def step(weights, state, key):
        def loss(w):
            out = dualenc.apply(model.join_state(w, state), config, **batch, train=True, dropout_key=key)
            return losses.clip_loss(out.text_embeds, out.image_embeds, w["logit_scale"]), out
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(weights)
        return value, grads, out

    value, grads, out = step(weights, state, jax.random.key(2))
    assert np.isfinite(value) and "batch_stats" not in grads["vision"]
    assert float(jnp.abs(grads["vision"]["conv"]["kernel"]).sum()) > 0
    updated = model.updated_state(params, config, out)
    model.check_params(updated, config)
    assert not np.allclose(updated["vision"]["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(updated["vision"]["conv"]["kernel"], params["vision"]["conv"]["kernel"])


def test_the_train_step_carries_state_and_learns_the_weights(conv_family):
    """make_train_step on a tower with state: the weights move by the optimizer, the statistics by the forward
    (the values a training forward returns, untouched by the optimizer's decay); a locked tower's stay put."""
    from dualenc import train

    config = dualenc.DualEncoderConfig(ConvConfig(), dualenc.BertConfig(**TINY, vocab_size=99), projection_dim=8)
    params = dualenc.init(jax.random.key(3), config)
    batch = _batch()
    batch["attention_mask"] = jnp.ones_like(batch["input_ids"])
    batch["token_type_ids"] = jnp.zeros_like(batch["input_ids"])
    optimizer = train.default_optimizer(1e-2, total_steps=4, warmup_steps=0, weight_decay=0.5)
    state = train.init_state(params, optimizer, seed=0)
    new_state, metrics = train.make_train_step(config, optimizer, donate=False)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    expected = dualenc.apply(params, config, **batch, train=True, dropout_key=jax.random.split(key)[0])
    stats = new_state.trainable["vision"]["batch_stats"]
    np.testing.assert_allclose(stats["mean"], expected.vision_outputs.state["batch_stats"]["mean"], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(stats["var"], params["vision"]["batch_stats"]["var"])
    assert not np.allclose(new_state.trainable["vision"]["conv"]["kernel"], params["vision"]["conv"]["kernel"])

    locked = train.init_state(params, optimizer, locked=("vision",), seed=0)
    after, _ = train.make_train_step(config, optimizer, locked=("vision",), donate=False)(locked, batch)
    np.testing.assert_array_equal(after.frozen["vision"]["batch_stats"]["mean"],
                                  params["vision"]["batch_stats"]["mean"])


def test_registering_a_taken_model_type_fails_and_changes_nothing(conv_family):
    before = towers.FAMILIES
    clash = types.SimpleNamespace(FAMILIES=(Family("clash", "vision", {"vit": ConvConfig}, sys.modules[__name__],
                                                   "gap"),))
    with pytest.raises(dualenc.ConfigError, match="already registered"):
        towers.register(clash)
    assert towers.FAMILIES == before and towers.config_class("vit") is dualenc.ViTConfig
    with pytest.raises(dualenc.ConfigError, match="pooling"):
        Family("bad", "vision", {"x": ConvConfig}, sys.modules[__name__], "mean")


def test_the_built_in_families_declare_themselves():
    assert {f.name for f in towers.FAMILIES} >= {"vit", "clip_vision", "bert", "clip_text", "siglip_text",
                                                 "siglip_vision", "siglip2_vision"}
    for f in towers.FAMILIES:
        assert f in f.module.FAMILIES and f.module in towers.MODULES
        for model_type, cls in f.configs.items():
            assert model_type in cls.model_types and towers.config_class(model_type) is cls
    assert towers.family(dualenc.SiglipVisionConfig(**TINY)).pooling == "map"
    assert towers.type_family("siglip_text_model").text_padding == "max_length"


# ------------------------------------------------------------------------------------------------ kinds

def _tiny(cls):
    extra = {dualenc.Siglip2VisionConfig: dict(patch_size=8, num_patches=4)}.get(cls)
    if extra is None:
        extra = dict(image_size=16, patch_size=8) if cls in towers.config_classes("vision") else \
            dict(vocab_size=99, max_position_embeddings=16)
    return cls(**TINY, **extra)


def _inputs(config, n=3):
    rng = np.random.default_rng(1)
    out = dict(input_ids=jnp.asarray(rng.integers(0, 99, (n, 16)), jnp.int32))
    if isinstance(config.vision, dualenc.Siglip2VisionConfig):  # patchified: 4 patches, a 2 x 2 grid
        out.update(pixel_values=jnp.asarray(rng.normal(size=(n, 4, 3 * 64)), jnp.float32),
                   pixel_attention_mask=jnp.ones((n, 4), jnp.int32), spatial_shapes=jnp.full((n, 2), 2, jnp.int32))
    else:
        out.update(pixel_values=jnp.asarray(rng.normal(size=(n, 3, 16, 16)), jnp.float32))
    return out


def _config(kind: kinds.Kind, projection_dim=16):
    if kind.towers is None:
        vision, text = _tiny(dualenc.ViTConfig), _tiny(dualenc.BertConfig)
    else:
        vision, text = (_tiny(towers.config_class(kind.towers[side])) for side in ("vision", "text"))
    scale, bias = kind.logit_init
    return dualenc.DualEncoderConfig(vision, text, projection_dim=projection_dim if kind.has_projections else 32,
                                     logit_scale_init_value=scale, logit_bias_init_value=bias,
                                     model_type=kind.model_type)


@pytest.mark.parametrize("model_type", list(kinds.KINDS))
def test_the_kinds_table_is_what_the_model_does(model_type, tmp_path):
    kind = kinds.KINDS[model_type]
    config = _config(kind)
    assert config.kind is kind and config.default_loss == kind.default_loss
    assert config.projections == (kind.projections != "none")
    assert config.text_padding == (kind.text_padding or towers.family(config.text).text_padding)
    params = dualenc.init(jax.random.key(0), config)
    for name in model.PROJECTIONS.values():
        assert (name in params) == kind.has_projections
        if name in params:
            assert ("bias" in params[name]) == (kind.projections == "bias")
    assert ("logit_bias" in params) == (kind.logit_init[1] is not None)
    d = config.to_dict()
    assert d["architectures"] == [kind.architecture] and ("projection_dim" in d) == kind.has_projections
    assert (kind.inits_key in d) if kind.inits_key else "logit_scale_init_value" in d
    assert dualenc.DualEncoderConfig.from_dict(d) == config
    entries = {e.hf: e for e in dual_table(config)}
    assert entries["logit_scale"].kind == ("scalar" if kind.scalar_shape == (1,) else "id")
    assert ("logit_bias" in entries) == kind.own_bias
    assert all(k.startswith(tuple(kind.modules.values())) for k in entries if "." in k and "projection" not in k)
    out = dualenc.apply(params, config, **_inputs(config))
    expect = np.exp(params["logit_scale"]) * out.text_embeds @ out.image_embeds.T
    if kind.logit_rule == "sigmoid_bias":
        expect = expect + params["logit_bias"]
    np.testing.assert_allclose(out.logits_per_text, expect, rtol=1e-5, atol=1e-5)
    dualenc.save_pretrained(tmp_path, config, params)
    config2, params2 = dualenc.load_pretrained(tmp_path)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_sigmoid_bias_kinds_need_a_logit_bias():
    for kind in kinds.KINDS.values():
        if kind.logit_rule == "sigmoid_bias":
            with pytest.raises(dualenc.ConfigError, match="logit_bias_init_value"):
                dataclasses.replace(_config(kind), logit_bias_init_value=None)


def test_a_changed_row_changes_the_model(monkeypatch):
    """Projections with a bias: one field of the row, and init, apply and the checkpoint table follow."""
    row = dataclasses.replace(kinds.KINDS["vision-text-dual-encoder"], projections="bias")
    monkeypatch.setitem(kinds.KINDS, row.model_type, row)
    config = _config(row, projection_dim=12)
    params = dualenc.init(jax.random.key(0), config)
    assert params["text_projection"]["bias"].shape == (12,)
    assert {"visual_projection.bias", "text_projection.bias"} <= {e.hf for e in dual_table(config)}
    params["text_projection"]["bias"] = jnp.full((12,), 0.5)
    pooled = dualenc.apply(params, config, **_inputs(config)).text_outputs.pooler_output
    features = dualenc.get_text_features(params, config, _inputs(config)["input_ids"])
    np.testing.assert_allclose(features, pooled @ params["text_projection"]["kernel"] + 0.5, rtol=1e-5, atol=1e-5)
    with pytest.raises(dualenc.ConfigError, match="projections"):
        dataclasses.replace(row, projections="affine")


def test_a_temperature_row_saves_a_temperature_and_divides_by_it(monkeypatch, tmp_path):
    """ALIGN's logit rule, cos / temperature: the checkpoint holds `temperature` (as transformers' AlignModel),
    dualenc log(1 / temperature) as its logit_scale; a temperature that is not positive is refused on load."""
    from safetensors.numpy import load_file, save_file

    row = dataclasses.replace(kinds.KINDS["vision-text-dual-encoder"], logit_rule="temperature")
    monkeypatch.setitem(kinds.KINDS, row.model_type, row)
    config = _config(row)
    params = dualenc.init(jax.random.key(0), config)
    params["logit_scale"] = jnp.asarray(np.log(1 / 0.02), jnp.float32)
    assert {e.hf for e in dual_table(config)} >= {"temperature"} and "logit_scale" not in {
        e.hf for e in dual_table(config)}
    dualenc.save_pretrained(tmp_path, config, params)
    tensors = load_file(tmp_path / "model.safetensors")
    np.testing.assert_allclose(tensors["temperature"], 0.02, rtol=1e-6)
    _, loaded = dualenc.load_pretrained(tmp_path)
    out = dualenc.apply(loaded, config, **_inputs(config))
    np.testing.assert_allclose(out.logits_per_text, out.text_embeds @ out.image_embeds.T / 0.02, rtol=1e-4)
    tensors["temperature"] = np.asarray(-1.0, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(dualenc.CheckpointError, match="model.safetensors.*temperature.*positive"):
        dualenc.load_pretrained(tmp_path)
