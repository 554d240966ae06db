"""The dual encoder's config, and config.json in: a VisionTextDualEncoder, a CLIP, a SigLIP (2), or a single tower.

Tower configs live with their families (dualenc.towers) and are re-exported here; what a model_type means is
its row in dualenc.kinds. Configs are frozen, hashable and static under jit; every field is validated on
construction (see dualenc.fields).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Mapping

import jax

from dualenc import kinds, towers
from dualenc.errors import ConfigError
from dualenc.fields import check_int, fail, int_field
from dualenc.kinds import MODEL_TYPES  # noqa: F401  (re-exported)

# The tower config classes, re-exported by name (dualenc.config.BertConfig, ...) from the registry.
_TOWER_CONFIGS = {cls.__name__: cls for side in towers.SIDES for cls in towers.config_classes(side)}
globals().update(_TOWER_CONFIGS)
__all__ = sorted([*_TOWER_CONFIGS, "DualEncoderConfig", "config_from_dict", "tower_config_from_dict"])

VisionConfig = functools.reduce(operator.or_, towers.config_classes("vision"))  # ViTConfig | CLIPVisionConfig | ...
TextConfig = functools.reduce(operator.or_, towers.config_classes("text"))
# Derived from dualenc.kinds for the code that imports them here.
SIGLIP_TYPES = tuple(t for t, k in kinds.KINDS.items() if k.default_loss == "siglip")
SIGLIP_LOGIT_INIT = kinds.LOGIT_INIT["siglip"]  # big_vision's init of logit_scale and logit_bias


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """A dual encoder: the two towers, the projection size and logit_scale's init.

    model_type says what kind of whole model it is (a row of dualenc.kinds.KINDS): "vision-text-dual-encoder"
    (default) is transformers' VisionTextDualEncoderConfig, any registered towers; "clip" a CLIPConfig (a
    CLIPVisionConfig and a CLIPTextConfig), saved as a CLIPModel; "siglip" a SiglipConfig (SiglipVisionConfig
    with its head + SiglipTextConfig) and "siglip2" a Siglip2Config (the NaFlex Siglip2VisionConfig +
    Siglip2TextConfig). Kinds without projections (SigLIP's) embed with the towers' pooled outputs, so
    projection_dim must equal their size (the vision hidden_size and the text projection_size); kinds whose
    logit rule has a bias always have one.
    logit_bias_init_value adds a learnable logit bias (SigLIP's init: -10, with logit_scale log 10; some
    open_clip models have one too); None, the default, is the plain transformers model.
    """

    vision: VisionConfig
    text: TextConfig
    projection_dim: int = int_field(512)
    logit_scale_init_value: float = kinds.LOGIT_INIT["clip"][0]
    logit_bias_init_value: float | None = None
    model_type: str = "vision-text-dual-encoder"

    def __post_init__(self):
        for side in towers.SIDES:
            classes = towers.config_classes(side)
            if not isinstance(getattr(self, side), classes):
                raise ConfigError(f"DualEncoderConfig: field '{side}' must be one of "
                                  f"{[c.__name__ for c in classes]}, got {type(getattr(self, side)).__name__}")
        check_int("DualEncoderConfig", "projection_dim", self.projection_dim, 1, 1 << 16)
        for name in ("logit_scale_init_value", "logit_bias_init_value"):
            v = getattr(self, name)
            if v is None and name == "logit_bias_init_value":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail("DualEncoderConfig", name, f"must be a finite number, got {v!r}")
        if self.model_type not in kinds.KINDS:
            fail("DualEncoderConfig", "model_type", f"must be one of {list(kinds.KINDS)}, got {self.model_type!r}")
        kind = self.kind
        if kind.towers is not None:
            wanted = {side: towers.config_class(kind.towers[side]) for side in towers.SIDES}
            if not all(type(getattr(self, side)) is wanted[side] for side in towers.SIDES):  # subclasses differ
                fail("DualEncoderConfig", "model_type", f"{self.model_type!r} needs "
                      f"{wanted['vision'].__name__} and {wanted['text'].__name__} towers, got "
                      f"{type(self.vision).__name__} and {type(self.text).__name__}")
        if not getattr(self.vision, "vision_use_head", True):
            fail("DualEncoderConfig", "vision", f"is a {type(self.vision).__name__} with vision_use_head false: "
                  f"it has no pooled output to embed (run the tower alone, or use a config with the head)")
        if not kind.has_projections:
            sizes = {f"{side}.{towers.family(getattr(self, side)).pooled_size}": pooled_size(getattr(self, side))
                     for side in towers.SIDES}
            if set(sizes.values()) != {self.projection_dim}:
                fail("DualEncoderConfig", "projection_dim", f"= {self.projection_dim}, but a {kind.architecture} "
                      f"embeds with its towers' own outputs: {sizes} must all equal it")
        if kind.own_bias and self.logit_bias_init_value is None:
            fail("DualEncoderConfig", "logit_bias_init_value", f"must be set for a {kind.architecture} (it has "
                  f"a logit bias; its {kind.default_loss} loss initialises it at {kind.logit_init[1]})")

    @property
    def kind(self) -> kinds.Kind:
        """What model_type means: its row of dualenc.kinds.KINDS."""
        return kinds.kind(self.model_type)

    @property
    def projections(self) -> bool:
        """Whether the model has visual_projection / text_projection (all but SigLIP's)."""
        return self.kind.has_projections

    @property
    def default_loss(self) -> str:
        """The contrastive loss the model was trained with: "siglip" (sigmoid) for SigLIP, else "clip"."""
        return self.kind.default_loss

    @property
    def text_padding(self) -> str:
        """How texts are padded for it: "max_length" (to the text tower's length, as trained) or "longest"."""
        return self.kind.text_padding or towers.family(self.text).text_padding

    def to_dict(self) -> dict:
        kind = self.kind
        out = {"model_type": self.model_type, "architectures": [kind.architecture]}
        for side in towers.SIDES:
            out[kind.config_keys[side]] = getattr(self, side).to_dict()
        if kind.has_projections:
            out["projection_dim"] = self.projection_dim
        if kind.inits_key:  # the transformers config has no such fields; dualenc keeps its inits under its own key
            out[kind.inits_key] = [self.logit_scale_init_value, self.logit_bias_init_value]
            return out
        out["logit_scale_init_value"] = self.logit_scale_init_value
        if self.logit_bias_init_value is not None:
            out["logit_bias_init_value"] = self.logit_bias_init_value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> "DualEncoderConfig":
        """Builds the config from a config.json dict of one of the kinds (dualenc.kinds.MODEL_TYPES)."""
        where = where or "DualEncoderConfig"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in kinds.KINDS:
            raise ConfigError(f"{where}: field 'model_type' must be one of {list(kinds.KINDS)}, got {model_type!r}")
        kind = kinds.KINDS[model_type]
        tower = {}
        for side in towers.SIDES:
            key = kind.config_keys[side]
            if kind.towers is not None:
                tower[side] = _own_tower(d, key, towers.config_class(kind.towers[side]), where)
                continue
            if d.get(key) is None:
                raise ConfigError(f"{where}: missing field '{key}' (dualenc does not default a tower)")
            tower[side] = tower_config_from_dict(d[key], where=f"{where}: {key}", allowed=towers.types(side))
        if not kind.has_projections:
            projection_dim = pooled_size(tower["text"])
        elif "projection_dim" in d or kind.projection_dim is not None:
            projection_dim = d.get("projection_dim", kind.projection_dim)
        else:
            raise ConfigError(f"{where}: missing field 'projection_dim'")
        if kind.inits_key:
            inits = d.get(kind.inits_key, kind.logit_init)
            if not isinstance(inits, (list, tuple)) or len(inits) != 2:
                raise ConfigError(f"{where}: field '{kind.inits_key}' must be [logit_scale, logit_bias], "
                                  f"got {inits!r}")
            scale, bias = inits
        else:
            scale, bias = d.get("logit_scale_init_value", kind.logit_init[0]), d.get("logit_bias_init_value")
        try:
            return cls(vision=tower["vision"], text=tower["text"], model_type=model_type,
                       projection_dim=projection_dim, logit_scale_init_value=scale, logit_bias_init_value=bias)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def pooled_size(tower) -> int:
    """The width of a tower's pooled output (its family's pooled_size field: a SigLIP text head may change it)."""
    return towers.family(tower).pooled_width(tower)


def _own_tower(d: Mapping[str, Any], key: str, cls, where: str):
    """A tower of a kind with fixed towers (CLIP, SigLIP) as transformers reads its text_config / vision_config:
    missing fields take the defaults (4.x wrote only the differences), and a legacy `*_config_dict` overrides
    every field it implies."""
    sub = d.get(key)
    if sub is not None and not isinstance(sub, Mapping):
        raise ConfigError(f"{where}: field '{key}' must be an object, got {type(sub).__name__}")
    sub = dict(sub or {})
    legacy = d.get(f"{key}_dict")
    if legacy is not None:
        if not isinstance(legacy, Mapping):
            raise ConfigError(f"{where}: field '{key}_dict' must be an object, got {type(legacy).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # transformers rebuilds the whole sub-config from the legacy dict, so its defaults win over `key` too.
        sub = {**{k: v for k, v in sub.items() if k not in known}, **legacy}
        key = f"{key}_dict"
    return cls.from_dict(sub, where=f"{where}: {key}", fill_missing=True)


def _whole_kinds() -> dict[str, kinds.Kind]:
    """The kinds one tower of which can be read alone (those with fixed towers)."""
    return {t: k for t, k in kinds.KINDS.items() if k.towers is not None}


def tower_config_from_dict(d: Mapping[str, Any], *, where: str = "config",
                           allowed: Mapping[str, type] | None = None, side: str = "vision"):
    """The tower config for a config.json dict, chosen by its model_type; never falls back to another tower.

    A whole model of a kind with fixed towers ("clip", "siglip", "siglip2") gives its tower on `side`
    ("vision" by default, or "text"), read as transformers reads it.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    whole = _whole_kinds()
    allowed = allowed or {**towers.types("vision"), **dict.fromkeys(whole), **towers.types("text")}
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in allowed:
        raise ConfigError(f"{where}: field 'model_type' must be one of {sorted(allowed)}, got {model_type!r}")
    if model_type in whole:
        kind = whole[model_type]
        return _own_tower(d, kind.config_keys[side], towers.config_class(kind.towers[side]), where)
    return allowed[model_type].from_dict(d, where=where)


def config_from_dict(d: Mapping[str, Any], *, where: str = "config"):
    """A parsed config.json as the config it describes: a whole model's (its model_type one of dualenc.kinds) or
    a single tower's. Reads nothing: dualenc.load_config reads the file."""
    if isinstance(d, Mapping) and d.get("model_type") in MODEL_TYPES:
        return DualEncoderConfig.from_dict(d, where=where)
    return tower_config_from_dict(d, where=where)
