"""The elementwise and matmul primitives every tower is built from: activations, dense, layer norm, dropout (with
its fast Bernoulli draw), picking one position per row, and the TowerOutput the towers return.

Params are plain dicts. Kernels are (in, out). Matmuls run in the compute `dtype`; LayerNorm statistics run in
float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from dualenc.fields import ACTIVATION_NAMES

Params = dict[str, Any]
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def _gelu(x):
    # The erf form, as torch's exact gelu; jax.nn.gelu(approximate=False) goes through erfc and runs 2x slower.
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_10": lambda x: jnp.clip(_gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "hardswish": jax.nn.hard_swish,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


def lead(v: jax.Array, ndim: int) -> jax.Array:
    """Adds leading unit axes so v broadcasts against an ndim array explicitly (no rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def dense(p: Params, x: jax.Array, dtype) -> jax.Array:
    """x @ kernel + bias: inputs in the compute dtype, accumulated and biased in float32, returned in dtype.

    Asking for a float32 result also picks the fast path: on CPUs with AMX, XLA runs bfloat16 dots with a
    float32 result about 6x faster than the same dots with a bfloat16 result.
    """
    accumulate = jnp.float32 if jax.default_backend() == "cpu" else None  # GPUs accumulate in f32 anyway
    y = jnp.einsum("...i,io->...o", x.astype(dtype), p["kernel"].astype(dtype), preferred_element_type=accumulate)
    if "bias" in p:
        y = y + lead(p["bias"].astype(y.dtype), y.ndim)
    return y.astype(dtype)


def layer_norm(p: Params, x: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm with float32 statistics (biased variance, as torch)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + eps) * lead(p["scale"], x.ndim) + lead(p["bias"], x.ndim)
    return y.astype(dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, shape: tuple | None = None,
            pick: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Inverted dropout; a no-op when key is None (inference) or rate is 0.

    shape, pick: draw the mask for this larger shape and keep pick(mask) of it, so x (e.g. the pooled token of
    a layer's output) is dropped exactly as it would be inside the whole.
    """
    if key is None or rate == 0.0:
        return x
    keep = bernoulli(key, 1.0 - rate, x.shape if shape is None else shape)
    if pick is not None:
        keep = pick(keep)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


Rows = Union[bool, jax.Array]  # which query positions a layer computes: all (False), the first (True), or (B,)


def pick_rows(x: jax.Array, rows: Rows, axis: int = 1) -> jax.Array:
    """One position per batch row along `axis`, the axis kept with size 1: position 0 when rows is True, else
    rows[b] for batch row b (x's leading axis is the batch)."""
    if rows is True:
        return lax.slice_in_dim(x, 0, 1, axis=axis)
    index = jnp.reshape(rows.astype(jnp.int32), (-1,) + (1,) * (x.ndim - 1))
    index = jnp.broadcast_to(index, x.shape[:axis] + (1,) + x.shape[axis + 1:])
    return jnp.take_along_axis(x, index, axis=axis)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def bernoulli(key: jax.Array, p: float, shape: tuple) -> jax.Array:
    """jax.random.bernoulli(key, p, shape): the same draws, made faster on CPU for threefry keys.

    On CPU jax lowers threefry as a loop of its five key injections, to compile quicker; each is a pass over
    memory and a program step of its own, which made dropout cost BERT-base's training step 80 ms. Here
    the rounds are unrolled into elementwise ops that XLA fuses into one pass: the same bits (jax's
    partitionable counter layout), 13x faster. Other keys, and jax's other layout, go to jax.random.
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    if (impl != "threefry2x32" or not jax.config.jax_threefry_partitionable or key.shape != (() if typed else (2,))
            or math.prod(shape) >= 1 << 32):
        return jax.random.bernoulli(key, p, shape)
    k1, k2 = jax.random.key_data(key) if typed else key
    injections = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    counts = sum(lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(math.prod(shape[axis + 1:]))
                 for axis in range(len(shape)))  # the flat index: the low word of jax's 64-bit counter
    x0, x1 = jnp.full(shape, injections[0], jnp.uint32), counts + injections[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + injections[(i + 1) % 3]
        x1 = x1 + injections[(i + 2) % 3] + jnp.uint32(i + 1)
    uniform = lax.bitcast_convert_type(((x0 ^ x1) >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return uniform < jnp.float32(p)


class TowerOutput(NamedTuple):
    """What transformers' tower models return; hidden_states/attentions are per-layer tuples when requested."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


def tower_output(last: jax.Array, pooled: jax.Array, embeddings: jax.Array, states: jax.Array | None,
                 probs: jax.Array | None) -> TowerOutput:
    """Packs encoder results as transformers does: hidden_states = (encoder input, each layer's output)."""
    hidden = None if states is None else (embeddings,) + tuple(states[i] for i in range(states.shape[0]))
    attentions = None if probs is None else tuple(probs[i] for i in range(probs.shape[0]))
    return TowerOutput(last, pooled, hidden, attentions)
