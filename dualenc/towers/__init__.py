"""The tower families and the registry that maps a config (or a config.json model_type) to its family.

A family is one module (vit, bert, clip_text, siglip, naflex) declaring its config classes, init/apply, key table, how it
pools and what it supports. The dual encoder, checkpoints, training, evaluation and the CLI find towers only
through `family(config)` and `config_class(model_type)`: adding a family is its module plus one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dualenc.errors import ConfigError
from dualenc.towers import bert, clip_text, siglip2 as naflex, siglip, vit


SIDE_INPUTS = {"vision": ("pixel_values",), "text": ("input_ids", "attention_mask", "token_type_ids", "position_ids")}


@dataclasses.dataclass(frozen=True)
class Family:
    """What the rest of dualenc knows about a tower family."""

    name: str
    side: str  # "vision" (takes pixel_values) or "text" (takes input_ids, attention_mask, ...)
    configs: dict[str, type]  # config.json model_type -> config class
    module: Any  # the family's module: init, apply, _build, table
    pooling: str  # "first" (class token), "eos" (end-of-text token, by the config's rule), "last", "map" (head)
    pooled_only: bool  # apply(pooled_only=True) is supported (the pooled position is known before the encoder)
    # Single-tower checkpoints: where the tower sits in each transformers class's names, a tensor every one of
    # its checkpoints holds (to find the prefix), and params such a checkpoint may lack (initialised anew).
    prefixes: tuple[str, ...]
    anchor: str
    optional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # the apply's positional inputs after (params, config); () for the side's usual

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inputs or SIDE_INPUTS[self.side]

    @property
    def build(self) -> Callable:
        return self.module._build

    @property
    def apply(self) -> Callable:
        return self.module.apply

    @property
    def init(self) -> Callable:
        return self.module.init

    def table(self, config) -> list:
        return self.module.table(config)


FAMILIES = (
    Family("vit", "vision", {"vit": vit.ViTConfig}, vit, "first", True,
           prefixes=("", "vit."), anchor="embeddings.patch_embeddings.projection.weight", optional=("pooler",)),
    Family("clip_vision", "vision", {"clip_vision_model": vit.CLIPVisionConfig}, vit, "first", True,
           prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight"),
    Family("bert", "text", {"bert": bert.BertConfig, "roberta": bert.RobertaConfig,
                            "xlm-roberta": bert.RobertaConfig}, bert, "first", True,
           prefixes=("", "bert.", "roberta."), anchor="embeddings.word_embeddings.weight", optional=("pooler",)),
    Family("clip_text", "text", {"clip_text_model": clip_text.CLIPTextConfig}, clip_text, "eos", True,
           prefixes=("", "text_model."), anchor="embeddings.token_embedding.weight"),
    Family("siglip_vision", "vision", {"siglip_vision_model": siglip.SiglipVisionConfig}, siglip, "map", False,
           prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight"),
    Family("siglip_text", "text", {"siglip_text_model": clip_text.SiglipTextConfig,
                                   "siglip2_text_model": clip_text.Siglip2TextConfig}, clip_text, "last", True,
           prefixes=("", "text_model."), anchor="embeddings.token_embedding.weight"),
    Family("siglip2_vision", "vision", {"siglip2_vision_model": naflex.Siglip2VisionConfig}, naflex, "map", False,
           prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight",
           inputs=("pixel_values", "pixel_attention_mask", "spatial_shapes")),
)
_BY_CLASS = {cls: f for f in FAMILIES for cls in f.configs.values()}
VISION_TYPES = {t: cls for f in FAMILIES if f.side == "vision" for t, cls in f.configs.items()}
TEXT_TYPES = {t: cls for f in FAMILIES if f.side == "text" for t, cls in f.configs.items()}
VISION_CONFIGS = tuple(dict.fromkeys(VISION_TYPES.values()))
TEXT_CONFIGS = tuple(dict.fromkeys(TEXT_TYPES.values()))


SIDE_ALL_INPUTS = {side: tuple(dict.fromkeys(n for f in FAMILIES if f.side == side for n in f.input_names))
                   for side in SIDE_INPUTS}  # every input some tower of the side takes


def family(config) -> Family:
    """The family of a tower config; ConfigError for anything else."""
    try:
        return _BY_CLASS[type(config)]
    except (KeyError, TypeError):
        raise ConfigError(f"{type(config).__name__} is not a tower config; known: "
                          f"{sorted(c.__name__ for c in _BY_CLASS)}") from None
