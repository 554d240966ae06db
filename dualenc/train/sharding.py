"""Sharding of the train state and batches over a one-axis ("data") mesh: data parallel, optionally FSDP."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc.errors import ConfigError
from dualenc.train.state import TrainState, declared

# Logical axes (dualenc.params.Param.axes) that FSDP may split over the "data" axis. Not: "layers" (a stacked
# encoder's depth, which lax.scan walks), "norm" (LayerNorm vectors), "types" (token types), "channels" and
# "patch" (a patch convolution's input axes).
SHARDED_AXES = frozenset({"vocab", "position", "embed", "mlp", "qkv", "projection", "patch_in"})


@dataclasses.dataclass(frozen=True)
class FSDP:
    """The FSDP rules: a leaf of at least min_shard_mb MiB is split over the mesh's "data" axis along its
    largest axis that the mesh divides among those whose logical axis is in `axes` (any axis, for leaves no
    param declares: optimizer state of other shapes); smaller leaves (LayerNorm vectors, biases) and leaves
    that are not floating point (the step's RNG key, counts) stay replicated. The floor is big_vision's
    min_size_to_shard_mb."""

    min_shard_mb: float = 4.0
    axes: frozenset = SHARDED_AXES

    def __post_init__(self):
        if isinstance(self.min_shard_mb, bool) or not isinstance(self.min_shard_mb, (int, float)) or \
                not self.min_shard_mb >= 0:
            raise ConfigError(f"min_shard_mb must be a non-negative number of MiB, got {self.min_shard_mb!r}")

    def spec(self, path, leaf, size: int) -> P:
        """The PartitionSpec of the state leaf at jax key path `path` on a "data" axis of `size` devices."""
        shape, dtype = np.shape(leaf), np.dtype(getattr(leaf, "dtype", np.float32))
        small = math.prod(shape) * dtype.itemsize < self.min_shard_mb * 2 ** 20
        if not shape or small or not jnp.issubdtype(dtype, jnp.floating):
            return P()  # scalars, what is under the floor, the RNG key and counts
        _, axes = declared().find(path, len(shape))
        allowed = [a for a in range(len(shape)) if axes is None or axes[a] in self.axes]
        for axis in sorted(allowed, key=lambda a: -shape[a]):
            if shape[axis] % size == 0 and shape[axis] >= size:
                return P(*[("data" if a == axis else None) for a in range(len(shape))])
        return P()


def rules(fsdp: bool | FSDP) -> FSDP | None:
    """fsdp as state_sharding takes it: False (replicate everything), True (FSDP's defaults) or FSDP rules."""
    if isinstance(fsdp, FSDP):
        return fsdp
    if not isinstance(fsdp, bool):
        raise ConfigError(f"fsdp must be true, false or train.sharding.FSDP(...), got {fsdp!r}")
    return FSDP() if fsdp else None


def state_sharding(state: TrainState, mesh: Mesh, fsdp: bool | FSDP = False):
    """The NamedSharding of every state leaf: replicated, or with fsdp (True for FSDP's default rules, or an
    FSDP) split over "data" by the params' logical axes with a size floor (see FSDP)."""
    size, how = mesh.shape["data"], rules(fsdp)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, P() if how is None else how.spec(path, x, size)), state)


def shard_state(state: TrainState, mesh: Mesh, fsdp: bool | FSDP = False) -> TrainState:
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
