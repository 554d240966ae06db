"""Exact gradient accumulation (GradCache): K micro-batches give the gradient of the whole batch's loss."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from conftest import TINY

import dualenc
from dualenc import train
from dualenc.train.sharding import FSDP

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIG = dualenc.DualEncoderConfig(
    vision=dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
    text=dualenc.BertConfig(**TINY, vocab_size=50, max_position_embeddings=16, **NO_DROPOUT), projection_dim=16)
SIGLIP = dataclasses.replace(CONFIG, logit_scale_init_value=float(np.log(10)), logit_bias_init_value=-10.0)


def batch_of(n=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 6), np.int32)
    mask[::3, 4:] = 0  # padded captions too
    return dict(input_ids=rng.integers(1, 50, (n, 6)).astype(np.int32), attention_mask=mask,
                pixel_values=rng.standard_normal((n, 3, 16, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def params():
    return dualenc.init(jax.random.key(0), CONFIG)


@pytest.fixture(scope="module")
def whole_clip(params):
    """The one-device whole-batch CLIP step on batch_of(), compiled once for the tests comparing with it."""
    return gradient(CONFIG, params, batch_of(), 1, loss="clip")


def gradient(config, params, batch, accum_steps, **kw):
    """The step's gradient (what SGD with rate 1 subtracts) and its metrics."""
    optimizer = optax.sgd(1.0)
    lock = {k: kw.pop(k) for k in ("locked",) if k in kw}
    mesh = kw.get("mesh")
    state = train.init_state(params, optimizer, layer_loop=False, **lock)
    if mesh is not None:
        state = train.shard_state(state, mesh, kw.get("fsdp", False))
        batch = train.shard_batch(batch, mesh)
    step = train.make_train_step(config, optimizer, accum_steps=accum_steps, donate=False, **lock, **kw)
    after, metrics = step(state, batch)
    grads = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), state.trainable, after.trainable)
    return grads, {k: float(v) for k, v in metrics.items()}


def assert_close(a, b, atol=1e-5, of_largest=False):
    """Leaf by leaf within atol, or with of_largest within atol times the leaf's largest entry (at least 1)."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        bound = atol * max(1.0, float(np.abs(y).max())) if of_largest else atol
        np.testing.assert_allclose(x, y, atol=bound, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gradient_equals_the_whole_batch_step(params, whole_clip, loss):
    config = CONFIG if loss == "clip" else SIGLIP
    start = params if loss == "clip" else dualenc.init(jax.random.key(0), config)
    batch = batch_of()
    whole, whole_metrics = whole_clip if loss == "clip" else gradient(config, start, batch, 1, loss=loss)
    for k in (4,):
        grads, metrics = gradient(config, start, batch, k, loss=loss)
        assert_close(grads, whole)
        for name in ("loss", "grad_norm", "accuracy_t2i", "accuracy_i2t"):
            assert metrics[name] == pytest.approx(whole_metrics[name], rel=1e-6, abs=1e-5), name
    assert max(np.abs(x).max() for x in jax.tree_util.tree_leaves(whole["vision"])) > 1e-4  # a real gradient


def test_locked_tower_and_lit_cache(params):
    batch = batch_of()
    whole, _ = gradient(CONFIG, params, batch, 1, locked=("vision",))
    grads, _ = gradient(CONFIG, params, batch, 4, locked=("vision",))
    assert "vision" not in grads and set(grads) == set(whole)
    assert_close(grads, whole)
    features = np.asarray(train.tower_features(params, CONFIG, "vision", {"pixel_values": batch["pixel_values"]}))
    cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": features}
    lit, _ = gradient(CONFIG, params, cached, 2, locked=("vision",), cached=True)
    assert_close(lit, whole)


def test_fsdp_on_four_devices(params):
    mesh = train.data_mesh()
    assert mesh.size == 4
    batch = batch_of(16)
    whole, _ = gradient(CONFIG, params, batch, 1)
    grads, _ = gradient(CONFIG, params, batch, 2, mesh=mesh, fsdp=FSDP(min_shard_mb=0))
    assert_close(grads, whole)


def test_updated_params_after_steps_and_refusals(params):
    batch = batch_of()
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    results = []
    for k in (1, 4):
        state = train.init_state(params, optimizer, layer_loop=False)
        step = train.make_train_step(CONFIG, optimizer, accum_steps=k)
        for _ in range(2):
            state, _ = step(state, batch)
        results.append(train.full_params(state))
    assert_close(results[1], results[0])
    with pytest.raises(dualenc.ConfigError, match="accum_steps"):
        train.make_train_step(CONFIG, optimizer, accum_steps=0)
    step = train.make_train_step(CONFIG, optimizer, accum_steps=3)
    with pytest.raises(dualenc.InputError, match="multiple of 3"):
        step(train.init_state(params, optimizer), batch)


def test_ring_and_gathered_losses_give_the_same_step():
    """On a 4-device mesh the default loss passes embedding blocks round the devices: the same gradient as
    the gathered loss (SigLIP and CLIP), also with accumulation."""
    mesh = train.data_mesh()
    batch = batch_of(16)
    start = dualenc.init(jax.random.key(0), SIGLIP)
    for loss, k in (("siglip", 1), ("clip", 2)):
        gathered, _ = gradient(SIGLIP, start, batch, 1, mesh=mesh, loss=loss, loss_form="gather")
        ring, _ = gradient(SIGLIP, start, batch, k, mesh=mesh, loss=loss, loss_form="ring")
        assert_close(ring, gathered, atol=1e-6, of_largest=True)  # float32: gradients up to ~30
    with pytest.raises(dualenc.ConfigError, match="loss_form"):
        train.make_train_step(CONFIG, optax.sgd(1.0), loss_form="ring")


def test_patch_dropout_in_the_step(params, whole_clip):
    """patch_dropout reaches the vision tower in training (another loss than p = 0, finite, with accumulation
    too); refused with the LiT cache and out of range."""
    batch = batch_of()
    optimizer = optax.sgd(0.0)
    state = train.init_state(params, optimizer, layer_loop=False)
    plain = whole_clip[1]["loss"]  # p = 0: the loss of the same params on the same batch (before the update)
    for k in (2,):
        dropped = train.make_train_step(CONFIG, optimizer, donate=False, patch_dropout=0.5, accum_steps=k)
        loss = float(dropped(state, batch)[1]["loss"])
        assert np.isfinite(loss) and abs(loss - float(plain)) > 1e-4
    with pytest.raises(dualenc.ConfigError, match="patch_dropout with cached=True"):
        train.make_train_step(CONFIG, optimizer, locked=("vision",), cached=True, patch_dropout=0.5)
    with pytest.raises(dualenc.ConfigError, match="patch_dropout must be a share"):
        train.make_train_step(CONFIG, optimizer, patch_dropout=1.0)
