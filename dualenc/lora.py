"""LoRA: low-rank adapters of a dual encoder's encoder kernels, as their own pytree, merged into the params.

An adapted kernel W (in, out) computes with W + (alpha / rank) * a @ b, a (in, rank) and b (rank, out): PEFT's
LoraConfig(r=rank, lora_alpha=alpha) with lora_A.weight = a.T and lora_B.weight = b.T (dualenc.formats.peft
reads and writes its files). The adapters mirror the params' paths: {side: {"encoder": ...}} with, where the
params' encoder is a tuple of per-layer dicts, a tuple of {"attention": {"query": {"a", "b"}, ...}, "mlp":
{"fc1": {"a", "b"}, ...}} and, where it is stacked, one such dict whose leaves carry the leading depth axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from dualenc import layers, model, towers
from dualenc.config import DualEncoderConfig
from dualenc.errors import ConfigError, InputError
from dualenc.params import Param

ATTENTION = ("query", "key", "value", "out")
MLP = ("fc1", "fc2")
PARTS = ATTENTION + MLP
TARGETS = {"attention": ATTENTION, "mlp": MLP, "both": PARTS}
GROUP = {**dict.fromkeys(ATTENTION, "attention"), **dict.fromkeys(MLP, "mlp")}  # where a part sits in a layer


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoRA:
    """Which kernels take low-rank adapters, and their rank and scale; static and hashable (a jit argument).

    Fields:
      rank: the adapters' rank r (PEFT's `r`), at least 1.
      alpha: PEFT's `lora_alpha`; the update is scaled by alpha / rank.
      targets: "attention" (the query, key, value and output projections of every encoder layer), "mlp"
        (fc1 and fc2), "both", or a tuple of those part names ("query", "value").
      towers: the sides adapted, ("vision", "text") or one of them (a bare name is read as a 1-tuple).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = "both"
    towers: tuple[str, ...] = towers.SIDES

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA: field 'rank' must be an integer of at least 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA: field 'alpha' must be a positive finite number, got {self.alpha!r}")
        targets = self.targets
        if isinstance(targets, str):
            if targets not in TARGETS:
                raise ConfigError(f"LoRA: field 'targets' must be one of {list(TARGETS)} or a tuple of "
                                  f"{list(PARTS)}, got {targets!r}")
        else:
            targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
            unknown = [t for t in targets if t not in PARTS]
            if unknown or not targets or len(set(targets)) != len(targets):
                raise ConfigError(f"LoRA: field 'targets' must be one of {list(TARGETS)} or a tuple of distinct "
                                  f"names among {list(PARTS)}, got {self.targets!r}")
            object.__setattr__(self, "targets", targets)
        sides = (self.towers,) if isinstance(self.towers, str) else tuple(self.towers) \
            if isinstance(self.towers, (tuple, list)) else None
        if not sides or any(s not in towers.SIDES for s in sides) or len(set(sides)) != len(sides):
            raise ConfigError(f"LoRA: field 'towers' must name distinct sides among {list(towers.SIDES)}, got "
                              f"{self.towers!r}")
        object.__setattr__(self, "towers", tuple(s for s in towers.SIDES if s in sides))

    @property
    def parts(self) -> tuple[str, ...]:
        """The adapted parts of each layer, in PARTS' order."""
        chosen = TARGETS[self.targets] if isinstance(self.targets, str) else self.targets
        return tuple(p for p in PARTS if p in chosen)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def specs(config: DualEncoderConfig, lora: LoRA) -> tuple[Param, ...]:
    """The declarations (dualenc.params.Param: stacked path, one layer's shape, depth) of the adapted kernels,
    in the model's order. ConfigError when a tower of lora.towers has none of lora's targets."""
    if not isinstance(config, DualEncoderConfig):
        raise ConfigError(f"LoRA needs a DualEncoderConfig, got {type(config).__name__}")
    if not isinstance(lora, LoRA):
        raise ConfigError(f"lora must be a dualenc.lora.LoRA, got {type(lora).__name__}")
    out = [p for p in model.specs(config) if p.path[0] in lora.towers and _part(p) in lora.parts]
    for side in lora.towers:
        if not any(p.path[0] == side for p in out):
            tower = getattr(config, side)
            raise ConfigError(f"LoRA: field 'towers' names {side!r}, but its {type(tower).__name__} "
                              f"({towers.family(tower).name}) has no encoder kernels among targets "
                              f"{list(lora.parts)}")
    return tuple(out)


def _part(p: Param) -> str | None:
    """The part name of an encoder layer's kernel ("query", "fc1"...), or None for any other param."""
    rest = p.path[p.stack:]
    if p.layers is None or len(rest) != 3 or rest[2] != "kernel" or GROUP.get(rest[1]) != rest[0]:
        return None
    return rest[1]


def targets(config: DualEncoderConfig, lora: LoRA) -> tuple[tuple[str, ...], ...]:
    """The param paths of the adapted kernels, as in the stacked layout: ("vision", "encoder", "attention",
    "query", "kernel"), ...; each stands for that kernel in every layer."""
    return tuple(p.path for p in specs(config, lora))


def init(key: jax.Array, params: dict, config: DualEncoderConfig, lora: LoRA) -> dict:
    """New adapters for params (either layer layout; the adapters take the same): a drawn as PEFT draws
    lora_A (kaiming-uniform with a = sqrt(5): uniform in +-1 / sqrt(in)), b zeros, so merge(params, init(...))
    equals params. The a's are slices of one uniform draw, in the order of `targets`: the same numbers in
    both layouts."""
    for p in specs(config, lora):
        _check_kernel(params, p)
    per_layer = {side: isinstance(params[side][stack], (tuple, list))
                 for side, stack in {p.path[:p.stack] for p in specs(config, lora)}}
    return _draw(key, config, lora, tuple(sorted(per_layer.items())))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, config: DualEncoderConfig, lora: LoRA, per_layer: tuple) -> dict:
    """init's adapters, one program (one random-number kernel: XLA compiles each apart): stacked, then cut per
    layer for the sides per_layer marks True."""
    chosen = specs(config, lora)
    sizes = [p.layers * p.shape[0] * lora.rank for p in chosen]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out: dict = {}
    start = 0
    for p, size in zip(chosen, sizes):
        d_in, d_out = p.shape
        a = flat[start:start + size].reshape(p.layers, d_in, lora.rank) / math.sqrt(d_in)
        start += size
        node = out
        for k in p.path[:-2]:
            node = node.setdefault(k, {})
        node[p.path[-2]] = {"a": a, "b": jnp.zeros((p.layers, lora.rank, d_out), jnp.float32)}
    cut = dict(per_layer)
    return {side: {name: layers.unstack_layers(stack) if cut[side] else stack for name, stack in tower.items()}
            for side, tower in out.items()}


def _check_kernel(params: dict, p: Param) -> None:
    side, stack = p.path[:p.stack]
    rest = p.path[p.stack:]
    try:
        encoder = params[side][stack]
        if isinstance(encoder, (tuple, list)):
            ok = len(encoder) == p.layers and {tuple(jnp.shape(_at(layer, rest))) for layer in encoder} == {p.shape}
        else:
            ok = tuple(jnp.shape(_at(encoder, rest))) == p.full_shape
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise InputError(f"params do not match the config at {'/'.join(p.path)}: expected {p.layers} layers of "
                         f"{p.shape} kernels")


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def like(adapters: dict, params: dict) -> dict:
    """adapters with each encoder in the layer layout params' has (a tuple of per-layer dicts, or stacked)."""
    out = {}
    for side, tower in adapters.items():
        if not isinstance(tower, dict) or not isinstance(params.get(side), dict):
            raise InputError(f"adapters: {side!r} is not a tower of the params")
        out[side] = {}
        for name, stack in tower.items():
            if name not in params[side]:
                raise InputError(f"adapters: {side}/{name} is not in the params")
            base = params[side][name]
            per_layer = isinstance(base, (tuple, list))
            if per_layer and isinstance(stack, dict):
                stack = layers.unstack_layers(stack)
            elif not per_layer and isinstance(stack, (tuple, list)):
                stack = layers.stack_layers(stack)
            out[side][name] = stack
    return out


def merge(params: dict, adapters: dict, lora: LoRA) -> dict:
    """params with each adapted kernel W replaced by W + (alpha / rank) * a @ b, in W's dtype and layout.

    Traceable: under jax.jit and jax.grad (differentiating with respect to the adapters trains a and b alone,
    the params staying as given); adapters of the other layer layout are converted to params'.
    """
    out = dict(params)
    for side, tower in like(adapters, params).items():
        out[side] = dict(params[side])
        for name, stack in tower.items():
            base, where = params[side][name], f"{side}/{name}"
            if isinstance(base, (tuple, list)):
                if len(stack) != len(base):
                    raise InputError(f"adapters: {where} has {len(stack)} layers, the params {len(base)}")
                out[side][name] = type(base)(_merge_layer(p, a, lora, f"{where}/{i}")
                                             for i, (p, a) in enumerate(zip(base, stack)))
            else:
                out[side][name] = _merge_layer(base, stack, lora, where)
    return out


def _merge_layer(p: dict, adapters: dict, lora: LoRA, where: str) -> dict:
    out = dict(p)
    for group, parts in adapters.items():
        if group not in ("attention", "mlp") or not isinstance(parts, dict) or not isinstance(p.get(group), dict):
            raise InputError(f"adapters: {where}/{group} is not an attention or mlp block of the params")
        out[group] = dict(p[group])
        for part, ab in parts.items():
            here = f"{where}/{group}/{part}"
            if GROUP.get(part) != group or part not in p[group] or not isinstance(ab, dict) or set(ab) != {"a", "b"}:
                raise InputError(f"adapters: {here} must be {{'a', 'b'}} of an adapted kernel of the params")
            kernel, a, b = p[group][part]["kernel"], ab["a"], ab["b"]
            if a.shape[-1] != lora.rank or b.shape[-2] != lora.rank or \
                    a.shape[:-1] + b.shape[-1:] != kernel.shape or a.shape[:-2] != b.shape[:-2]:
                raise InputError(f"adapters: {here} a {a.shape} and b {b.shape} do not make a rank-{lora.rank} "
                                 f"update of the kernel {kernel.shape}")
            delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
            out[group][part] = {**p[group][part], "kernel": kernel + (lora.scale * delta).astype(kernel.dtype)}
    return out


def count(adapters: Any) -> int:
    """How many numbers the adapters hold (arrays or jax.ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(adapters))
