"""Sharding of the train state and batches over a one-axis ("data") mesh: data parallel, optionally FSDP."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc.train.state import TrainState


def _leaf_spec(shape, size: int, fsdp: bool) -> P:
    """FSDP: shard a leaf's largest axis that the mesh divides; otherwise (and without fsdp) replicate."""
    if fsdp and shape:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % size == 0 and shape[axis] >= size:
                spec = [None] * len(shape)
                spec[axis] = "data"
                return P(*spec)
    return P()


def state_sharding(state: TrainState, mesh: Mesh, fsdp: bool = False):
    """The NamedSharding of every state leaf: replicated, or FSDP-sharded over "data"."""
    size = mesh.shape["data"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _leaf_spec(np.shape(x), size, fsdp)), state)


def shard_state(state: TrainState, mesh: Mesh, fsdp: bool = False) -> TrainState:
    return jax.device_put(state, state_sharding(state, mesh, fsdp))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's rows of the global batch on the mesh, split over "data" (also multi-host)."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def host_array(leaf) -> np.ndarray:
    """A leaf's whole value as a numpy array on this host (gathered from every process when sharded across
    hosts; every process must then call it)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def data_mesh(devices=None) -> Mesh:
    """A one-axis ("data") mesh over all devices of all processes."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))
