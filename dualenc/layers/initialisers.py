"""Random params from a build function: every normal it asks for cut from one chunked draw (init_params, the draw
being dualenc.params.draw, which the towers' declared specs use too), and the std rules (xavier, CLIP) the towers'
specs declare."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dualenc.layers.primitives import Params
from dualenc.params import NORMAL_CHUNK, draw  # noqa: F401  (layers.NORMAL_CHUNK)

Normal = Callable[[tuple, float], jax.Array]  # normal(shape, std): std * N(0, 1) numbers of that shape



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
    flat = draw(key, total)
    offsets = iter(zip(wanted, itertools.accumulate(sizes[:-1], initial=0), sizes))

    def replay(shape, std):
        expected, start, size = next(offsets)
        assert expected == tuple(shape), (expected, shape)  # build must ask in the same order both times
        return std * flat[start:start + size].reshape(shape)

    return build(replay)


def xavier_stds(hidden: int, intermediate: int) -> tuple[float, float, float, float]:
    """Glorot-scaled stds of an encoder's q/k/v, out, fc1 and fc2 kernels (SigLIP's xavier init, as normals)."""
    square, wide = (1.0 / hidden) ** 0.5, (2.0 / (hidden + intermediate)) ** 0.5
    return (square, square, wide, wide)


def clip_init_stds(hidden: int, depth: int, factor: float) -> tuple[float, float, float, float]:
    """transformers' CLIP init of an encoder's q/k/v, out, fc1 and fc2 kernels (scaled by width and depth)."""
    qkv = hidden ** -0.5 * (2 * depth) ** -0.5 * factor
    return (qkv, hidden ** -0.5 * factor, (2 * hidden) ** -0.5 * factor, qkv)
