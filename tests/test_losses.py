"""Losses against transformers' definitions; gathered (shard_map, pmap) and chunked forms equal the full one."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P

from dualenc import losses

try:
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map


def embeds(n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    t, i = rng.standard_normal((2, n, d)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True)


SCALE, BIAS = np.float32(2.3), np.float32(-3.0)


def test_clip_loss_matches_transformers():
    from transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder import (
        image_text_contrastive_loss as hf_clip_loss,
    )

    t, i = embeds()
    logits = np.exp(SCALE) * t @ i.T
    expected = float(hf_clip_loss(torch.tensor(logits)))
    assert abs(float(losses.clip_loss_from_logits(logits)) - expected) <= 1e-5
    assert abs(float(losses.clip_loss(t, i, SCALE)) - expected) <= 1e-5


def test_siglip_loss_matches_its_definition():
    t, i = embeds()
    logits = torch.tensor(np.exp(SCALE) * t @ i.T + BIAS)
    labels = 2 * torch.eye(len(t)) - 1
    expected = float(-torch.nn.functional.logsigmoid(labels * logits).sum(dim=-1).mean())
    assert abs(float(losses.siglip_loss_from_logits(logits.numpy())) - expected) <= 1e-4
    assert abs(float(losses.siglip_loss(t, i, SCALE, BIAS)) - expected) <= 1e-4


def full_and_grads(fn, t, i, *args):
    return jax.value_and_grad(fn, argnums=(0, 1, 2))(t, i, *args)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_equals_full_in_value_and_gradient(kind):
    t, i = embeds(n=16)
    extra = () if kind == "clip" else (BIAS,)
    fn = getattr(losses, f"{kind}_loss")
    value, grads = full_and_grads(fn, t, i, SCALE, *extra)
    value_c, grads_c = full_and_grads(partial(fn, chunk_size=4), t, i, SCALE, *extra)
    assert abs(float(value) - float(value_c)) <= 1e-5
    for a, b in zip(grads, grads_c):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_never_builds_the_full_logits():
    t, i = embeds(n=64)
    grad = jax.jit(jax.grad(partial(losses.clip_loss, chunk_size=8), argnums=(0, 1)))
    hlo = grad.lower(t, i, SCALE).compile().as_text()
    assert "f32[8,64]" in hlo and "f32[64,64]" not in hlo


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gathered_over_shard_map_equals_single_device(kind, chunk_size):
    t, i = embeds(n=16, seed=1)
    extra = () if kind == "clip" else (BIAS,)
    fn = getattr(losses, f"{kind}_loss")
    value, grads = full_and_grads(fn, t, i, SCALE, *extra)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))

    def local(t_, i_, s_, *e):
        def loss(t_, i_, s_):
            return fn(t_, i_, s_, *e, axis_name="data", chunk_size=chunk_size)
        v, (gt, gi, gs) = jax.value_and_grad(loss, argnums=(0, 1, 2))(t_, i_, s_)
        return v, gt, gi, gs  # the replicated scale's gradient arrives summed over devices

    sharded = shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()) + (P(),) * len(extra),
                        out_specs=(P(), P("data"), P("data"), P()))
    v, gt, gi, gs = jax.jit(sharded)(t, i, SCALE, *extra)
    assert abs(float(v) - float(value)) <= 1e-5
    np.testing.assert_allclose(gt, grads[0], atol=1e-5)
    np.testing.assert_allclose(gi, grads[1], atol=1e-5)
    np.testing.assert_allclose(gs, grads[2], atol=1e-5)


def test_gathered_over_pmap_equals_single_device():
    t, i = embeds(n=16, seed=2)
    value, grads = full_and_grads(losses.clip_loss, t, i, SCALE)

    def local(t_, i_):
        return jax.value_and_grad(partial(losses.clip_loss, logit_scale=SCALE, axis_name="d"),
                                  argnums=(0, 1))(t_, i_)

    v, (gt, gi) = jax.pmap(local, axis_name="d")(t.reshape(4, 4, -1), i.reshape(4, 4, -1))
    np.testing.assert_allclose(v, float(value), atol=1e-5)
    np.testing.assert_allclose(gt.reshape(16, -1), grads[0], atol=1e-5)
    np.testing.assert_allclose(gi.reshape(16, -1), grads[1], atol=1e-5)


def test_accuracy_and_shape_errors():
    t, i = embeds(n=8)
    t2i, i2t = losses.in_batch_accuracy(t, t)
    assert float(t2i) == 1.0 and float(i2t) == 1.0
    with pytest.raises(ValueError, match="text_embeds"):
        losses.clip_loss(t, i[:4], SCALE)
    with pytest.raises(ValueError, match="chunk_size 3"):
        losses.clip_loss(t, i, SCALE, chunk_size=3)
    assert jnp.isfinite(losses.clip_loss(t, i, SCALE))
