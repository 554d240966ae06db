"""The encoder's two param layouts: stacked (one dict, a leading depth axis, run under lax.scan) and per-layer
(a tuple of dicts, run as a loop); and Split, an encoder cut into frozen bottom and trainable top layers."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dualenc.layers.primitives import Params


class Split(NamedTuple):
    """Encoder params in two parts: `frozen` bottom layers (no gradient) and trainable `top` layers."""

    frozen: Params | tuple
    top: Params | tuple


def stack_layers(layer_list) -> Params:
    """Per-layer params (a sequence of dicts) -> one dict with a leading depth axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layer_list)


def unstack_layers(stacked: Params) -> tuple[Params, ...]:
    """The inverse of stack_layers: a tuple of per-layer dicts."""
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(depth))


def num_layers(p) -> int:
    if isinstance(p, Split):
        return num_layers(p.frozen) + num_layers(p.top)
    if isinstance(p, (tuple, list)):
        return len(p)
    return jax.tree_util.tree_leaves(p)[0].shape[0]


def run_blocks(block, stack, x: jax.Array, *, dropout_key=None, drop_path_rates=None, remat_policy=None,
               collect: bool = False) -> tuple[jax.Array, list]:
    """Runs `block(layer_params, x, keep, scale) -> x` over a stack of blocks in any layout: per-layer (a loop),
    stacked (lax.scan) or Split (LiT: the frozen bottom without gradients, then the top).

    With a dropout_key and drop_path_rates (one rate per block), keep is the block's (2, batch) draw of which rows
    keep each of its two residual branches and scale 1 / (1 - rate); both are None otherwise (no drop path).
    remat_policy names a jax.checkpoint_policies policy to recompute each block under. Returns (x, the output of
    every block when collect, else [])."""
    depth, keep, scales = num_layers(stack), None, None
    if dropout_key is not None and drop_path_rates is not None and any(r > 0 for r in drop_path_rates):
        rates = jnp.asarray(drop_path_rates, jnp.float32)
        keep = jax.random.uniform(dropout_key, (depth, 2, x.shape[0])) >= rates[:, None, None]
        scales = 1.0 / (1.0 - rates)

    def step(h, xs):
        layer_p, layer_keep, layer_scale = xs
        h = block(layer_p, h, layer_keep, layer_scale)
        return h, (h if collect else None)

    if remat_policy is not None:
        step = jax.checkpoint(step, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=False)

    def run(part, h, lo, hi):
        part_keep, part_scales = (None, None) if keep is None else (keep[lo:hi], scales[lo:hi])
        if isinstance(part, (tuple, list)):
            states = []
            for i, layer_p in enumerate(part):
                h, state = step(h, (layer_p, None if keep is None else part_keep[i],
                                    None if keep is None else part_scales[i]))
                states.append(state)
            return h, states if collect else []
        h, states = jax.lax.scan(step, h, (part, part_keep, part_scales))
        return h, [states[i] for i in range(states.shape[0])] if collect else []

    if isinstance(stack, Split):
        n = num_layers(stack.frozen)
        x, bottom = run(jax.lax.stop_gradient(stack.frozen), jax.lax.stop_gradient(x), 0, n)
        x, top = run(stack.top, jax.lax.stop_gradient(x), n, depth)
        return x, bottom + top
    return run(stack, x, 0, depth)
