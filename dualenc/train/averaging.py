"""Averages of params: an exponential moving average carried in the optimizer's state, and weight-space
interpolation of two models (WiSE-FT)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dualenc.errors import ConfigError, InputError


class EMAState(NamedTuple):
    """with_ema's optimizer state: the wrapped optimizer's, and the moving average of the params."""

    inner: Any  # the wrapped optimizer's state
    ema: Any  # shaped as the params


def with_ema(optimizer, decay: float):
    """optimizer (an optax.GradientTransformation) whose state also carries an exponential moving average of
    the params: after each update, ema <- decay * ema + (1 - decay) * (params + updates), starting from the
    params given to init. The average lives in the optimizer state (EMAState), so it is checkpointed, sharded
    and resumed with it, and the train state is unchanged; ema_params(opt_state) reads it.

    decay: in [0, 1) (0 keeps the latest params). update must be given the params.
    """
    import optax

    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ConfigError(f"with_ema: decay must be a number in [0, 1), got {decay!r}")
    decay = float(decay)

    def init(params):
        return EMAState(optimizer.init(params), jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params))

    def update(grads, state, params=None):
        if params is None:
            raise InputError("with_ema needs the params: call update(grads, state, params)")
        updates, inner = optimizer.update(grads, state.inner, params)

        def average(e, p, u):
            return (decay * e + (1.0 - decay) * (p + u)).astype(e.dtype)
        return updates, EMAState(inner, jax.tree_util.tree_map(average, state.ema, params, updates))

    return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Any:
    """The moving average of the params in an optimizer state made by with_ema (also nested in another
    optimizer's state); InputError when it holds none or several."""
    found = [s.ema for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, EMAState))
             if isinstance(s, EMAState)]
    if len(found) != 1:
        raise InputError(f"the optimizer state holds {len(found)} moving averages, not one: make the optimizer "
                         f"with dualenc.train.averaging.with_ema(optimizer, decay)")
    return found[0]


def interpolate(a: Any, b: Any, alpha: float) -> Any:
    """(1 - alpha) * a + alpha * b leaf by leaf, in a's dtypes: WiSE-FT's weight-space ensemble of a model (a,
    zero-shot) and its fine-tuned version (b). alpha 0 gives a, 1 gives b; outside [0, 1] it extrapolates.

    InputError naming the first path where the two trees differ (a key, a layer count, a shape).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"interpolate: alpha must be a finite number, got {alpha!r}")
    left, tree = jax.tree_util.tree_flatten_with_path(a)
    right, other = jax.tree_util.tree_flatten_with_path(b)
    shapes = [{jax.tree_util.keystr(path): jnp.shape(x) for path, x in side} for side in (left, right)]
    for mine, theirs, owner in ((shapes[0], shapes[1], "a"), (shapes[1], shapes[0], "b")):
        for name, shape in mine.items():
            if name not in theirs:
                raise InputError(f"interpolate: the trees differ at {name}: only {owner} has it")
            if shape != theirs[name]:
                raise InputError(f"interpolate: the trees differ at {name}: shape {shape} beside {theirs[name]}")
    if tree != other:
        raise InputError("interpolate: the trees hold the same leaves in different containers")
    alpha = float(alpha)
    return jax.tree_util.tree_map(lambda x, y: ((1.0 - alpha) * x + alpha * y).astype(jnp.result_type(x)), a, b)
