"""The tower families and the registry that maps a config (or a config.json model_type) to its family.

Each family is declared by its own module (vit, bert, clip_text, siglip, siglip2), in the `FAMILIES` tuple at
its bottom (see dualenc.towers.family.Family). This registry only lists the modules: the dual encoder,
checkpoints, training, evaluation and the CLI find towers through `family(config)` and `config_class(model_type)`.
Adding a family is its module plus one entry in MODULES; `register(module)` adds one at run time.
"""

from __future__ import annotations

from dualenc.errors import ConfigError
from dualenc.towers import bert, chinese_clip, clip_text, convnext, eva, hf_text, resnet, siglip, siglip2, vit, vitamin
from dualenc.towers.family import SIDE_INPUTS, SIDES, Family

__all__ = ["Family", "MODULES", "SIDES", "SIDE_INPUTS", "config_class", "config_classes", "family", "register",
           "stack_names", "type_family", "types", "unregister"]

MODULES = (vit, bert, clip_text, siglip, siglip2, chinese_clip, hf_text, resnet, convnext, eva, vitamin)

FAMILIES: tuple[Family, ...] = ()
_BY_CLASS: dict[type, Family] = {}
_BY_TYPE: dict[str, Family] = {}
# Views of the registry, updated in place by register / unregister (read them through the functions below
# where a later registration matters).
VISION_TYPES: dict[str, type] = {}
TEXT_TYPES: dict[str, type] = {}
SIDE_ALL_INPUTS: dict[str, tuple[str, ...]] = {}  # every input some tower of the side takes
VISION_CONFIGS: tuple[type, ...] = ()
TEXT_CONFIGS: tuple[type, ...] = ()


def _rebuild(families: tuple[Family, ...]) -> None:
    by_class, by_type = {}, {}
    for f in families:
        for model_type, cls in f.configs.items():
            for table, key in ((by_type, model_type), (by_class, cls)):
                other = table.setdefault(key, f)
                if other is not f:
                    raise ConfigError(f"tower family {f.name!r}: {getattr(key, '__name__', key)!r} is already "
                                      f"registered by family {other.name!r}")
    global FAMILIES, VISION_CONFIGS, TEXT_CONFIGS
    FAMILIES = families
    _BY_CLASS.clear(), _BY_CLASS.update(by_class)
    _BY_TYPE.clear(), _BY_TYPE.update(by_type)
    for side, table in (("vision", VISION_TYPES), ("text", TEXT_TYPES)):
        table.clear()
        table.update({t: cls for f in families if f.side == side for t, cls in f.configs.items()})
    SIDE_ALL_INPUTS.clear()
    SIDE_ALL_INPUTS.update({side: tuple(dict.fromkeys(n for f in families if f.side == side for n in f.input_names))
                            for side in SIDES})
    VISION_CONFIGS, TEXT_CONFIGS = config_classes("vision"), config_classes("text")


def _declared(module) -> tuple[Family, ...]:
    families = getattr(module, "FAMILIES", None)
    if not isinstance(families, tuple) or not families or not all(isinstance(f, Family) for f in families):
        raise ConfigError(f"module {getattr(module, '__name__', module)!r} declares no FAMILIES (a tuple of "
                          f"dualenc.towers.Family)")
    return families


def register(module) -> tuple[Family, ...]:
    """Adds the families a module declares (its FAMILIES) to the registry; registering it again does nothing.
    ConfigError when one of its model_types or config classes belongs to another family already."""
    families = _declared(module)
    if all(f in FAMILIES for f in families):
        return families
    _rebuild(FAMILIES + tuple(f for f in families if f not in FAMILIES))
    return families


def unregister(module) -> None:
    """Removes the families a module declares (the inverse of register)."""
    families = _declared(module)
    _rebuild(tuple(f for f in FAMILIES if f not in families))


def family(config) -> Family:
    """The family of a tower config; ConfigError for anything else."""
    try:
        return _BY_CLASS[type(config)]
    except (KeyError, TypeError):
        raise ConfigError(f"{type(config).__name__} is not a tower config; known: "
                          f"{sorted(c.__name__ for c in _BY_CLASS)}") from None


def type_family(model_type: str) -> Family:
    """The family of a config.json model_type; ConfigError for an unknown one."""
    try:
        return _BY_TYPE[model_type]
    except (KeyError, TypeError):
        raise ConfigError(f"{model_type!r} is not a tower model_type; known: {sorted(_BY_TYPE)}") from None


def config_class(model_type: str) -> type:
    """The tower config class of a config.json model_type; ConfigError for an unknown one."""
    return type_family(model_type).configs[model_type]


def types(side: str) -> dict[str, type]:
    """model_type -> config class of the registered towers of a side."""
    return dict(VISION_TYPES if side == "vision" else TEXT_TYPES)


def config_classes(side: str) -> tuple[type, ...]:
    """The config classes of the registered towers of a side."""
    return tuple(dict.fromkeys(cls for f in FAMILIES if f.side == side for cls in f.configs.values()))


def stack_names() -> tuple[str, ...]:
    """Every name a registered family gives a per-layer stack in its params."""
    return tuple(dict.fromkeys(name for f in FAMILIES for name in f.stacks))


for _module in MODULES:
    register(_module)
