"""open_clip's HFTextEncoder over a RoBERTa / XLM-RoBERTa model (the multilingual LAION CLIPs' text tower).

The RoBERTa encoder is dualenc.towers.bert's; this module adds open_clip's poolers and the hidden layer of its
"mlp" projection head. The head's last Linear (bias-free, to the embedding size) is the dual encoder's
text_projection, as is the whole "linear" head, so the model is a VisionTextDualEncoder whose text tower pools
as open_clip does. open_clip's `cls_pooler` with a linear head is transformers' own RobertaModel + projection
(dualenc.formats.open_clip reads it as a plain RobertaConfig, which transformers loads); the other poolers and
the mlp head have no transformers class, so their config.json model_type is "open_clip_hf_text".
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare, tables
from dualenc.fields import builds, choice_field, fail, int_field
from dualenc.towers import bert
from dualenc.towers.family import ENCODER_OPTIONS, Family

# open_clip's poolers (open_clip.hf_model): the mean of the tokens the attention mask keeps; the first token
# through RobertaModel's dense + tanh pooler; the first token's last hidden state. (Its MaxPooler fails in
# open_clip itself, masked_fill with an integer mask, and is refused by the reader.)
POOLERS = ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class HFTextEncoderConfig(bert.RobertaConfig):
    """open_clip's HFTextEncoder (model_type "open_clip_hf_text"): RobertaConfig's fields (text_model_type
    naming the transformers config it came from, "roberta" or "xlm-roberta"), then

    pooler_type: one of POOLERS.
    head_hidden_size: the width of the hidden layer of open_clip's "mlp" projection head, (hidden_size +
      embed_dim) // 2: Linear(hidden_size, head_hidden_size, bias=False), exact GELU, then the dual encoder's
      text_projection; None for its "linear" head (the text_projection alone).
    """

    model_types: ClassVar[tuple[str, ...]] = ("open_clip_hf_text",)

    model_type: str = choice_field("open_clip_hf_text", ("open_clip_hf_text",))
    text_model_type: str = choice_field("xlm-roberta", ("roberta", "xlm-roberta"))
    pooler_type: str = choice_field("mean_pooler", POOLERS)
    head_hidden_size: int | None = int_field(None, required=False)

    @property
    def pooler(self) -> bool:
        """Whether the tower has RobertaModel's dense + tanh pooler (open_clip builds it for cls_pooler only)."""
        return self.pooler_type == "cls_pooler"

    @property
    def pooled_size(self) -> int:
        """The width of pooler_output: the mlp head's hidden layer, else hidden_size."""
        return self.head_hidden_size or self.hidden_size

    def _validate(self):
        if self.head_hidden_size is not None and self.head_hidden_size < 1:
            fail(self.name, "head_hidden_size", f"must be positive or null, got {self.head_hidden_size}")
        super()._validate()


def specs(config: HFTextEncoderConfig) -> list[declare.Param]:
    """RobertaModel's params (bert.specs; the pooler for cls_pooler only), and the mlp head's hidden layer
    ("proj.0", open_clip's name within HFTextEncoder)."""
    out = bert.specs(config)
    if config.head_hidden_size is not None:
        out += declare.dense(("head",), config.hidden_size, config.head_hidden_size, config.initializer_range,
                             ("embed", "mlp"), hf="proj.0", bias=False, group="head")
    return out


@builds(HFTextEncoderConfig)
def _build(normal: layers.Normal, config: HFTextEncoderConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def apply(params: layers.Params, config: HFTextEncoderConfig, input_ids: jax.Array, attention_mask=None,
          token_type_ids=None, position_ids=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          attention: str | None = None) -> layers.TowerOutput:
    """Runs the text tower as open_clip's HFTextEncoder, up to its projection head's last Linear.

    Args:
      input_ids: (B, L) token ids.
      attention_mask: (B, L), 1 for tokens, 0 for padding; default input_ids != pad_token_id (open_clip's own
        mask, which it always derives so).
      token_type_ids, position_ids, dropout_key, dtype, remat_policy, attention: as dualenc.towers.bert.apply.

    Returns:
      TowerOutput: RobertaModel's last_hidden_state (and hidden_states/attentions when requested);
      pooler_output (B, pooled_size): the pooled output, through the mlp head's Linear + GELU where it has one.
    """
    if attention_mask is None:
        attention_mask = (input_ids != config.pad_token_id).astype(jnp.int32)
    out = bert.apply(params, config, input_ids, attention_mask, token_type_ids, position_ids,
                     dropout_key=dropout_key, output_hidden_states=output_hidden_states,
                     output_attentions=output_attentions, dtype=dtype, remat_policy=remat_policy,
                     attention=attention)
    dtype = jnp.dtype(dtype or jnp.float32)
    with jax.named_scope("pooler"):
        pooled = out.pooler_output
        if config.pooler_type == "mean_pooler":
            mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
            total = jnp.sum(out.last_hidden_state.astype(jnp.float32) * mask, axis=1)
            # A row without any token would divide by zero (NaN in open_clip); it gives zeros here.
            pooled = (total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)).astype(dtype)
        if "head" in params:
            pooled = layers.ACTIVATIONS["gelu"](layers.dense(params["head"], pooled, dtype))
    return out._replace(pooler_output=pooled)


def table(config: HFTextEncoderConfig) -> list[tables.Entry]:
    """The tower's key table: RobertaModel's names, and "proj.0.weight" for the mlp head's hidden layer."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("open_clip_hf_text", "text", {"open_clip_hf_text": HFTextEncoderConfig}, sys.modules[__name__], "gap",
           options=ENCODER_OPTIONS, pooled_size="pooled_size", stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.word_embeddings.weight"),
)
