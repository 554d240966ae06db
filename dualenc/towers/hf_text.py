"""open_clip's HFTextEncoder over a RoBERTa / XLM-RoBERTa model (the multilingual LAION CLIPs' text tower) or over
the encoder of an M2M100 / NLLB model (NLLB-CLIP's).

The RoBERTa encoder is dualenc.towers.bert's; this module adds open_clip's poolers and the hidden layer of its
"mlp" projection head. The head's last Linear (bias-free, to the embedding size) is the dual encoder's
text_projection, as is the whole "linear" head, so the model is a VisionTextDualEncoder whose text tower pools
as open_clip does. open_clip's `cls_pooler` with a linear head is transformers' own RobertaModel + projection
(dualenc.formats.open_clip reads it as a plain RobertaConfig, which transformers loads); the other poolers and
the mlp head have no transformers class, so their config.json model_type is "open_clip_hf_text".

For an encoder-decoder model open_clip keeps the encoder alone (M2M100Encoder: token embeddings scaled by
sqrt(hidden_size), fairseq's sinusoidal positions counted from pad_token_id + 1, pre-norm layers, a final
LayerNorm); its output has no pooler, so open_clip's cls_pooler is the first token's last hidden state. No
transformers class computes that tower alone either: it too is saved as "open_clip_hf_text" (text_model_type
"m2m_100").
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare, tables
from dualenc.fields import bool_field, builds, choice_field, fail, int_field
from dualenc.towers import bert
from dualenc.towers.inputs import check_text_inputs
from dualenc.towers.family import ENCODER_OPTIONS, Family

# open_clip's poolers (open_clip.hf_model): the mean of the tokens the attention mask keeps; the first token
# through RobertaModel's dense + tanh pooler; the first token's last hidden state. (Its MaxPooler fails in
# open_clip itself, masked_fill with an integer mask, and is refused by the reader.)
POOLERS = ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")
TEXT_MODELS = ("roberta", "xlm-roberta", "m2m_100")  # the transformers model_types the tower is built over


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class HFTextEncoderConfig(bert.RobertaConfig):
    """open_clip's HFTextEncoder (model_type "open_clip_hf_text"): RobertaConfig's fields (text_model_type
    naming the transformers config it came from, one of TEXT_MODELS; for "m2m_100" the encoder's: hidden_size
    d_model, num_hidden_layers encoder_layers, num_attention_heads encoder_attention_heads, intermediate_size
    encoder_ffn_dim, hidden_act activation_function, dropouts dropout / attention_dropout, initializer_range
    init_std, type_vocab_size 1 (no token types), layer_norm_eps 1e-5, torch's LayerNorm default), then

    pooler_type: one of POOLERS.
    head_hidden_size: the width of the hidden layer of open_clip's "mlp" projection head, (hidden_size +
      embed_dim) // 2: Linear(hidden_size, head_hidden_size, bias=False), exact GELU, then the dual encoder's
      text_projection; None for its "linear" head (the text_projection alone).
    scale_embedding: M2M100's: the token embeddings times sqrt(hidden_size) (False for RoBERTa).
    """

    model_types: ClassVar[tuple[str, ...]] = ("open_clip_hf_text",)

    model_type: str = choice_field("open_clip_hf_text", ("open_clip_hf_text",))
    text_model_type: str = choice_field("xlm-roberta", TEXT_MODELS)
    pooler_type: str = choice_field("mean_pooler", POOLERS)
    head_hidden_size: int | None = int_field(None, required=False)
    scale_embedding: bool = bool_field(False)

    @property
    def encoder_only(self) -> bool:
        """Whether the tower is an encoder-decoder model's encoder (M2M100Encoder) rather than a RobertaModel."""
        return self.text_model_type == "m2m_100"

    @property
    def pooler(self) -> bool:
        """Whether the tower has RobertaModel's dense + tanh pooler (open_clip builds it for cls_pooler only)."""
        return self.pooler_type == "cls_pooler"

    @property
    def max_length(self) -> int:
        """The longest input_ids: RoBERTa's position table after pad_token_id; M2M100's sinusoidal positions
        have no table, and max_position_embeddings is its nominal length."""
        return self.max_position_embeddings if self.encoder_only else super().max_length

    @property
    def pooled_size(self) -> int:
        """The width of pooler_output: the mlp head's hidden layer, else hidden_size."""
        return self.head_hidden_size or self.hidden_size

    def _validate(self):
        if self.head_hidden_size is not None and self.head_hidden_size < 1:
            fail(self.name, "head_hidden_size", f"must be positive or null, got {self.head_hidden_size}")
        if self.encoder_only:
            if self.pooler_type == "cls_pooler":
                fail(self.name, "pooler_type", "= 'cls_pooler' has no pooler over an M2M100 encoder, whose output "
                     "open_clip pools at the first token: 'cls_last_hidden_state_pooler'")
            if self.type_vocab_size != 1:
                fail(self.name, "type_vocab_size",
                     f"= {self.type_vocab_size}: an M2M100 encoder has no token types (1)")
            if self.hidden_size < 4:  # fairseq's sinusoids divide by hidden_size // 2 - 1
                fail(self.name, "hidden_size", f"= {self.hidden_size} is too small for M2M100's sinusoidal "
                     f"positions; at least 4")
        elif self.scale_embedding:
            fail(self.name, "scale_embedding", f"= True is M2M100's, not {self.text_model_type!r}'s")
        super()._validate()


def encoder_spec(config: HFTextEncoderConfig) -> layers.EncoderSpec:
    """RobertaModel's post-norm layers, or M2M100EncoderLayer's pre-norm ones."""
    return dataclasses.replace(bert.encoder_spec(config), prenorm=config.encoder_only)


# M2M100EncoderLayer's names for the encoder layer's parts (dualenc.params.encoder)
_M2M_LAYER = dict(query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
                  out="self_attn.out_proj", attention_norm="self_attn_layer_norm", fc1="fc1", fc2="fc2",
                  mlp_norm="final_layer_norm")


def specs(config: HFTextEncoderConfig) -> list[declare.Param]:
    """RobertaModel's params (bert.specs; the pooler for cls_pooler only) or M2M100Encoder's (its token table,
    the layers, the final LayerNorm; the sinusoidal positions are computed, not stored), and the mlp head's
    hidden layer ("proj.0", open_clip's name within HFTextEncoder)."""
    if config.encoder_only:
        out = [declare.table(("embeddings", "word"), config.vocab_size, config.hidden_size,
                             config.initializer_range, "vocab", hf="embed_tokens.weight",
                             zero_rows=(config.pad_token_id,)),
               *declare.encoder(encoder_spec(config), "layers.{i}.", _M2M_LAYER),
               *declare.norm(("final_norm",), config.hidden_size, hf="layer_norm")]
    else:
        out = bert.specs(config)
    if config.head_hidden_size is not None:
        out += declare.dense(("head",), config.hidden_size, config.head_hidden_size, config.initializer_range,
                             ("embed", "mlp"), hf="proj.0", bias=False, group="head")
    return out


@builds(HFTextEncoderConfig)
def _build(normal: layers.Normal, config: HFTextEncoderConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def sinusoids(position_ids: jax.Array, dim: int, pad_token_id: int) -> jax.Array:
    """fairseq's sinusoidal position embeddings (M2M100SinusoidalPositionalEmbedding), float32: sin then cos
    of position * 10000^(-i / (dim // 2 - 1)), a zero column for an odd dim, zeros at position pad_token_id."""
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000) / (half - 1)))
    angle = position_ids.astype(jnp.float32)[..., None] * freq.reshape((1,) * position_ids.ndim + (half,))
    out = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)] + ([jnp.zeros_like(angle[..., :1])] if dim % 2 else []),
                          axis=-1)
    return jnp.where((position_ids == pad_token_id)[..., None], 0.0, out)


def _m2m_encoder(params, config, input_ids, attention_mask, position_ids, *, dropout_key, output_hidden_states,
                 output_attentions, dtype, remat_policy, attention) -> layers.TowerOutput:
    """M2M100Encoder: scaled token embeddings + sinusoidal positions, pre-norm layers, the final LayerNorm;
    pooler_output the first token's last hidden state."""
    attention = layers.resolve_attention(attention, dtype)
    if position_ids is None:  # as RoBERTa's: tokens count up from pad_token_id + 1, padding at pad_token_id
        position_ids = bert.default_position_ids(config, input_ids)
    with jax.named_scope("embeddings"):
        # Out-of-range ids read NaN instead of a clamped row; check_inputs reports them outside jit.
        x = jnp.take(params["embeddings"]["word"], input_ids, axis=0, mode="fill", fill_value=jnp.nan)
        if config.scale_embedding:
            x = x * math.sqrt(config.hidden_size)
        x = x + sinusoids(jnp.broadcast_to(position_ids, input_ids.shape), config.hidden_size, config.pad_token_id)
        embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = layers.dropout(x, config.hidden_dropout_prob, embed_key).astype(dtype)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, layers.attention_bias(attention_mask), encoder_spec(config), dtype=dtype,
            key=encoder_key, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy, attention=attention)
        last = layers.layer_norm(params["final_norm"], last, config.layer_norm_eps, dtype)
    return layers.tower_output(last, last[:, 0], x, states, probs)


def apply(params: layers.Params, config: HFTextEncoderConfig, input_ids: jax.Array, attention_mask=None,
          token_type_ids=None, position_ids=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          attention: str | None = None) -> layers.TowerOutput:
    """Runs the text tower as open_clip's HFTextEncoder, up to its projection head's last Linear.

    Args:
      input_ids: (B, L) token ids.
      attention_mask: (B, L), 1 for tokens, 0 for padding; default input_ids != pad_token_id (open_clip's own
        mask, which it always derives so).
      token_type_ids: as dualenc.towers.bert.apply; an M2M100 encoder has no token types: its type_vocab_size
        is 1, so they can only be zeros (dualenc.check_inputs), and are not read.
      position_ids, dropout_key, dtype, remat_policy, attention: as dualenc.towers.bert.apply (M2M100's
        position ids index its sinusoids).

    Returns:
      TowerOutput: RobertaModel's (M2M100Encoder's) last_hidden_state (and hidden_states/attentions when
      requested); pooler_output (B, pooled_size): the pooled output, through the mlp head's Linear + GELU where it
      has one.
    """
    if attention_mask is None:
        attention_mask = (input_ids != config.pad_token_id).astype(jnp.int32)
    if config.encoder_only:
        check_text_inputs(config, input_ids, attention_mask, token_type_ids, position_ids)
        out = _m2m_encoder(params, config, input_ids, attention_mask, position_ids, dropout_key=dropout_key,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                           dtype=jnp.dtype(dtype or jnp.float32), remat_policy=remat_policy, attention=attention)
    else:
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
    """The tower's key table: RobertaModel's (M2M100Encoder's) names, and "proj.0.weight" for the mlp head's
    hidden layer."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("open_clip_hf_text", "text", {"open_clip_hf_text": HFTextEncoderConfig}, sys.modules[__name__], "gap",
           options=ENCODER_OPTIONS, pooled_size="pooled_size", stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.word_embeddings.weight"),
)
