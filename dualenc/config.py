"""The dual encoder's config, and config.json in: a VisionTextDualEncoder, a CLIP, or a single tower.

Tower configs live with their families (dualenc.towers) and are re-exported here. Configs are frozen,
hashable and static under jit; every field is validated on construction (see dualenc.fields).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax

from dualenc.errors import ConfigError
from dualenc.fields import check_int, fail, int_field
from dualenc.towers import TEXT_CONFIGS, TEXT_TYPES, VISION_CONFIGS, VISION_TYPES
from dualenc.towers.bert import BertConfig, RobertaConfig
from dualenc.towers.clip_text import CLIPTextConfig, Siglip2TextConfig, SiglipTextConfig
from dualenc.towers.siglip2 import Siglip2VisionConfig
from dualenc.towers.siglip import SiglipVisionConfig
from dualenc.towers.vit import CLIPVisionConfig, ViTConfig

__all__ = ["BertConfig", "CLIPTextConfig", "CLIPVisionConfig", "DualEncoderConfig", "RobertaConfig",
           "Siglip2TextConfig", "Siglip2VisionConfig", "SiglipTextConfig", "SiglipVisionConfig", "ViTConfig",
           "tower_config_from_dict"]

VisionConfig = ViTConfig | CLIPVisionConfig | SiglipVisionConfig | Siglip2VisionConfig
TextConfig = BertConfig | RobertaConfig | CLIPTextConfig | SiglipTextConfig
# The kinds of whole model dualenc reads and writes: transformers' VisionTextDualEncoderModel (any towers),
# CLIPModel (CLIP vision + CLIP text) and SiglipModel (SigLIP towers, whose own heads replace the projections,
# and a logit bias). model_type says how to save it; the towers say what is computed.
MODEL_TYPES = ("vision-text-dual-encoder", "clip", "siglip", "siglip2")
SIGLIP_TYPES = ("siglip", "siglip2")  # no projections, a logit bias, the sigmoid loss
_TOWERS = {"clip": {"vision_config": CLIPVisionConfig, "text_config": CLIPTextConfig},
           "siglip": {"vision_config": SiglipVisionConfig, "text_config": SiglipTextConfig},
           "siglip2": {"vision_config": Siglip2VisionConfig, "text_config": Siglip2TextConfig}}
_ARCHITECTURES = {"vision-text-dual-encoder": "VisionTextDualEncoderModel", "clip": "CLIPModel",
                  "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
SIGLIP_LOGIT_INIT = (math.log(10.0), -10.0)  # big_vision's init of logit_scale and logit_bias


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """A dual encoder: the two towers, the projection size and logit_scale's init.

    model_type "vision-text-dual-encoder" (default) is transformers' VisionTextDualEncoderConfig; "clip" is a
    CLIPConfig (needs a CLIPVisionConfig and a CLIPTextConfig) and saves as a CLIPModel; "siglip" is a
    SiglipConfig (SiglipVisionConfig with its head + SiglipTextConfig) and "siglip2" a Siglip2Config (the
    NaFlex Siglip2VisionConfig + Siglip2TextConfig). These have no projections: the towers' pooled outputs
    are the embeddings, so projection_dim must equal their size (the vision hidden_size and the text
    projection_size), and they always have a logit bias.
    logit_bias_init_value adds a learnable logit bias (SigLIP's init: -10, with logit_scale log 10; some
    open_clip models have one too); None, the default, is the plain transformers model.
    """

    vision: VisionConfig
    text: TextConfig
    projection_dim: int = int_field(512)
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float | None = None
    model_type: str = "vision-text-dual-encoder"

    def __post_init__(self):
        if not isinstance(self.vision, VISION_CONFIGS):
            raise ConfigError(f"DualEncoderConfig: field 'vision' must be one of "
                              f"{[c.__name__ for c in VISION_CONFIGS]}, got {type(self.vision).__name__}")
        if not isinstance(self.text, TEXT_CONFIGS):
            raise ConfigError(f"DualEncoderConfig: field 'text' must be one of "
                              f"{[c.__name__ for c in TEXT_CONFIGS]}, got {type(self.text).__name__}")
        check_int("DualEncoderConfig", "projection_dim", self.projection_dim, 1, 1 << 16)
        for name in ("logit_scale_init_value", "logit_bias_init_value"):
            v = getattr(self, name)
            if v is None and name == "logit_bias_init_value":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail("DualEncoderConfig", name, f"must be a finite number, got {v!r}")
        if self.model_type not in MODEL_TYPES:
            fail("DualEncoderConfig", "model_type", f"must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        wanted = _TOWERS.get(self.model_type)
        if wanted and not (isinstance(self.vision, wanted["vision_config"])
                           and isinstance(self.text, wanted["text_config"])):
            fail("DualEncoderConfig", "model_type", f"{self.model_type!r} needs "
                  f"{wanted['vision_config'].__name__} and {wanted['text_config'].__name__} towers, got "
                  f"{type(self.vision).__name__} and {type(self.text).__name__}")
        if not getattr(self.vision, "vision_use_head", True):
            fail("DualEncoderConfig", "vision", f"is a {type(self.vision).__name__} with vision_use_head false: "
                  f"it has no pooled output to embed (run the tower alone, or use a config with the head)")
        if self.model_type in SIGLIP_TYPES:
            sizes = {"vision.hidden_size": self.vision.hidden_size, "text.projection_size": self.text.projection_size}
            if set(sizes.values()) != {self.projection_dim}:
                fail("DualEncoderConfig", "projection_dim", f"= {self.projection_dim}, but a SigLIP model embeds "
                      f"with its towers' own outputs: {sizes} must all equal it")
            if self.logit_bias_init_value is None:
                fail("DualEncoderConfig", "logit_bias_init_value", "must be set for a SigLIP model (it has a "
                      f"logit bias; big_vision initialises it at {SIGLIP_LOGIT_INIT[1]})")

    @property
    def projections(self) -> bool:
        """Whether the model has visual_projection / text_projection (all but SigLIP's)."""
        return self.model_type not in SIGLIP_TYPES

    @property
    def default_loss(self) -> str:
        """The contrastive loss the model was trained with: "siglip" (sigmoid) for SigLIP, else "clip"."""
        return "siglip" if self.model_type in SIGLIP_TYPES else "clip"

    def to_dict(self) -> dict:
        out = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vision_config": self.vision.to_dict(),
            "text_config": self.text.to_dict(),
        }
        if self.model_type in SIGLIP_TYPES:  # SiglipConfig has neither field; dualenc keeps its inits under its own names
            out["dualenc_logit_init"] = [self.logit_scale_init_value, self.logit_bias_init_value]
            return out
        out["projection_dim"] = self.projection_dim
        out["logit_scale_init_value"] = self.logit_scale_init_value
        if self.logit_bias_init_value is not None:
            out["logit_bias_init_value"] = self.logit_bias_init_value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> "DualEncoderConfig":
        """Builds the config from a VisionTextDualEncoder or CLIP config.json dict."""
        where = where or "DualEncoderConfig"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{where}: field 'model_type' must be one of {list(MODEL_TYPES)}, got {model_type!r}")
        towers = {}
        if model_type in _TOWERS:
            for key, cls_ in _TOWERS[model_type].items():
                towers[key] = _clip_tower(d, key, cls_, where)
        else:
            for key, allowed in (("vision_config", VISION_TYPES), ("text_config", TEXT_TYPES)):
                if d.get(key) is None:
                    raise ConfigError(f"{where}: missing field '{key}' (dualenc does not default a tower)")
                towers[key] = tower_config_from_dict(d[key], where=f"{where}: {key}", allowed=allowed)
            if "projection_dim" not in d:
                raise ConfigError(f"{where}: missing field 'projection_dim'")
        sizes = dict(projection_dim=d.get("projection_dim", 512),
                     logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
                     logit_bias_init_value=d.get("logit_bias_init_value"))
        if model_type in SIGLIP_TYPES:
            inits = d.get("dualenc_logit_init", SIGLIP_LOGIT_INIT)
            if not isinstance(inits, (list, tuple)) or len(inits) != 2:
                raise ConfigError(f"{where}: field 'dualenc_logit_init' must be [logit_scale, logit_bias], "
                                  f"got {inits!r}")
            sizes = dict(projection_dim=towers["text_config"].projection_size, logit_scale_init_value=inits[0],
                         logit_bias_init_value=inits[1])
        try:
            return cls(vision=towers["vision_config"], text=towers["text_config"], model_type=model_type, **sizes)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _clip_tower(d: Mapping[str, Any], key: str, cls, where: str):
    """A CLIP or SigLIP config's text_config / vision_config as transformers reads it: missing fields take the
    defaults (4.x wrote only the differences), and a legacy `*_config_dict` overrides every field it implies."""
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


def tower_config_from_dict(d: Mapping[str, Any], *, where: str = "config",
                           allowed: Mapping[str, type] | None = None, side: str = "vision"):
    """The tower config for a config.json dict, chosen by its model_type; never falls back to another tower.

    A "clip", "siglip" or "siglip2" config gives its tower on `side` ("vision" by default, or "text"), read as
    transformers reads it.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    allowed = allowed or {**VISION_TYPES, **dict.fromkeys(_TOWERS), **TEXT_TYPES}
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in allowed:
        raise ConfigError(f"{where}: field 'model_type' must be one of {sorted(allowed)}, got {model_type!r}")
    if model_type in _TOWERS:
        key = f"{side}_config"
        return _clip_tower(d, key, _TOWERS[model_type][key], where)
    return allowed[model_type].from_dict(d, where=where)
