"""The Chinese-CLIP towers: transformers' ChineseCLIPVisionModel and the text tower of a ChineseCLIPModel.

Both are existing architectures under their own model_types. The vision tower is CLIP's (CLIPVisionTransformer:
no patch bias, pre_layrnorm, post_layernorm on the class token, the same checkpoint names), run by dualenc.towers.vit.
The text tower is a BERT (ChineseCLIPTextModel, BertModel's names) that ChineseCLIPModel builds without its pooler:
the pooled output is the first ([CLS]) token's last hidden state, run by dualenc.towers.bert.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax

from dualenc import layers, params as declare, tables
from dualenc.fields import builds, check_int, float_field, no_pruned_heads
from dualenc.towers import bert, vit
from dualenc.towers.family import ENCODER_OPTIONS, Family


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChineseCLIPVisionConfig(vit.CLIPVisionConfig):
    """transformers' ChineseCLIPVisionConfig (model_type "chinese_clip_vision_model", or the vision_config of a
    "chinese_clip"): CLIPVisionConfig's fields and defaults."""

    model_types: ClassVar[tuple[str, ...]] = ("chinese_clip_vision_model",)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChineseCLIPTextConfig(bert.BertConfig):
    """transformers' ChineseCLIPTextConfig (model_type "chinese_clip_text_model", or the text_config of a
    "chinese_clip"): BertConfig's fields and defaults, absolute positions always (transformers' ChineseCLIP text
    model has no other kind, nor a decoder mode, whatever the config says), pooled at the first token without
    a pooler (as ChineseCLIPModel builds it)."""

    model_types: ClassVar[tuple[str, ...]] = ("chinese_clip_text_model",)
    rejected: ClassVar = {"pruned_heads": no_pruned_heads}
    pooler: ClassVar[bool] = False

    initializer_factor: float = float_field(1.0)
    bos_token_id: int | None = 0
    eos_token_id: int | None = None

    def _validate(self):
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                check_int(self.name, name, getattr(self, name), 0, 1 << 31)
        super()._validate()


TowerConfig = ChineseCLIPVisionConfig | ChineseCLIPTextConfig


def _base(config: TowerConfig):
    return vit if isinstance(config, ChineseCLIPVisionConfig) else bert


def specs(config: TowerConfig) -> list[declare.Param]:
    """Every param of the tower (see dualenc.params): CLIP's vision tower, or BERT's without the pooler; names
    relative to ChineseCLIPVisionModel / ChineseCLIPTextModel."""
    return _base(config).specs(config)


@builds(ChineseCLIPVisionConfig, ChineseCLIPTextConfig)
def _build(normal: layers.Normal, config: TowerConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def apply(params: layers.Params, config: TowerConfig, *inputs, **options) -> layers.TowerOutput:
    """Runs the tower: dualenc.towers.vit.apply (pixel_values) for the vision tower, dualenc.towers.bert.apply
    (input_ids, attention_mask, token_type_ids, position_ids) for the text tower, whose pooler_output (B, D) is
    the first token's last hidden state."""
    return _base(config).apply(params, config, *inputs, **options)


def table(config: TowerConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to ChineseCLIPVisionModel / ChineseCLIPTextModel."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("chinese_clip_vision", "vision", {"chinese_clip_vision_model": ChineseCLIPVisionConfig},
           sys.modules[__name__], "first", pooled_only=True,
           options=(*ENCODER_OPTIONS, "interpolate_pos_encoding", *vit.PATCH_DROPOUT_OPTIONS), stacks=("encoder",),
           check=vit.check_pixel_values, prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight"),
    Family("chinese_clip_text", "text", {"chinese_clip_text_model": ChineseCLIPTextConfig}, sys.modules[__name__],
           "first", pooled_only=True, options=ENCODER_OPTIONS, stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.word_embeddings.weight", tokenizer="bert"),
)
