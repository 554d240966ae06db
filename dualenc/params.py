"""Each param declared once: path, shape, initialiser, logical axes, checkpoint names, decay and LiT group.

A tower (and the dual encoder around it) lists its params as `Param` records, as jax-llm-examples' llama3
declares its weights with `ArrayInfo`. From that one list come: random init (`init`, one chunked draw), the
abstract shapes (`shape_tree`, `shapes`), the transformers key table (`hf_table`), the big_vision names
(dualenc.formats.big_vision), the weight-decay mask and the LiT groups (dualenc.train) and the sharding rules
(by logical axis, dualenc.train.sharding). `check_tree` is the one strict missing / unexpected / wrong-shape
comparison every loader and checker uses.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import tables
from dualenc.errors import InputError

NORMAL_CHUNK = 1 << 21  # numbers per threefry call (as layers.init_params draws them: the same numbers)
MAX_LISTED = 20

# Groups, for LiT locking: a locked tower freezes what comes before its layers ("embeddings") and, with
# unlocked_layers=k, its bottom layers; its top k layers and what follows them ("head") train. The dual
# encoder's own params ("model": projections, logit scale and bias) always train.
GROUPS = ("embeddings", "layers", "head", "model")


def normal(std: float) -> tuple:
    return ("normal", float(std))


def constant(value: float) -> tuple:
    return ("constant", float(value))


ZEROS, ONES = ("zeros",), ("ones",)


@dataclasses.dataclass(frozen=True)
class Param:
    """One param (or one per layer of a stack), declared once.

    Fields:
      path: where it lives in the params tree; a layered param's path starts with its stack ("encoder").
      shape: one layer's shape for a layered param, else the param's.
      axes: a logical axis name per dimension of shape ("embed", "mlp", "vocab", "norm"...; see
        train.sharding.SHARDED_AXES); a layered param's stack axis is "layers".
      init: normal(std), ZEROS, ONES or constant(value).
      hf: its transformers name relative to the tower (or model), "{i}" for the layer index; None if none.
      hf_kind: the layout transform of tables.TO_PARAM.
      bv: its big_vision name(s) relative to the tower ("{blk}" for the encoder block); several names are
        concatenated on the last axis (a packed in_proj); None if none.
      bv_kind: the layout transform of formats.big_vision.
      decay: weight decay applies (kernels and embedding tables).
      group: one of GROUPS.
      layers: the stack's depth for a layered param (stacked on a leading axis), else None.
      zero_rows: rows set to zero after the draw (torch's padding_idx).
      stack: a layered param's stack is path[:stack] (the per-layer layout holds a tuple of dicts there).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: tuple = ZEROS
    hf: str | None = None
    hf_kind: str = "id"
    bv: tuple[str, ...] | None = None
    bv_kind: str = "id"
    decay: bool = False
    group: str = "embeddings"
    layers: int | None = None
    zero_rows: tuple[int, ...] = ()
    stack: int = 1

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"Param {self.name}: {len(self.axes)} axes {self.axes} for shape {self.shape}")
        if self.group not in GROUPS:
            raise ValueError(f"Param {self.name}: group must be one of {GROUPS}, got {self.group!r}")
        if isinstance(self.bv, str):
            object.__setattr__(self, "bv", (self.bv,))

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The stacked shape: (layers, *shape) for a layered param."""
        return self.shape if self.layers is None else (self.layers, *self.shape)

    @property
    def full_axes(self) -> tuple[str, ...]:
        return self.axes if self.layers is None else ("layers", *self.axes)


# ------------------------------------------------------------------------------------------------ declaring

def dense(path: tuple[str, ...], d_in: int, d_out: int, std: float, axes: tuple[str, str], *,
          hf: str | None = None, sep: str = ".", bias: bool = True, bv: str | tuple[str, ...] | None = None,
          bv_kinds: tuple[str, str] = ("id", "id"), group: str = "embeddings",
          layers: int | None = None) -> list[Param]:
    """A dense layer's kernel (d_in, d_out), N(0, std), and zero bias: a torch Linear's weight (transposed)
    and bias in transformers (sep "_": MultiheadAttention's in_proj_weight / in_proj_bias), flax's kernel and
    bias in big_vision (`bv`: the module's name(s), each ending in "/")."""
    names = (bv,) if isinstance(bv, str) else bv
    out = [Param(path + ("kernel",), (d_in, d_out), axes, normal(std), None if hf is None else f"{hf}{sep}weight",
                 "linear", None if names is None else tuple(n + "kernel" for n in names), bv_kinds[0], True, group,
                 layers)]
    if bias:
        out.append(Param(path + ("bias",), (d_out,), axes[1:], ZEROS, None if hf is None else f"{hf}{sep}bias",
                         "id", None if names is None else tuple(n + "bias" for n in names), bv_kinds[1], False,
                         group, layers))
    return out


def conv(path: tuple[str, ...], channels: int, patch_hw: tuple[int, int], dim: int, std: float, *,
         hf: str | None = None, bias: bool = True, bv: str | None = None) -> list[Param]:
    """A patch convolution's kernel (C, p, p, D), N(0, std), and zero bias: torch Conv2d's weight and bias,
    big_vision's HWIO kernel and bias (`bv`: the module's name, ending in "/")."""
    out = [Param(path + ("kernel",), (channels, *patch_hw, dim), ("channels", "patch", "patch", "embed"),
                 normal(std), None if hf is None else f"{hf}.weight", "conv",
                 None if bv is None else (bv + "kernel",), "conv", True)]
    if bias:
        out.append(Param(path + ("bias",), (dim,), ("embed",), ZEROS, None if hf is None else f"{hf}.bias", "id",
                         None if bv is None else (bv + "bias",)))
    return out


def norm(path: tuple[str, ...], dim: int, *, hf: str | None = None, bv: str | None = None,
         group: str = "embeddings", layers: int | None = None) -> list[Param]:
    """A LayerNorm's scale (ones) and bias (zeros): transformers' weight / bias, big_vision's scale / bias."""
    return [Param(path + (leaf,), (dim,), ("norm",), init, None if hf is None else f"{hf}.{torch}", "id",
                  None if bv is None else (bv + leaf,), "id", False, group, layers)
            for leaf, torch, init in (("scale", "weight", ONES), ("bias", "bias", ZEROS))]


def table(path: tuple[str, ...], rows: int, dim: int, std: float, row_axis: str, *, hf: str | None = None,
          hf_kind: str = "id", bv: str | None = None, bv_kind: str = "id",
          zero_rows: tuple[int, ...] = ()) -> Param:
    """An embedding table (rows, dim), N(0, std), decayed."""
    return Param(path, (rows, dim), (row_axis, "embed"), normal(std), hf, hf_kind, bv, bv_kind, True,
                 "embeddings", zero_rows=zero_rows)


# An encoder layer's params, in the order they are drawn, named for each format.
_LAYER = ("query", "key", "value", "out", "attention_norm", "fc1", "fc2", "mlp_norm")
BIG_VISION_LAYER = dict(query="MultiHeadDotProductAttention_0/query/", key="MultiHeadDotProductAttention_0/key/",
                        value="MultiHeadDotProductAttention_0/value/", out="MultiHeadDotProductAttention_0/out/",
                        attention_norm="LayerNorm_0/", fc1="MlpBlock_0/Dense_0/", fc2="MlpBlock_0/Dense_1/",
                        mlp_norm="LayerNorm_1/")
ATTENTION_BV_KINDS = {"query": ("heads_in", "heads_bias"), "key": ("heads_in", "heads_bias"),
                      "value": ("heads_in", "heads_bias"), "out": ("heads_out", "id")}


def encoder(spec, hf_prefix: str | None, hf_names: Mapping[str, str] | None, *, bv_prefix: str | None = None,
            path: tuple[str, ...] = ("encoder",)) -> list[Param]:
    """An encoder's layers (a layers.EncoderSpec), declared once with a stack axis of spec.num_layers.

    hf_prefix + hf_names[part] names each part ("encoder.layer.{i}." + "attention.self.query"); big_vision's
    names are BIG_VISION_LAYER under bv_prefix (its "{blk}" the block).
    """
    d, m, depth = spec.hidden_size, spec.intermediate_size, spec.num_layers
    qkv_std, out_std, fc1_std, fc2_std = spec.init_stds
    stds = dict(query=qkv_std, key=qkv_std, value=qkv_std, out=out_std, fc1=fc1_std, fc2=fc2_std)
    axes = dict(query=("embed", "qkv"), key=("embed", "qkv"), value=("embed", "qkv"), out=("qkv", "embed"),
                fc1=("embed", "mlp"), fc2=("mlp", "embed"))
    sizes = dict(fc1=(d, m), fc2=(m, d))
    out = []
    for part in _LAYER:
        hf = None if hf_names is None else hf_prefix + hf_names[part]
        bv = None if bv_prefix is None else bv_prefix + BIG_VISION_LAYER[part]
        if part.endswith("norm"):
            out += norm(path + (part,), d, hf=hf, bv=bv, group="layers", layers=depth)
            continue
        attention = part in ATTENTION_BV_KINDS
        where = path + (("attention", part) if attention else ("mlp", part))
        out += dense(where, *sizes.get(part, (d, d)), stds[part], axes[part], hf=hf, bv=bv,
                     bias=spec.qkv_bias or part in ("out", "fc1", "fc2"),
                     bv_kinds=ATTENTION_BV_KINDS.get(part, ("id", "id")), group="layers", layers=depth)
    return out


def under(path: tuple[str, ...], specs: Iterable[Param], *, hf: str = "", bv: str = "") -> list[Param]:
    """The same params under a path prefix, their transformers and big_vision names under name prefixes."""
    return [dataclasses.replace(p, path=path + p.path, hf=None if p.hf is None else hf + p.hf,
                                bv=None if p.bv is None else tuple(bv + n for n in p.bv),
                                stack=p.stack + len(path)) for p in specs]


def regroup(specs: Iterable[Param], group: str) -> list[Param]:
    return [dataclasses.replace(p, group=group) for p in specs]


# ------------------------------------------------------------------------------------------------ views

def tree(specs: Iterable[Param], leaf: Callable[[Param], Any]) -> dict:
    """The nested dict of leaf(p) for every param, at its path."""
    out: dict = {}
    for p in specs:
        node = out
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        if p.path[-1] in node:
            raise ValueError(f"param {p.name} is declared twice")
        node[p.path[-1]] = leaf(p)
    return out


def shape_tree(specs: Iterable[Param]) -> dict:
    """jax.ShapeDtypeStruct leaves (float32, layers stacked): what jax.eval_shape of the stacked init gives."""
    return tree(specs, lambda p: jax.ShapeDtypeStruct(p.full_shape, jnp.float32))


def shapes(specs: Iterable[Param]) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": stacked shape}."""
    return {p.name: p.full_shape for p in specs}


def count(specs: Iterable[Param]) -> int:
    return sum(math.prod(p.full_shape) for p in specs)


def hf_table(specs: Iterable[Param]) -> list[tables.Entry]:
    """The transformers key table of the params that have a transformers name."""
    return [tables.Entry(p.hf, p.path, p.hf_kind) for p in specs if p.hf is not None]


def stack_paths(specs: Iterable[Param]) -> tuple[tuple[str, ...], ...]:
    """The paths of the per-layer stacks (("encoder",), or ("vision", "encoder") in a dual encoder's specs)."""
    return tuple(dict.fromkeys(p.path[:p.stack] for p in specs if p.layers is not None))


# ------------------------------------------------------------------------------------------------ init

def draw(key: jax.Array, n: int) -> jax.Array:
    """(n,) standard normals, traceable: a lax.map over fixed-size threefry chunks (one random-number kernel
    whatever n is: compiling stays quick; layers.init_params draws the same numbers)."""
    if n <= NORMAL_CHUNK:
        return jax.random.normal(key, (n,), jnp.float32)
    keys = jax.random.split(key, -(-n // NORMAL_CHUNK))
    return jax.lax.map(lambda k: jax.random.normal(k, (NORMAL_CHUNK,), jnp.float32), keys).reshape(-1)[:n]


def _made(p: Param, scaled: Callable[[], jax.Array]) -> jax.Array:
    """p's stacked value: scaled() (its normals times its std) with the padding rows zeroed; or its constant."""
    if p.init[0] != "normal":
        return jnp.full(p.full_shape, {"zeros": 0.0, "ones": 1.0}.get(p.init[0], p.init[-1]), jnp.float32)
    out = scaled()
    return out.at[..., np.asarray(p.zero_rows), :].set(0.0) if p.zero_rows else out


def init(key: jax.Array, specs: Sequence[Param], *, stacked: bool = True) -> dict:
    """Random params as the specs declare them, traceable (see tower_init for the jitted form): every normal
    init is a slice of one draw of standard normals (`draw`), in the specs' order.

    stacked=False gives each stack (a layered param's path[:stack], e.g. ("vision", "encoder")) as a tuple of
    per-layer dicts, cut from the stacked arrays: the same numbers in both layouts.
    """
    drawn = [p for p in specs if p.init[0] == "normal"]
    sizes = [math.prod(p.full_shape) for p in drawn]
    flat = draw(key, sum(sizes))
    starts = dict(zip((id(p) for p in drawn), itertools.accumulate(sizes[:-1], initial=0)))

    def leaf(p: Param) -> jax.Array:
        start = starts.get(id(p), 0)
        return _made(p, lambda: p.init[1] * flat[start:start + math.prod(p.full_shape)].reshape(p.full_shape))

    params = tree(specs, leaf)
    return params if stacked else unstack(params, specs)


def unstack(params: dict, specs: Iterable[Param]) -> dict:
    """Stacked params with each stack (see stack_paths) a tuple of per-layer dicts instead."""
    out = dict(params)
    for path in stack_paths(specs):
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        stack = node[path[-1]]
        depth = jax.tree_util.tree_leaves(stack)[0].shape[0]
        node[path[-1]] = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], stack) for i in range(depth))
    return out


def build(normal: Callable[[tuple, float], jax.Array], specs: Sequence[Param]) -> dict:
    """The stacked params with each normal init asked of normal(shape, std), in the specs' order (the
    `build(normal, config)` of layers.init_params, for code that composes towers that way)."""
    return tree(specs, lambda p: _made(p, lambda: normal(p.full_shape, p.init[1])))


def tower_init(specs_of: Callable[[Any], Sequence[Param]]) -> Callable[..., dict]:
    """init(key, config, *, stacked=False) -> params of a tower whose params specs_of(config) declares: each
    stack a tuple of per-layer dicts, or with stacked=True one dict with a leading depth axis.

    The draw and the stacked params are one jitted program; the per-layer arrays are cut from them after it,
    which keeps that program's outputs few (XLA's compile time grows with them; see benchmarks/README.md).
    """
    @functools.partial(jax.jit, static_argnums=1)
    def stacked_init(key: jax.Array, config) -> dict:
        return init(key, specs_of(config))

    def init_tower(key: jax.Array, config, *, stacked: bool = False) -> dict:
        """Random params for the tower, as its specs initialise them (the same numbers in both layouts)."""
        params = stacked_init(key, config)
        return params if stacked else unstack(params, specs_of(config))

    return init_tower


# ------------------------------------------------------------------------------------------------ by path

def path_keys(path) -> tuple:
    """A jax key path as plain keys: dict keys, sequence indices (ints), attribute names."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


class Catalogue:
    """Params found by where they sit in any tree that holds params, without the config: a params dict in
    either layer layout, a train state's trainable and frozen parts, an optimizer's moments.

    specs: declarations covering every name that may occur (configs with every optional part), whose first
    path keys (the roots) mark where a params tree starts inside a larger tree.
    """

    def __init__(self, specs: Iterable[Param]):
        self._by_name: dict[str, list[Param]] = {}
        for p in specs:
            self._by_name.setdefault(p.name, []).append(p)
        self._roots = {name.split("/")[0] for name in self._by_name}

    def find(self, path, ndim: int) -> tuple[Param | None, tuple[str, ...] | None]:
        """(the declaration, the leaf's logical axes) of the leaf at jax key path `path` with `ndim` dims; a
        layered param's leaf is one layer (found under a layer index) or the stack. (None, None) if none."""
        keys = path_keys(path)
        start = next((i for i, k in enumerate(keys) if isinstance(k, str) and k in self._roots), None)
        if start is None:
            return None, None
        rest = keys[start:]
        per_layer = any(isinstance(k, int) for k in rest)
        for p in self._by_name.get("/".join(str(k) for k in rest if not isinstance(k, int)), ()):
            axes = p.full_axes if p.layers is not None and not per_layer else p.axes
            if len(axes) == ndim:
                return p, axes
        return None, None


# ------------------------------------------------------------------------------------------------ strict checks

def listed(names: Iterable[str], sort: bool = True) -> str:
    """Names for a message, MAX_LISTED at most (sorted, or in the order given)."""
    names = sorted(names) if sort else list(names)
    more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], *, noun: str = "",
             also_wrong: Iterable[str] = ()) -> str | None:
    """What differs between two {name: shape} tables, in one line, or None.

    "missing ...; unexpected ...; ... of the wrong shape ..." each listed in the tables' order (MAX_LISTED
    names at most); with a noun ("tensor"), each part counts them: "missing 2 tensor(s): a, b". also_wrong:
    other mis-made entries, already described ("name of dtype int8 (expected floating point)").
    """
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    wrong = [f"{n} {_show(got[n])} (expected {_show(want)})" for n, want in expected.items()
             if n in got and got[n] != want] + list(also_wrong)
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            names = listed(items, sort=False)
            parts.append(f"{label} {len(items)} {noun}(s): {names}" if noun else f"{label} {names}")
    if wrong:
        names = listed(wrong, sort=False)
        parts.append(f"{len(wrong)} {noun}(s) of the wrong shape or dtype: {names}" if noun
                     else f"wrong shape {names}")
    return "; ".join(parts) or None


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_tree(expected: Mapping[str, Any], got: Mapping[str, Any], where: str, *, noun: str = "",
               error: type[Exception] = InputError, also_wrong: Iterable[str] = ()) -> None:
    """Raises error(f"{where}: {what differs}") unless the two {name: shape} tables agree (see mismatch)."""
    problem = mismatch(expected, got, noun=noun, also_wrong=also_wrong)
    if problem:
        raise error(f"{where}: {problem}")
