"""The default optimizer: AdamW after global-norm clipping, warmup + cosine, decay where the params declare it."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.params import path_keys
from dualenc.train.state import ADAPTERS, TOWERS, declared


def decay_mask(params: dict) -> dict:
    """Weight decay where the params' declarations say (dualenc.params.Param.decay): on kernels and embedding
    tables only, not biases, norms, class tokens, probes, logit scale/bias. params: a params tree or a part of
    one (the trainable params), in either layer layout. LoRA's adapters (the trainable params {"lora": ...} of
    train.init_state(..., lora=...)) all decay, as transformers' Trainer decays PEFT's lora_A and lora_B."""
    catalogue = declared()

    def decays(path, leaf):
        if path and getattr(path[0], "key", None) == ADAPTERS:
            return True
        p, _ = catalogue.find(path, np.ndim(leaf))
        if p is None:
            raise InputError(f"decay_mask: no tower family or model declares the param at "
                             f"{jax.tree_util.keystr(path)}")
        return p.decay
    return jax.tree_util.tree_map_with_path(decays, params)


def layer_scales(params: dict, decay: float, depths: Mapping[str, int] | None = None) -> dict:
    """Layer-wise learning-rate decay (BEiT's; timm's param_groups_layer_decay, whose lr_scale multiplies the
    whole AdamW step, decoupled weight decay included): each leaf's factor decay ** (depth + 1 - layer_id), per
    tower with its own depth, layer_id being 0 for the tower's "embeddings" group, i + 1 for encoder layer i and
    depth + 1 (factor 1) for its "head" group; the dual encoder's own params (projections, logit scale and bias)
    take 1. The groups are the params' declarations (dualenc.params.GROUPS); LoRA's adapters ({"lora": ...})
    take the factor of the kernel they adapt.

    Args:
      params: a params tree or its trainable part, in either layer layout.
      decay: the factor per layer, in (0, 1].
      depths: {tower: its number of encoder layers}, for params that hold only a tower's top layers (the
        trainable part with LiT's unlocked_layers); by default the layers the params hold.

    Returns:
      The params' tree of factors: a float per leaf, or for a stacked layout's layers a float32 array (depth,
      1, ..., 1) of the ndim of the leaf, a factor per layer.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ConfigError(f"layer_decay must be a number in (0, 1], got {decay!r}")
    catalogue = declared()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    found = []
    for path, leaf in leaves:
        where = path[1:-1] + (jax.tree_util.DictKey("kernel"),) if path_keys(path[:1]) == (ADAPTERS,) else path
        p, _ = catalogue.find(where, np.ndim(leaf))
        if p is None:
            raise InputError(f"layer_decay: no tower family or model declares the param at "
                             f"{jax.tree_util.keystr(path)}")
        index = next((k for k in path_keys(path) if isinstance(k, int)), None)
        found.append((p, index, np.shape(leaf)))
    held = {}  # tower -> the layers the params hold
    for p, index, shape in found:
        if p.group == "layers":
            held[p.path[0]] = max(held.get(p.path[0], 0), index + 1 if index is not None else shape[0])
    depth = {side: held.get(side, 0) for side in TOWERS}
    for side, n in (depths or {}).items():
        if side not in depth or isinstance(n, bool) or not isinstance(n, int) or n < held.get(side, 0):
            raise ConfigError(f"layer_decay: depths must map towers among {TOWERS} to their number of layers "
                              f"(at least the {held.get(side, 0)} the params hold), got {side!r}: {n!r}")
        depth[side] = n

    def factor(p, index, shape):
        if p.group in ("head", "model"):
            return 1.0
        d = depth[p.path[0]]
        if p.group == "embeddings":
            return float(decay ** (d + 1))
        first = d - held[p.path[0]]  # the params hold the tower's top layers
        if index is not None:
            return float(decay ** (d - first - index))
        ids = first + np.arange(shape[0])
        return (decay ** (d - ids)).astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    return treedef.unflatten([factor(*f) for f in found])


def learning_rate_schedule(learning_rate: float, *, total_steps: int, warmup_steps: int | None = None):
    """The default optimizer's schedule of the update count: linear warmup from 0 over warmup_steps (default
    total_steps // 20, at least 1), then cosine decay to zero at total_steps."""
    import optax

    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    warmup = max(1, total_steps // 20) if warmup_steps is None else warmup_steps
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, total_steps),
                                              max(total_steps, warmup + 1), end_value=0.0)


def default_optimizer(learning_rate: float = 5e-4, *, total_steps: int, warmup_steps: int | None = None,
                      weight_decay: float = 0.1, clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.98,
                      eps: float = 1e-6, layer_decay: float | None = None,
                      depths: Mapping[str, int] | None = None):
    """AdamW with linear warmup and cosine decay to zero, after clipping the global gradient norm (clip_norm
    None: no clipping); with layer_decay, each leaf's step scaled by its layer's factor (see layer_scales, and
    its depths)."""
    import optax

    schedule = learning_rate_schedule(learning_rate, total_steps=total_steps, warmup_steps=warmup_steps)
    scales = None
    if layer_decay is not None:
        layer_scales({}, layer_decay, depths)  # the arguments checked now, not at the first step
        scales = functools.partial(layer_scales, decay=layer_decay, depths=depths)
    return clipped_adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                         clip_norm=clip_norm, scales=scales)


class ClippedAdamWState(NamedTuple):
    count: jax.Array  # int32 scalar: updates taken
    mu: Any  # first moments, shaped as the params
    nu: Any  # second moments


def clipped_adamw(learning_rate: float | Callable, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 1e-4, mask: Any = None, clip_norm: float | None = None,
                  scales: Any = None):
    """The update of optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, b1, b2, eps,
    weight_decay=weight_decay, mask=mask)) as an optax GradientTransformation, written as one expression per
    leaf.

    optax's chain hands whole trees from one transform to the next, and XLA then writes some of them out
    (the clipped gradients, for one): on CPU its update of BERT-base's 110M params took 234 ms a step, this
    one 132 ms (memory traffic, nothing else). The results are optax's to the bit when the gradients are not
    clipped, and within an ulp of them per clipped gradient. learning_rate: a float or a schedule of the step count;
    mask: a tree of bools (or a function of the params giving one) choosing the leaves that decay; scales: a
    tree of factors (floats, or arrays that broadcast against their leaves), or a function of the params giving
    one, multiplying each leaf's step (see layer_scales).
    """
    import optax

    def init(params):
        return ClippedAdamWState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params),
                                 jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        if params is None:
            raise InputError("clipped_adamw needs the params (weight decay): call update(grads, state, params)")
        count = optax.safe_increment(state.count)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decays = mask(params) if callable(mask) else mask
        decays = jax.tree_util.tree_map(lambda _: True, params) if decays is None else decays
        scale = None  # optax divides by the norm, then multiplies by clip_norm: 1 ulp from this, but XLA
        if clip_norm is not None:  # writes a divided gradient out (a divide is not repeated in each fusion)
            norm = optax.tree.norm(grads)
            scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
        correct1, correct2 = 1.0 - b1 ** count, 1.0 - b2 ** count

        factors = scales(params) if callable(scales) else scales

        def leaf(g, mu, nu, p, decay, factor):  # otherwise each step as optax writes it: unclipped, the same bits
            if scale is not None:
                g = g * scale.astype(g.dtype)
            mu = (1.0 - b1) * g + b1 * mu
            nu = (1.0 - b2) * (g ** 2) + b2 * nu
            u = (mu / correct1.astype(mu.dtype)) / (jnp.sqrt(nu / correct2.astype(nu.dtype)) + eps)
            if decay and weight_decay:
                u = u + weight_decay * p
            if factor is None:
                return u * -rate, mu, nu
            return (u * -rate) * jnp.asarray(factor, u.dtype), mu, nu

        treedef = jax.tree_util.tree_structure(params)
        columns = [treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu, params, decays)]
        columns.append([None] * treedef.num_leaves if factors is None else treedef.flatten_up_to(factors))
        out = [leaf(*args) for args in zip(*columns)]
        updates, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return updates, ClippedAdamWState(count, mu, nu)

    return optax.GradientTransformation(init, update)
