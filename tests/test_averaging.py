"""Averages of params: the EMA carried in the optimizer state, weight-space interpolation (WiSE-FT) and
`dualenc interpolate`."""

import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY

import dualenc
from dualenc import cli, data
from dualenc.errors import ConfigError, InputError
from dualenc.train import clipped_adamw
from dualenc.train.averaging import EMAState, ema_params, interpolate, with_ema


def tree(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "layers": ({"b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},) * 2}


def test_ema_follows_the_params_as_a_hand_loop_does():
    decay, rate = 0.9, 0.1
    params = tree(0)
    grads = [tree(s) for s in range(1, 5)]
    optimizer = with_ema(optax.sgd(rate), decay)
    state = optimizer.init(params)
    assert isinstance(state, EMAState)
    step = jax.jit(optimizer.update)
    hand_w, hand_b = np.asarray(params["w"], np.float64), np.asarray(params["layers"][0]["b"], np.float64)
    ema_w, ema_b = hand_w, hand_b
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        hand_w, hand_b = hand_w - rate * np.asarray(g["w"]), hand_b - rate * np.asarray(g["layers"][0]["b"])
        ema_w, ema_b = decay * ema_w + (1 - decay) * hand_w, decay * ema_b + (1 - decay) * hand_b
    ema = ema_params(state)
    assert jax.tree_util.tree_structure(ema) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(params["w"], hand_w, atol=1e-6)  # the updates are sgd's, unchanged
    np.testing.assert_allclose(ema["w"], ema_w, atol=1e-6)
    np.testing.assert_allclose(ema["layers"][1]["b"], ema_b, atol=1e-6)
    assert not np.allclose(ema["w"], params["w"], atol=1e-3)
    # Inside another optimizer's state (a chain), with the house AdamW (which needs the params) wrapped.
    chained = optax.chain(optax.identity(), with_ema(clipped_adamw(1e-2, weight_decay=0.1, clip_norm=1.0), 0.5))
    state = chained.init(params)
    updates, state = chained.update(grads[0], state, params)
    expected = jax.tree_util.tree_map(lambda p, u: 0.5 * p + 0.5 * (p + u), params, updates)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), ema_params(state), expected)


def test_ema_refuses_bad_decay_and_states_without_one():
    for decay in (1.0, -0.1, True, "0.9", float("nan")):
        with pytest.raises(ConfigError, match="decay"):
            with_ema(optax.sgd(0.1), decay)
    with pytest.raises(InputError, match="0 moving averages"):
        ema_params(optax.sgd(0.1).init(tree(0)))
    optimizer = with_ema(optax.sgd(0.1), 0.0)
    with pytest.raises(InputError, match="needs the params"):
        optimizer.update(tree(1), optimizer.init(tree(0)))


def test_interpolate_at_0_1_and_a_half_and_refuses_other_trees():
    a, b = tree(0), tree(1)
    for alpha, want in ((0.0, a), (1.0, b)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, interpolate(a, b, alpha), want)
    half = jax.jit(interpolate, static_argnums=2)(a, b, 0.5)
    jax.tree_util.tree_map(lambda h, x, y: np.testing.assert_allclose(h, (x + y) / 2, atol=1e-7), half, a, b)
    cases = [({"w": a["w"], "layers": a["layers"][:1]}, r"\['layers'\]\[1\]\['b'\]: only a has it"),
             ({"w": a["w"][:2], "layers": a["layers"]}, r"\['w'\]: shape \(3, 4\) beside \(2, 4\)"),
             ({"v": a["w"], "layers": a["layers"]}, r"\['w'\]: only a has it")]
    for other, message in cases:
        with pytest.raises(InputError, match=message):
            interpolate(a, other, 0.5)
    with pytest.raises(InputError, match="alpha"):
        interpolate(a, b, float("inf"))


CONFIG = dualenc.DualEncoderConfig(dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                   dualenc.BertConfig(**TINY, vocab_size=40, max_position_embeddings=16),
                                   projection_dim=8)


def test_the_interpolate_command(tmp_path):
    data.write_vocab(tmp_path / "vocab", ["a photo of a red square", "a blue circle"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(tmp_path / "vocab"))
    params = {name: dualenc.init(jax.random.key(seed), CONFIG) for name, seed in (("a", 0), ("b", 1))}
    dualenc.save_pretrained(tmp_path / "a", CONFIG, params["a"], processor=processor)
    dualenc.save_pretrained(tmp_path / "b", CONFIG, params["b"])
    code = cli.main(["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.25",
                     "--out", str(tmp_path / "mix")])
    assert code == 0
    config, mixed = dualenc.load_pretrained(tmp_path / "mix")
    assert config == CONFIG
    jax.tree_util.tree_map(lambda m, x, y: np.testing.assert_allclose(m, 0.75 * x + 0.25 * y, atol=1e-6),
                           mixed, params["a"], params["b"])
    names = sorted(os.listdir(tmp_path / "a"))  # A's config, tokenizer and image processor files
    assert sorted(os.listdir(tmp_path / "mix")) == names and "tokenizer.json" in names
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "mix" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    ours, theirs = (dualenc.Processor.from_pretrained(tmp_path / x) for x in ("mix", "a"))
    assert ours.tokenizer.max_length == theirs.tokenizer.max_length
    np.testing.assert_array_equal(ours(text=["a red circle"])["input_ids"], theirs(text=["a red circle"])["input_ids"])

    other = dualenc.DualEncoderConfig(CONFIG.vision, CONFIG.text, projection_dim=4)
    dualenc.save_pretrained(tmp_path / "c", other, dualenc.init(jax.random.key(2), other))
    for args, message in ((["a", "c"], "configs differ in projection_dim (8 vs 4)"),
                          (["a", "b", "--out", "a"], "is model A"),
                          (["a", "b", "--alpha", "nan"], "--alpha must be a finite number")):
        paths = [str(tmp_path / x) for x in args[:2]] + [str(tmp_path / x) if x in "abc" else x for x in args[2:]]
        if "--out" not in args:
            paths += ["--out", str(tmp_path / "bad")]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["interpolate", *paths]) == 2
        assert message in err.getvalue(), err.getvalue()
    assert not os.path.exists(tmp_path / "bad")
