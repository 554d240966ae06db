"""The training checkpoint format written before orbax: `state.safetensors`, one tensor per leaf of the train
state (frozen params included) named by its pytree path as jax.tree_util.keystr writes it, gathered to process 0.
Still read, and written on request (dualenc.train.checkpoint.save_state's format "safetensors")."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError
from dualenc.params import check_tree
from dualenc.train.optimizer import ClippedAdamWState
from dualenc.train.sharding import host_array
from dualenc.train.state import TrainState

FILE = "state.safetensors"


def _names(state) -> list[tuple[str, Any]]:
    """The safetensors format's names: each leaf's pytree path as jax.tree_util.keystr writes it."""
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)]


def arrays(state: TrainState) -> dict[str, np.ndarray]:
    """{name: whole value on this host} of every leaf (every process must call it: sharded leaves are gathered)."""
    return {name: host_array(leaf) for name, leaf in _names(state)}


def read(path: str, template: TrainState) -> TrainState:
    """The state in a state.safetensors file, in the structure, dtypes and shardings of `template`, strictly."""
    tensors, _ = files.read_safetensors(path)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    names = [name for name, _ in _names(template)]
    if isinstance(template.opt_state, ClippedAdamWState):
        tensors = _from_optax_chain(tensors, path)
    check_tree({n: tuple(np.shape(leaf)) for n, leaf in zip(names, leaves)},
               {n: tuple(a.shape) for n, a in tensors.items()},
               f"{os.path.dirname(path)} does not match this training setup", noun="leaf", error=CheckpointError)
    restored = []
    for name, leaf in zip(names, leaves):
        value = np.asarray(tensors[name], dtype=leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        restored.append(jax.device_put(value, sharding) if sharding is not None else value)
    return jax.tree_util.tree_unflatten(treedef, restored)


def _from_optax_chain(tensors: dict, path: str) -> dict:
    """Checkpoints written before default_optimizer became train.clipped_adamw hold the state of optax's
    chain(clip_by_global_norm, adamw): Adam's count and moments at opt_state[1][0], the schedule's count at
    opt_state[1][2]. The same numbers, renamed; anything else is left for the strict check."""
    old, schedule = ".opt_state[1][0].", ".opt_state[1][2].count"
    if ".opt_state.count" in tensors or old + "count" not in tensors:
        return tensors
    if schedule in tensors and int(tensors[schedule]) != int(tensors[old + "count"]):
        raise CheckpointError(f"{os.path.dirname(path)}: the optimizer's schedule and Adam counts differ "
                              f"({int(tensors[schedule])} and {int(tensors[old + 'count'])})")
    return {(".opt_state." + name[len(old):] if name.startswith(old) else name): value
            for name, value in tensors.items() if name != schedule}
