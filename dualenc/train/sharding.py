"""Sharding of the train state and batches over a mesh: data parallel over its "data" axis, optionally FSDP
(params and optimizer state split over "data") and tensor parallel over a "model" axis, by the params' logical
axes (dualenc.params.Param.axes)."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc.errors import ConfigError
from dualenc.train.state import TrainState, declared

# Logical axes that FSDP may split over the "data" axis. Not: "qkv" (attention's q/k/v outputs and out-projection
# input, which the layer reshapes into heads: split over "data" with fewer heads than devices, XLA cannot carry
# the split through the reshape and replicates the activations, "[SPMD] Involuntary full rematerialization"),
# "layers" (a stacked encoder's depth, which lax.scan walks), "norm" (LayerNorm vectors), "types" (token types),
# "channels" and "patch" (a patch convolution's input axes).
SHARDED_AXES = frozenset({"vocab", "position", "embed", "mlp", "projection", "patch_in"})
# The rows of a table that is looked up and added into the residual stream: FSDP splits such a table along its
# rows or not at all (split along "embed", XLA computes the sum split along "embed" and moves it back with an
# all-to-all per step).
TABLE_ROWS = frozenset({"vocab", "position", "types"})
# Tensor parallelism (Megatron): the logical axis of a leaf split over a mesh axis other than "data". Attention
# heads (q/k/v outputs, the out-projection's input) and the MLP's hidden units; what reads their outputs needs
# no collective until the out-projection and fc2, which sum over "model". Everything else is replicated there.
TENSOR_PARALLEL = {"qkv": "model", "mlp": "model"}


@dataclasses.dataclass(frozen=True)
class FSDP:
    """The FSDP rules: a leaf of at least min_shard_mb MiB is split over the mesh's "data" axis along its
    largest axis that the mesh divides among those whose logical axis is in `axes` (a table's rows only, see
    TABLE_ROWS; any axis, for leaves no param declares: optimizer state of other shapes) and that tensor
    parallelism leaves free; smaller leaves (LayerNorm vectors, biases) and leaves that are not floating point
    (the step's RNG key, counts) stay replicated over "data". The floor is big_vision's min_size_to_shard_mb, on
    the whole leaf."""

    min_shard_mb: float = 4.0
    axes: frozenset = SHARDED_AXES

    def __post_init__(self):
        if isinstance(self.min_shard_mb, bool) or not isinstance(self.min_shard_mb, (int, float)) or \
                not self.min_shard_mb >= 0:
            raise ConfigError(f"min_shard_mb must be a non-negative number of MiB, got {self.min_shard_mb!r}")

    def dim(self, shape: tuple, dtype, axes: tuple | None, size: int, taken: tuple = ()) -> int | None:
        """The dimension of a leaf (shape, dtype, logical axes or None) to split over a "data" axis of `size`
        devices, dimensions `taken` excluded; None to replicate it."""
        if math.prod(shape) * np.dtype(dtype).itemsize < self.min_shard_mb * 2 ** 20:
            return None
        dims = [a for a in range(len(shape)) if a not in taken and (axes is None or axes[a] in self.axes)]
        if axes is not None and any(a in TABLE_ROWS for a in axes):
            dims = [a for a in dims if axes[a] in TABLE_ROWS]
        return next((a for a in sorted(dims, key=lambda a: -shape[a]) if shape[a] >= size and shape[a] % size == 0),
                    None)

    def spec(self, path, leaf, size: int) -> P:
        """The PartitionSpec of the state leaf at jax key path `path` on a "data" axis of `size` devices."""
        return leaf_spec(path, leaf, {"data": size}, self)


def rules(fsdp: bool | FSDP) -> FSDP | None:
    """fsdp as state_sharding takes it: False (replicate everything), True (FSDP's defaults) or FSDP rules."""
    if isinstance(fsdp, FSDP):
        return fsdp
    if not isinstance(fsdp, bool):
        raise ConfigError(f"fsdp must be true, false or train.sharding.FSDP(...), got {fsdp!r}")
    return FSDP() if fsdp else None


def _packed(p) -> bool:
    """Whether a declared param packs several (big_vision: several names) along its last axis: torch's
    MultiheadAttention in_proj, q, k and v side by side, which a contiguous split would cut across."""
    return p is not None and p.bv is not None and len(p.bv) > 1


def leaf_spec(path, leaf, sizes: dict, fsdp: FSDP | None = None) -> P:
    """The PartitionSpec of the state leaf at jax key path `path` on a mesh of axis sizes `sizes` ({"data": n}
    or {"data": n, "model": m}): TENSOR_PARALLEL's axis over "model" where the mesh has one and it divides
    the leaf (at most one dimension), then with fsdp one more dimension over "data" (see FSDP). Leaves that are
    scalars or not floating point are replicated."""
    shape, dtype = np.shape(leaf), np.dtype(getattr(leaf, "dtype", np.float32))
    if not shape or not jnp.issubdtype(dtype, jnp.floating):
        return P()  # scalars, the RNG key and counts
    p, axes = declared().find(path, len(shape))
    parts = [None] * len(shape)
    if axes is not None:
        for a, name in enumerate(axes):
            mesh_axis = TENSOR_PARALLEL.get(name)
            size = sizes.get(mesh_axis, 1)
            if size > 1 and shape[a] % size == 0 and not (_packed(p) and a == len(shape) - 1):
                parts[a] = mesh_axis
                break
    if fsdp is not None:
        a = fsdp.dim(shape, dtype, axes, sizes["data"], taken=tuple(i for i, x in enumerate(parts) if x))
        if a is not None:
            parts[a] = "data"
    return P(*parts) if any(parts) else P()


def state_sharding(state: TrainState, mesh: Mesh, fsdp: bool | FSDP = False):
    """The NamedSharding of every state leaf (the optimizer state follows the params it shadows): replicated
    over "data", or with fsdp (True for FSDP's default rules, or an FSDP) split over "data" by the params'
    logical axes with a size floor (see FSDP); on a mesh with a "model" axis (model_mesh), tensor parallel by
    TENSOR_PARALLEL as well."""
    how, sizes = rules(fsdp), dict(mesh.shape)
    if "data" not in sizes:
        raise ConfigError(f"the mesh needs a 'data' axis, got the axes {tuple(mesh.axis_names)}")
    return jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, leaf_spec(path, x, sizes, how)),
                                            state)


def shard_state(state: TrainState, mesh: Mesh, fsdp: bool | FSDP = False) -> TrainState:
    return jax.device_put(state, state_sharding(state, mesh, fsdp))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's rows of the global batch on the mesh, split over "data" (also multi-host), the
    same on every device of a "model" axis."""
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


def model_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ("data", "model") mesh of data x model devices (default: all devices of all processes, in jax's order,
    so that a "model" group is `model` consecutive devices, on one host where a host holds a multiple of
    `model`): batches split over "data", tensor-parallel leaves over "model" (see state_sharding)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("data", data), ("model", model)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"model_mesh: {name} must be a positive integer, got {n!r}")
    if data * model != len(devices):
        raise ConfigError(f"model_mesh: data x model = {data} x {model} = {data * model} devices, but there are "
                          f"{len(devices)}")
    return Mesh(np.array(devices, dtype=object).reshape(data, model), ("data", "model"))


def check_model_parallel(config, mesh: Mesh) -> None:
    """ConfigError unless the mesh's "model" axis (if any) divides every tower's attention heads: tensor
    parallelism splits q/k/v by whole heads (a split inside a head makes XLA replicate the attention)."""
    model = dict(mesh.shape).get("model", 1)
    for side in ("vision", "text"):
        tower = getattr(config, side, None)
        heads = getattr(tower, "num_attention_heads", None)
        if model > 1 and heads is not None and heads % model:
            raise ConfigError(f"the mesh's model axis has {model} devices, which do not divide the {heads} "
                              f"attention heads of the {side} tower: pick a model axis size that divides them")


def gather(tree, mesh: Mesh):
    """Inside a jitted step, a params tree (the state's trainable or frozen part) constrained to the sharding it
    computes with: FSDP's splits over "data" gathered (an all-gather per leaf, whose gradient is a
    reduce-scatter), tensor parallelism's splits over "model" kept. Without it XLA may instead carry a weight's
    split over "data" into the activations, whose rows are split over "data" too, and move activations between
    devices (all-to-all) in every layer."""
    return jax.lax.with_sharding_constraint(tree, state_sharding(tree, mesh))


_COLLECTIVE = re.compile(r"\s*\S+ = (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"(?:pred|[suf]\d+|bf16)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The collectives of a compiled program's HLO text (jax's `.lower(...).compile().as_text()`, or a train
    step's `step.lower(state, batch)`), in order: (op, the shapes of its results), op one of all-gather,
    all-reduce, reduce-scatter, all-to-all, collective-permute (XLA combines several into one op of a tuple
    shape). XLA's CPU backend has no reduce-scatter: it writes one as an all-reduce whose result each device
    slices."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if m:
            out.append((m.group(2), [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(1))]))
    return out
