"""The BERT tower family: BertModel and RobertaModel (XLM-RoBERTa too), init / apply on token ids.

Post-LayerNorm layers, bidirectional attention with the padding mask, pooled at the first token through a
dense + tanh pooler.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare, tables
from dualenc.towers.inputs import check_text_inputs
from dualenc.towers.family import ENCODER_OPTIONS, Family
from dualenc.fields import (
    ACTIVATION_NAMES, check_int, choice_field, TransformerConfig, no_pruned_heads, fail, float_field, int_field, rate_field, builds,
)

@dataclasses.dataclass(frozen=True)
class _TextConfig(TransformerConfig):
    """Fields BERT and RoBERTa share (BERT's defaults)."""

    rejected: ClassVar[Mapping[str, Any]] = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "pruned_heads": no_pruned_heads,
    }
    # A dense + tanh pooler on the first token (BERT's); False: the pooled output is the first token's last
    # hidden state itself (Chinese-CLIP's text tower, whose ChineseCLIPModel builds it without the pooler).
    pooler: ClassVar[bool] = True

    vocab_size: int = int_field(30522, hi=1 << 23)
    hidden_size: int = int_field(768)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    hidden_act: str = choice_field("gelu", ACTIVATION_NAMES)
    hidden_dropout_prob: float = rate_field(0.1)
    attention_probs_dropout_prob: float = rate_field(0.1)
    max_position_embeddings: int = int_field(512, hi=1 << 20)
    type_vocab_size: int = int_field(2, hi=1 << 12)
    initializer_range: float = float_field(0.02)
    layer_norm_eps: float = float_field(1e-12, hi=1.0, lo_open=True)
    pad_token_id: int | None = 0

    def _validate(self):
        if self.pad_token_id is not None:
            check_int(self.name, "pad_token_id", self.pad_token_id, 0, self.vocab_size - 1)
        super()._validate()

    @property
    def max_length(self) -> int:
        """The longest input_ids the position table allows."""
        return self.max_position_embeddings


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BertConfig(_TextConfig):
    """transformers' BertConfig (model_type "bert"): a BertModel with its pooler."""

    model_types: ClassVar[tuple[str, ...]] = ("bert",)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RobertaConfig(_TextConfig):
    """transformers' RobertaConfig ("roberta"; "xlm-roberta" loads as the same architecture and keeps its name).

    Position ids start after pad_token_id, so the longest input is max_position_embeddings - pad_token_id - 1.
    """

    model_types: ClassVar[tuple[str, ...]] = ("roberta", "xlm-roberta")

    vocab_size: int = int_field(50265, hi=1 << 23)
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = choice_field("roberta", ("roberta", "xlm-roberta"))

    def _validate(self):
        if self.pad_token_id is None:
            fail(self.name, "pad_token_id", "is required: RoBERTa's position ids start after it")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                fail(self.name, name, f"must be a token id or null, got {value!r}")
        super()._validate()
        if self.max_length < 1:
            fail(self.name, "max_position_embeddings",
                  f"= {self.max_position_embeddings} leaves no positions after pad_token_id {self.pad_token_id}")

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings - self.pad_token_id - 1


TextConfig = BertConfig | RobertaConfig


def encoder_spec(config: TextConfig) -> layers.EncoderSpec:
    return layers.EncoderSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, eps=config.layer_norm_eps, prenorm=False,
        hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        init_stds=(config.initializer_range,) * 4)


def specs(config: TextConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to BertModel /
    RobertaModel. The padding row of the word table (and RoBERTa's position table) starts at zero, as torch's
    padding_idx makes it."""
    d, std = config.hidden_size, config.initializer_range
    pad = () if config.pad_token_id is None else (config.pad_token_id,)
    return [
        declare.table(("embeddings", "word"), config.vocab_size, d, std, "vocab",
                      hf="embeddings.word_embeddings.weight", zero_rows=pad),
        declare.table(("embeddings", "position"), config.max_position_embeddings, d, std, "position",
                      hf="embeddings.position_embeddings.weight",
                      zero_rows=pad if isinstance(config, RobertaConfig) else ()),
        declare.table(("embeddings", "token_type"), config.type_vocab_size, d, std, "types",
                      hf="embeddings.token_type_embeddings.weight"),
        *declare.norm(("embeddings", "norm"), d, hf="embeddings.LayerNorm"),
        *declare.encoder(encoder_spec(config), "encoder.layer.{i}.", _BERT_LAYER),
        *(declare.dense(("pooler",), d, d, std, ("embed", "embed"), hf="pooler.dense", group="head")
          if config.pooler else []),
    ]


@builds(BertConfig, RobertaConfig)
def _build(normal: layers.Normal, config: TextConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def default_position_ids(config: TextConfig, input_ids: jax.Array) -> jax.Array:
    """BERT: 0..L-1. RoBERTa: non-padding tokens count up from pad_token_id + 1; padding gets pad_token_id."""
    if isinstance(config, RobertaConfig):
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def apply(params: layers.Params, config: TextConfig, input_ids: jax.Array, attention_mask=None,
          token_type_ids=None, position_ids=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None) -> layers.TowerOutput:
    """Runs the text tower.

    Args:
      input_ids: (B, L) token ids.
      attention_mask: (B, L), 1 for tokens to attend to, 0 for padding; default all ones.
      token_type_ids: (B, L); default zeros.
      position_ids: (B, L) or (L,); default as transformers computes them (see default_position_ids).
      dropout_key: enables dropout (training) when given.
      dtype: compute dtype of the matmuls (default float32).
      pooled_only: return last_hidden_state for the first token only, (B, 1, D), which is all pooler_output
        needs. The last layer then computes just that token (its attention still reads every token):
        about 7% less work for a 12-layer tower, same pooler_output. Stacked layers do so when evaluated;
        differentiated, they run the last layer in full (a faster backward).
      attention: the attention implementation, a name in layers.IMPLEMENTATIONS; None: the backend's default.

    Returns:
      TowerOutput: last_hidden_state (B, L, D), pooler_output (B, D) = tanh(dense(first token)) (the first token
      itself for a config without a pooler), and
      hidden_states/attentions as tuples when requested.
    """
    check_text_inputs(config, input_ids, attention_mask, token_type_ids, position_ids)
    dtype = jnp.dtype(dtype or jnp.float32)
    attention = layers.resolve_attention(attention, dtype)
    emb = params["embeddings"]
    if position_ids is None:
        position_ids = default_position_ids(config, input_ids)
    with jax.named_scope("embeddings"):
        # Out-of-range ids read NaN instead of a clamped row; check_inputs reports them outside jit.
        x = jnp.take(emb["word"], input_ids, axis=0, mode="fill", fill_value=jnp.nan)
        if token_type_ids is None:
            x = x + emb["token_type"][0][None, None]
        else:
            x = x + jnp.take(emb["token_type"], token_type_ids, axis=0, mode="fill", fill_value=jnp.nan)
        x = x + jnp.take(emb["position"], jnp.broadcast_to(position_ids, input_ids.shape), axis=0,
                         mode="fill", fill_value=jnp.nan)
        x = layers.layer_norm(emb["norm"], x, config.layer_norm_eps, dtype)
        embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = layers.dropout(x, config.hidden_dropout_prob, embed_key)
    bias = None if attention_mask is None else layers.attention_bias(attention_mask)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, bias, encoder_spec(config), dtype=dtype, key=encoder_key,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy, first_only=pooled_only, attention=attention)
    with jax.named_scope("pooler"):
        pooled = jnp.tanh(layers.dense(params["pooler"], last[:, 0], dtype)) if config.pooler else last[:, 0]
    return layers.tower_output(last, pooled, x, states, probs)


# ------------------------------------------------------------------------------------------------ checkpoints

_BERT_LAYER = dict(query="attention.self.query", key="attention.self.key", value="attention.self.value",
                   out="attention.output.dense", attention_norm="attention.output.LayerNorm",
                   fc1="intermediate.dense", fc2="output.dense", mlp_norm="output.LayerNorm")


def table(config: TextConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to BertModel / RobertaModel."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ the family

FAMILIES = (
    Family("bert", "text", {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": RobertaConfig},
           sys.modules[__name__], "first", pooled_only=True, options=ENCODER_OPTIONS, stacks=("encoder",),
           prefixes=("", "bert.", "roberta."), anchor="embeddings.word_embeddings.weight", optional=("pooler",)),
)
