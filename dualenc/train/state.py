"""The train state: trainable and frozen params (LiT locking), the optimizer state, the step's key."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import layers, model, params as declare, towers
from dualenc.errors import ConfigError

TOWERS = ("vision", "text")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    trainable: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array  # uint32 key data, so the state is plain arrays


def check_locking(locked: Sequence[str], unlocked_layers: int):
    locked = tuple(locked)
    if any(t not in TOWERS for t in locked) or len(set(locked)) != len(locked):
        raise ConfigError(f"locked must name towers among {TOWERS}, got {locked!r}")
    if isinstance(unlocked_layers, bool) or not isinstance(unlocked_layers, int) or unlocked_layers < 0:
        raise ConfigError(f"unlocked_layers must be a non-negative integer, got {unlocked_layers!r}")
    if unlocked_layers and not locked:
        raise ConfigError("unlocked_layers needs a locked tower")
    return locked


def declared() -> declare.Catalogue:
    """Every param any registered family (with every optional part) and the dual encoder declare, found by
    path in params trees and train states: what the decay mask, the LiT groups and the sharding rules read."""
    families = towers.FAMILIES
    key = tuple(map(id, families))
    if key not in _CATALOGUES:
        _CATALOGUES.clear()  # the registry changed: one catalogue at a time
        _CATALOGUES[key] = (families, _catalogue(families))
    return _CATALOGUES[key][1]


_CATALOGUES: dict[tuple, tuple] = {}  # registry (by the ids of its families) -> (families, catalogue)


def _catalogue(families) -> declare.Catalogue:
    specs = []
    for f in families:
        for cls in dict.fromkeys(f.configs.values()):
            specs += declare.under((f.side,), f.module.specs(cls()))
    projections = {name: (1, 1) for name in model.PROJECTIONS.values()}
    return declare.Catalogue(specs + model.own_specs(projections, True, 0.0, 0.0))


def groups(side: str, tower: dict) -> dict[str, str]:
    """{top-level name: its group} of a tower's params (see dualenc.params.GROUPS)."""
    catalogue, out = declared(), {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tower):
        p, _ = catalogue.find((jax.tree_util.DictKey(side),) + tuple(path), np.ndim(leaf))
        if p is None:
            raise ConfigError(f"{side}/{jax.tree_util.keystr(path)}: no tower family declares this param (a "
                              f"family's specs(config) must list it)")
        name = declare.path_keys(path)[0]
        if out.setdefault(name, p.group) != p.group:
            raise ConfigError(f"{side}/{name} holds params of the groups {out[name]} and {p.group}")
    return out


def _take_layers(encoder, start: int, stop: int | None):
    if isinstance(encoder, (tuple, list)):
        return tuple(encoder[start:stop])
    return jax.tree_util.tree_map(lambda x: x[start:stop], encoder)


def partition(params: dict, locked: Sequence[str] = (), unlocked_layers: int = 0) -> tuple[dict, dict]:
    """Splits params into (trainable, frozen). A locked tower is frozen except, with unlocked_layers=k, its
    top k encoder layers and what follows them (its "head" group: final norm, pooler); what comes before (the
    "embeddings" group) stays frozen (see dualenc.params.GROUPS). Projections and logit scale/bias train.
    Works on either layer layout (stacked, or per-layer tuples)."""
    locked = check_locking(locked, unlocked_layers)
    trainable, frozen = {}, {}
    for name, value in params.items():
        if name not in locked:
            trainable[name] = value
        elif unlocked_layers == 0:
            frozen[name] = value
        else:
            group = groups(name, value)
            if "layers" not in group.values():
                raise ConfigError(f"unlocked_layers={unlocked_layers}: the {name} tower has no stack of identical "
                                  f"layers to unlock the top of (a convolutional tower's stages); lock it whole "
                                  f"(unlocked_layers=0) or leave it unlocked")
            frozen[name] = {k: v for k, v in value.items() if group[k] == "embeddings"}
            trainable[name] = {k: v for k, v in value.items() if group[k] not in ("embeddings", "layers")}
            for stack in (k for k in value if group[k] == "layers"):
                depth = layers.num_layers(value[stack])
                if unlocked_layers > depth:
                    raise ConfigError(f"unlocked_layers={unlocked_layers} exceeds the {depth} layers of the "
                                      f"{name} tower")
                cut = depth - unlocked_layers
                frozen[name][stack] = _take_layers(value[stack], 0, cut)
                trainable[name][stack] = _take_layers(value[stack], cut, None)
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict, split: bool) -> dict:
    out = {}
    for name in sorted(set(trainable) | set(frozen)):
        if name in trainable and name in frozen:  # a partly unlocked tower: its stacks are in both parts
            tower = {**frozen[name], **trainable[name]}
            for stack in set(frozen[name]) & set(trainable[name]):
                bottom, top = frozen[name][stack], trainable[name][stack]
                if split:
                    tower[stack] = layers.Split(bottom, top)
                elif isinstance(bottom, (tuple, list)):
                    tower[stack] = tuple(bottom) + tuple(top)
                else:
                    tower[stack] = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), bottom, top)
            out[name] = tower
        else:
            out[name] = trainable[name] if name in trainable else frozen[name]
    return out


ADAPTERS = "lora"  # with LoRA, the trainable params are {ADAPTERS: adapters}; the frozen ones, every param


def model_params(trainable: dict, frozen: dict, lora=None, *, split: bool = True) -> dict:
    """The params the model runs with: trainable and frozen merged (see merge_params) or, with LoRA, the frozen
    params with the adapters merged into their kernels (dualenc.lora.merge)."""
    if lora is not None:
        from dualenc import lora as lora_

        return lora_.merge(frozen, trainable[ADAPTERS], lora)
    return merge_params(trainable, frozen, split=split)


def full_params(state: TrainState, lora=None, trainable: dict | None = None) -> dict:
    """The whole params tree of a train state (for save_pretrained, evaluation), per-layer as init returns it;
    with LoRA (the run's dualenc.lora.LoRA) its adapters merged in. trainable: other trainable params of the
    same structure to use instead of the state's (an average of them, say)."""
    trainable = state.trainable if trainable is None else trainable
    return model.unstack_layers(model_params(trainable, state.frozen, lora, split=False))


def init_state(params: dict, optimizer, *, locked: Sequence[str] = (), unlocked_layers: int = 0,
               seed: int = 0, layer_loop: bool = True, lora=None, config=None) -> TrainState:
    """A train state: the optimizer state covers the trainable params only.

    layer_loop keeps each encoder layer's params (and gradients) as buffers of their own, run as a Python
    loop instead of lax.scan: on CPU a BERT-base backward runs about 25% faster, for a longer compile.
    layer_loop=False trains the stacked layout.

    lora: a dualenc.lora.LoRA (with the model's `config`): every param is frozen and the trainable params are
    new adapters, {"lora": dualenc.lora.init(...)} drawn from the seed (PEFT's init: merged, they change
    nothing); locked and unlocked_layers must then be left unset.
    """
    params = model.with_layout(params, stacked=not layer_loop)
    key = jax.random.key(seed)
    if lora is not None:
        if locked or unlocked_layers:
            raise ConfigError("lora trains adapters of the towers lora.towers names, every other param frozen: "
                              "leave locked and unlocked_layers unset")
        if config is None:
            raise ConfigError("init_state with lora needs the model's config")
        from dualenc import lora as lora_

        trainable = {ADAPTERS: lora_.init(jax.random.fold_in(key, 1), params, config, lora)}
        frozen = params
    else:
        trainable, frozen = partition(params, locked, unlocked_layers)
    trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), trainable)  # the step donates these
    return TrainState(jnp.zeros((), jnp.int32), trainable, jax.tree_util.tree_map(jnp.asarray, frozen),
                      optimizer.init(trainable), jax.random.key_data(key))
