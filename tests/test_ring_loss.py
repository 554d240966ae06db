"""The ring losses (no gathering) equal the gathered ones in value and gradients: on 8 devices in a subprocess
(shard_map and pmap, chunked or not), and in process through sharded_loss on 1-D and 2-D meshes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dualenc import losses
from dualenc.errors import InputError

# Each figure is max |ring - gathered| / max(1, max |gathered|) over a value or gradient; the subprocess prints
# them as JSON, one entry per (kind, inputs, transform, chunk_size).
EIGHT_DEVICES = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from dualenc import losses

jax.config.update("jax_numpy_rank_promotion", "raise")
N, D = 32, 16
mesh = Mesh(np.array(jax.devices()), ("data",))


def inputs(normalised, seed):
    rng = np.random.default_rng(seed)
    t, i = rng.standard_normal((2, N, D)).astype(np.float32)
    if normalised:  # SigLIP's starting scale and bias
        return t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True), \
            np.float32(np.log(10.0)), np.float32(-10.0)
    return 0.6 * t, 0.8 * i + 0.3, np.float32(1.3), np.float32(-1.7)


def grads_of(loss, args, transform, chunk_size):
    argnums = tuple(range(len(args)))

    def local(*a):
        return jax.value_and_grad(lambda *b: loss(*b, axis_name="data", chunk_size=chunk_size), argnums)(*a)

    if transform == "shard_map":
        params = (P(),) * (len(args) - 2)
        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), *params),
                                   out_specs=(P(), (P("data"), P("data"), *params))))
        return fn(*args)
    rows = tuple(x.reshape(8, N // 8, D) for x in args[:2])
    value, grads = jax.pmap(local, axis_name="data", in_axes=(0, 0) + (None,) * (len(args) - 2))(*rows, *args[2:])
    # pmap: values on every device; row gradients per device; param gradients are shares, summed here
    return value, tuple(g.reshape(N, D) for g in grads[:2]) + tuple(g.sum(0) for g in grads[2:])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


out = {}
for kind, ring, gathered in (("siglip", losses.siglip_loss_ring, losses.siglip_loss),
                             ("clip", losses.clip_loss_ring, losses.clip_loss)):
    for name, normalised, seed in (("normalised", True, 0), ("raw", False, 1)):
        t, i, scale, bias = inputs(normalised, seed)
        args = (t, i, scale, bias) if kind == "siglip" else (t, i, scale)
        for transform in ("shard_map", "pmap"):
            value, grads = grads_of(gathered, args, transform, None)
            for chunk_size in ((None, 2) if transform == "shard_map" else (2,)):
                v, g = grads_of(ring, args, transform, chunk_size)
                out[f"{kind} {name} {transform} chunk_size={chunk_size}"] = {
                    "value": rel(v, value), **{f"grad {k}": rel(a, b) for k, a, b in
                                                zip(("text", "image", "scale", "bias"), g, grads)}}

# The compiled ring passes blocks (collective-permute) and gathers nothing.
args = inputs(False, 2)
sm = jax.jit(jax.shard_map(lambda *a: jax.grad(lambda *b: losses.siglip_loss_ring(*b, axis_name="data"),
                                               (0, 1, 2, 3))(*a),
                           mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                           out_specs=(P("data"), P("data"), P(), P())))
hlo = sm.lower(*args).compile().as_text()
out["hlo"] = {"collective-permute": "collective-permute" in hlo, "all-gather": "all-gather" in hlo}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=300,
                          cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_ring_equals_gathered_on_eight_devices(eight_devices):
    figures = {k: v for k, v in eight_devices.items() if k != "hlo"}
    assert len(figures) == 2 * 2 * 3
    worst = {k: max(v.values()) for k, v in figures.items()}
    assert max(worst.values()) <= 1e-6, worst
    assert all(len(v) == (5 if k.startswith("siglip") else 4) for k, v in figures.items())


def test_ring_passes_blocks_and_gathers_nothing(eight_devices):
    assert eight_devices["hlo"] == {"collective-permute": True, "all-gather": False}


N, D = 16, 8
SCALE, BIAS = np.float32(1.1), np.float32(-2.2)


def raw_inputs(seed=3):
    rng = np.random.default_rng(seed)
    t, i = rng.standard_normal((2, N, D)).astype(np.float32)
    return 0.7 * t, 0.9 * i - 0.2


def from_logits(kind):
    if kind == "clip":
        return lambda t, i, s: losses.clip_loss_from_logits(jnp.exp(s) * t @ i.T)
    return lambda t, i, s, b: losses.siglip_loss_from_logits(jnp.exp(s) * t @ i.T + b)


def meshes():
    devices = np.array(jax.devices()[:4])
    return {"data": Mesh(devices, ("data",)), "data x model": Mesh(devices.reshape(2, 2), ("data", "model"))}


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("form", ["ring", "gather"])
def test_sharded_loss_under_jit_equals_the_full_logits(kind, form):
    t, i = raw_inputs()
    args = (t, i, SCALE) + ((BIAS,) if kind == "siglip" else ())
    argnums = tuple(range(len(args)))
    value, grads = jax.value_and_grad(from_logits(kind), argnums)(*args)
    cases = list(zip(meshes().items(), (None, 2)))  # the 2-D mesh chunked; the gathered forms only there
    for (name, mesh), chunk_size in cases if form == "ring" else cases[1:]:
        fn = losses.sharded_loss(kind, mesh, form=form, chunk_size=chunk_size)
        v, g = jax.jit(jax.value_and_grad(fn, argnums))(*args)
        assert abs(float(v) - float(value)) <= 1e-6 * max(1.0, abs(float(value))), name
        for a, b in zip(g, grads):
            assert np.max(np.abs(np.asarray(a) - b)) <= 1e-6 * max(1.0, float(np.max(np.abs(b)))), name


def test_ring_on_one_device_and_bad_arguments():
    t, i = raw_inputs(4)
    for kind, ring, args in (("siglip", losses.siglip_loss_ring, (t, i, SCALE, BIAS)),
                             ("clip", losses.clip_loss_ring, (t, i, SCALE))):
        expected = jax.value_and_grad(from_logits(kind), (0, 1, 2))(*args)
        got = jax.jit(jax.value_and_grad(lambda *a: ring(*a, axis_name=None, chunk_size=4), (0, 1, 2)))(*args)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        for a, b in zip(got[1], expected[1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mesh = meshes()["data"]
    with pytest.raises(InputError, match="kind"):
        losses.sharded_loss("softmax", mesh)
    with pytest.raises(InputError, match="form"):
        losses.sharded_loss("clip", mesh, form="all")
    with pytest.raises(InputError, match="'batch'"):
        losses.sharded_loss("clip", mesh, axis="batch")
    with pytest.raises(InputError, match="logit_bias"):
        losses.sharded_loss("siglip", mesh)(t, i, SCALE)
    with pytest.raises(InputError, match="logit_bias"):
        losses.sharded_loss("clip", mesh)(t, i, SCALE, BIAS)
    with pytest.raises(InputError, match="global batch 14"):
        losses.sharded_loss("clip", mesh)(t[:14], i[:14], SCALE)
    with pytest.raises(InputError, match="chunk_size 3"):
        losses.siglip_loss_ring(t, i, SCALE, BIAS, axis_name=None, chunk_size=3)


def test_ring_accuracy_equals_the_gathered_one():
    """sharded_accuracy (a ring of argmaxes) gives in_batch_accuracy's fractions on 4 devices, ties included."""
    import jax
    import numpy as np

    from dualenc import losses, train

    mesh = train.data_mesh()
    rng = np.random.default_rng(3)
    texts = rng.standard_normal((16, 8)).astype(np.float32)
    images = (texts + rng.standard_normal((16, 8)).astype(np.float32) * 1.5)
    images[5] = images[9]  # a tie: two images with the same scores against every text
    want = losses.in_batch_accuracy(texts, images)
    got = jax.jit(losses.sharded_accuracy(mesh))(texts, images)
    assert 0 < float(want[0]) < 1 and 0 < float(want[1]) < 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
