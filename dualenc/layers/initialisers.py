"""Random params: one chunked draw of normals cut into every leaf (init_params), a tower's jitted init, and the
dense and LayerNorm initialisers with the std rules (xavier, CLIP) the towers use."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dualenc.layers.layout import unstack_layers
from dualenc.layers.primitives import Params

Normal = Callable[[tuple, float], jax.Array]  # normal(shape, std): std * N(0, 1) numbers of that shape

NORMAL_CHUNK = 1 << 21  # numbers per threefry call in init_params (2M ran fastest of 1M-8M here)


def init_params(key: jax.Array, build: Callable[[Normal], Params]) -> Params:
    """Runs build(normal) with every normal(shape, std) it asks for cut from one draw of standard normals.

    build is traced twice: once abstractly to learn the shapes, then for real. The numbers come from a
    lax.map over fixed-size threefry chunks, so the program holds one random-number kernel whatever the
    model's size: compiling init is then quick and running it beats one jax.random.normal per leaf.
    """
    wanted = []

    def record(shape, std):
        wanted.append(tuple(shape))
        return jnp.zeros(shape, jnp.float32)

    jax.eval_shape(lambda: build(record))
    sizes = [math.prod(shape) for shape in wanted]
    total = sum(sizes)
    if total <= NORMAL_CHUNK:
        flat = jax.random.normal(key, (total,), jnp.float32)
    else:
        keys = jax.random.split(key, -(-total // NORMAL_CHUNK))
        flat = jax.lax.map(lambda k: jax.random.normal(k, (NORMAL_CHUNK,), jnp.float32), keys).reshape(-1)
    offsets = iter(zip(wanted, itertools.accumulate(sizes[:-1], initial=0), sizes))

    def replay(shape, std):
        expected, start, size = next(offsets)
        assert expected == tuple(shape), (expected, shape)  # build must ask in the same order both times
        return std * flat[start:start + size].reshape(shape)

    return build(replay)


def tower_init(build: Callable[[Normal, Any], Params],
               stacks: tuple[str, ...] = ("encoder",)) -> Callable[..., Params]:
    """The jitted init(key, config, *, stacked=False) -> params of a tower whose params build(normal, config)
    declares, the top-level entries named in `stacks` holding per-layer stacks (a leading depth axis; () for a
    tower without one)."""
    @functools.partial(jax.jit, static_argnames=("stacked",))
    def init(key: jax.Array, config, *, stacked: bool = False) -> Params:
        """Random params for the tower, as its build initialises them; each stack a tuple of per-layer dicts,
        or with stacked=True one dict with a leading depth axis."""
        params = init_params(key, lambda normal: build(normal, config))
        return params if stacked else {**params, **{name: unstack_layers(params[name]) for name in stacks}}

    return init


def dense_init(normal: Normal, d_in: int, d_out: int, std: float, bias: bool = True, depth: tuple = ()) -> Params:
    p = {"kernel": normal((*depth, d_in, d_out), std)}
    if bias:
        p["bias"] = jnp.zeros((*depth, d_out), jnp.float32)
    return p


def layer_norm_init(dim: int, depth: tuple = ()) -> Params:
    return {"scale": jnp.ones((*depth, dim), jnp.float32), "bias": jnp.zeros((*depth, dim), jnp.float32)}


def xavier_stds(hidden: int, intermediate: int) -> tuple[float, float, float, float]:
    """Glorot-scaled stds of an encoder's q/k/v, out, fc1 and fc2 kernels (SigLIP's xavier init, as normals)."""
    square, wide = (1.0 / hidden) ** 0.5, (2.0 / (hidden + intermediate)) ** 0.5
    return (square, square, wide, wide)


def clip_init_stds(hidden: int, depth: int, factor: float) -> tuple[float, float, float, float]:
    """transformers' CLIP init of an encoder's q/k/v, out, fc1 and fc2 kernels (scaled by width and depth)."""
    qkv = hidden ** -0.5 * (2 * depth) ** -0.5 * factor
    return (qkv, hidden ** -0.5 * factor, (2 * hidden) ** -0.5 * factor, qkv)
