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
