"""The CLIP-style text towers: CLIPTextModel (also open_clip's text transformer), SiglipTextModel and
Siglip2TextModel.

Token + position embeddings, pre-LayerNorm layers, a final LayerNorm, one pooled position.
- CLIP: a causal mask combined with the padding mask; pooled at the end-of-text token. Which position that is
  follows transformers' two rules: configs with eos_token_id 2 (the OpenAI checkpoints' legacy value) take
  the argmax of the ids, the end-of-text token being the largest id; others take the first position holding
  eos_token_id.
  MetaCLIP 2's (MetaClip2TextConfig) takes the first position holding eos_token_id whatever its value.
- open_clip's text transformer with no causal mask, pooled at the last position (CLIPA: OpenCLIPTextConfig):
  bidirectional attention, no head (the dual encoder's text_projection follows); or with CoCa's embed_cls: a
  learned class token appended after the tokens, causal attention under open_clip's padding mask, pooled there.
- SigLIP (and SigLIP 2): bidirectional attention with the optional padding mask; pooled at the last position (the text is
  padded to a fixed length, 64 on the hub), then a linear `head` with bias.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.fields import ACTIVATION_NAMES, bool_field, check_int, choice_field, TransformerConfig, fail, float_field, \
    int_field, rate_field, same_head_dim, builds
from dualenc.towers.inputs import check_text_inputs
from dualenc.towers.family import ENCODER_OPTIONS, Family

LEGACY_EOS = 2  # transformers: an eos_token_id of 2 means "pool at the argmax of the ids"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(TransformerConfig):
    """transformers' CLIPTextConfig (model_type "clip_text_model", or the text_config of a "clip")."""

    model_types: ClassVar[tuple[str, ...]] = ("clip_text_model",)
    rejected: ClassVar[Mapping[str, Any]] = {"head_dim": same_head_dim}
    causal: ClassVar[bool] = True

    vocab_size: int = int_field(49408, hi=1 << 23)
    hidden_size: int = int_field(512)
    intermediate_size: int = int_field(2048, hi=1 << 18)
    projection_dim: int = int_field(512, required=False)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(8, hi=4096)
    max_position_embeddings: int = int_field(77, hi=1 << 20)
    hidden_act: str = choice_field("quick_gelu", ACTIVATION_NAMES)
    layer_norm_eps: float = float_field(1e-5, hi=1.0, lo_open=True)
    attention_dropout: float = rate_field(0.0)
    initializer_range: float = float_field(0.02)
    initializer_factor: float = float_field(1.0)
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def _validate(self):
        for name in ("pad_token_id", "bos_token_id"):
            _token_id(self.name, name, getattr(self, name))
        check_int(self.name, "eos_token_id", self.eos_token_id, 0, 1 << 31)
        super()._validate()

    @property
    def max_length(self) -> int:
        """The longest input_ids the position table allows."""
        return self.max_position_embeddings

    @property
    def pooling(self) -> str:
        """"argmax" (the legacy eos_token_id 2) or "eos" (the first eos_token_id)."""
        return "argmax" if self.eos_token_id == LEGACY_EOS else "eos"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MetaClip2TextConfig(CLIPTextConfig):
    """transformers' MetaClip2TextConfig (model_type "metaclip_2_text_model", or the text_config of a
    "metaclip_2"): CLIP's text tower pooled at the first eos_token_id, with no legacy rule for 2."""

    model_types: ClassVar[tuple[str, ...]] = ("metaclip_2_text_model",)
    pooling: ClassVar[str] = "eos"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class OpenCLIPTextConfig(CLIPTextConfig):
    """open_clip's TextTransformer pooled at the last position, model_type "open_clip_text", dualenc's own:
    transformers has no such model (AutoConfig refuses the model_type). CLIP's fields (eos_token_id is not read),
    and:
    - causal false, embed_cls false (CLIPA: no_causal_mask, pool_type "last"): bidirectional attention, the pooled
      output the last position after the final LayerNorm. open_clip trained it on text padded to
      max_position_embeddings with no attention mask.
    - causal true, embed_cls true (CoCa): a learned class token appended after the ids (max_position_embeddings
      counts it: the ids take one position less), causal attention, each key also masked where open_clip's
      padding mask puts it: its CoCa checkpoints' legacy mask, the class token's column first, so key 0 is always
      seen and key j > 0 only where ids[j - 1] is not pad_token_id; ids where attention_mask is 0 read as
      pad_token_id (see class_token_inputs). Pooled at the class token, after the final LayerNorm. Texts are padded to max_length, as open_clip's tokenizer pads them.
    The defaults are CoCa's, every optional part (the train state's catalogue of params reads them); a config.json
    without causal and embed_cls is CLIPA's (as dualenc first wrote them).
    """

    model_types: ClassVar[tuple[str, ...]] = ("open_clip_text",)
    pooling: ClassVar[str] = "last"

    causal: bool = bool_field(True)
    embed_cls: bool = bool_field(True)

    @classmethod
    def from_dict(cls, d, **kwargs):
        return super().from_dict({"causal": False, "embed_cls": False, **d} if isinstance(d, Mapping) else d, **kwargs)

    def _validate(self):
        if self.embed_cls != self.causal:
            fail(self.name, "embed_cls", f"= {self.embed_cls} with causal {self.causal} is not implemented; "
                 f"supported: both true (CoCa) or both false (CLIPA)")
        if self.embed_cls and self.pad_token_id is None:
            fail(self.name, "pad_token_id", "= None is not implemented with embed_cls: its padding mask reads it")
        if self.embed_cls and self.max_position_embeddings < 2:
            fail(self.name, "max_position_embeddings", f"= {self.max_position_embeddings} leaves no position for "
                 f"the ids beside the class token")
        super()._validate()

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings - self.embed_cls


def _token_id(where, name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        fail(where, name, f"must be a token id or null, got {value!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(TransformerConfig):
    """transformers' SiglipTextConfig (model_type "siglip_text_model", or the text_config of a "siglip")."""

    model_types: ClassVar[tuple[str, ...]] = ("siglip_text_model",)
    rejected: ClassVar[Mapping[str, Any]] = {"head_dim": same_head_dim}
    causal: ClassVar[bool] = False
    pooling: ClassVar[str] = "last"

    vocab_size: int = int_field(32000, hi=1 << 23)
    hidden_size: int = int_field(768)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    max_position_embeddings: int = int_field(64, hi=1 << 20)
    hidden_act: str = choice_field("gelu_pytorch_tanh", ACTIVATION_NAMES)
    layer_norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    attention_dropout: float = rate_field(0.0)
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | tuple[int, ...] | None = 49407  # not read: SigLIP pools the last position
    projection_size: int | None = int_field(None, required=False)  # the head's output size; None: hidden_size

    def _validate(self):
        for name in ("pad_token_id", "bos_token_id"):
            _token_id(self.name, name, getattr(self, name))
        for value in self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,):
            _token_id(self.name, "eos_token_id", value)
        if self.projection_size is None:
            object.__setattr__(self, "projection_size", self.hidden_size)  # one spelling of the default
        super()._validate()

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Siglip2TextConfig(SiglipTextConfig):
    """transformers' Siglip2TextConfig (model_type "siglip2_text_model"): SigLIP's text tower, the same fields."""

    model_types: ClassVar[tuple[str, ...]] = ("siglip2_text_model",)


TextConfig = CLIPTextConfig | SiglipTextConfig


def encoder_spec(config: TextConfig) -> layers.EncoderSpec:
    if isinstance(config, CLIPTextConfig):
        stds = layers.clip_init_stds(config.hidden_size, config.num_hidden_layers, config.initializer_factor)
    else:
        stds = layers.xavier_stds(config.hidden_size, config.intermediate_size)
    return layers.EncoderSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, eps=config.layer_norm_eps, prenorm=True,
        attention_dropout=config.attention_dropout, init_stds=stds)


def specs(config: TextConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to CLIPTextTransformer /
    SiglipTextTransformer, and for SigLIP to big_vision's text tower (models/proj/image_text/text_transformer)."""
    d = config.hidden_size
    siglip = isinstance(config, SiglipTextConfig)
    # CLIP: N(0, 0.02) embeddings; SigLIP: flax's default embedding init, N(0, 1/d).
    std = d ** -0.5 if siglip else 0.02 * config.initializer_factor
    bv = (lambda name: name) if siglip else (lambda name: None)  # noqa: E731
    out = [
        declare.table(("embeddings", "word"), config.vocab_size, d, std, "vocab",
                      hf="embeddings.token_embedding.weight", bv=bv("Embed_0/embedding")),
        declare.table(("embeddings", "position"), config.max_position_embeddings, d, std, "position",
                      hf="embeddings.position_embedding.weight", bv=bv("pos_embedding"), bv_kind="pos"),
        *([declare.Param(("embeddings", "cls"), (d,), ("embed",), declare.normal(0.01),
                         "embeddings.class_embedding")] if getattr(config, "embed_cls", False) else []),
        *declare.encoder(encoder_spec(config), "encoder.layers.{i}.", tables.CLIP_LAYER,
                         bv_prefix=bv("Encoder_0/{blk}/")),
        *declare.norm(("final_norm",), d, hf="final_layer_norm", bv=bv("Encoder_0/encoder_norm/"), group="head"),
    ]
    if siglip:
        out += declare.dense(("head",), d, config.projection_size, d ** -0.5, ("embed", "projection"), hf="head",
                             bv="head/", group="head")
    return out


@builds(CLIPTextConfig, SiglipTextConfig)
def _build(normal: layers.Normal, config: TextConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def pooled_positions(config: TextConfig, input_ids: jax.Array) -> jax.Array:
    """(B,) the position each row is pooled at: the end-of-text token by the config's rule, or the last."""
    if config.pooling == "last":
        return jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1, jnp.int32)
    if config.pooling == "argmax":
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)


def class_token_inputs(config: OpenCLIPTextConfig, input_ids: jax.Array, attention_mask) -> tuple[jax.Array, jax.Array]:
    """(ids (B, L), key mask (B, L + 1)) of ids with CoCa's class token appended. The ids read pad_token_id where
    attention_mask is 0 (open_clip's padding, whichever id a tokenizer pads with: transformers' CLIPTokenizer pads
    with the end-of-text token); each id equal to pad_token_id is padding. open_clip's legacy mask, which its CoCa
    checkpoints were trained with, puts the class token's column first: key j > 0 reads id j - 1."""
    if attention_mask is not None:
        input_ids = jnp.where(attention_mask > 0, input_ids, config.pad_token_id)
    valid = input_ids != config.pad_token_id
    return input_ids, jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1).astype(jnp.int32)


def apply(params: layers.Params, config: CLIPTextConfig, input_ids: jax.Array, attention_mask=None,
          token_type_ids=None, position_ids=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None) -> layers.TowerOutput:
    """Runs the text tower.

    Args:
      input_ids: (B, L) token ids, with an end-of-text token in every row (the tokenizer adds it).
      attention_mask: (B, L), 1 for tokens to attend to, 0 for padding; default all ones. CLIP's causal mask
        applies on top of it. (SigLIP checkpoints were trained without one, on text padded to 64.)
      token_type_ids: must be None: CLIP has no token types.
      position_ids: (B, L) or (L,); default 0..L-1. Refused with embed_cls (the class token's position is L).
      dropout_key: enables attention dropout (training) when given.
      dtype: compute dtype of the matmuls (default float32).
      pooled_only: return last_hidden_state for the end-of-text token only, (B, 1, D), which is all
        pooler_output needs. The last layer then computes just that token (its attention still reads the
        tokens before it); same pooler_output.
      attention: the attention implementation, a name in layers.IMPLEMENTATIONS; None: the backend's default.

    Returns:
      TowerOutput: last_hidden_state (B, L, D) after the final LayerNorm ((B, L + 1, D) with embed_cls, the class
      token last); pooler_output (B, D) at the end-of-text position (SigLIP: the last position, through the head;
      embed_cls: the class token); hidden_states/attentions as tuples when requested.
    """
    check_text_inputs(config, input_ids, attention_mask, token_type_ids, position_ids)
    embed_cls = getattr(config, "embed_cls", False)
    if embed_cls and position_ids is not None:
        raise InputError(f"position_ids is not supported by {config.name} with embed_cls: its class token takes the "
                         f"position after the ids; leave it out")
    dtype = jnp.dtype(dtype or jnp.float32)
    attention = layers.resolve_attention(attention, dtype)
    emb = params["embeddings"]
    length = input_ids.shape[1]
    if position_ids is None:
        position_ids = jnp.arange(length, dtype=jnp.int32)
    with jax.named_scope("embeddings"):
        if embed_cls:
            input_ids, attention_mask = class_token_inputs(config, input_ids, attention_mask)
        # Out-of-range ids read NaN instead of a clamped row; check_inputs reports them outside jit.
        x = jnp.take(emb["word"], input_ids, axis=0, mode="fill", fill_value=jnp.nan)
        if embed_cls:
            x = jnp.concatenate([x, jnp.broadcast_to(emb["cls"], (x.shape[0], 1, x.shape[2]))], axis=1)
            length += 1
            position_ids = jnp.arange(length, dtype=jnp.int32)
        x = x + jnp.take(emb["position"], jnp.broadcast_to(position_ids, x.shape[:2]), axis=0, mode="fill",
                         fill_value=jnp.nan)
        x = x.astype(dtype)
    bias = layers.attention_bias(attention_mask, causal_length=length if config.causal else None)
    rows = jnp.full(input_ids.shape[:1], length - 1, jnp.int32) if embed_cls else pooled_positions(config, input_ids)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, bias, encoder_spec(config), dtype=dtype, key=dropout_key,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy, first_only=rows if pooled_only else False, attention=attention)
    with jax.named_scope("pooler"):
        last = layers.layer_norm(params["final_norm"], last, config.layer_norm_eps, dtype)
        pooled = (last if pooled_only else layers.pick_rows(last, rows))[:, 0]
        if "head" in params:
            pooled = layers.dense(params["head"], pooled, dtype)
    return layers.tower_output(last, pooled, x, states, probs)


# ------------------------------------------------------------------------------------------------ checkpoints

def table(config: TextConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to CLIPTextTransformer / SiglipTextTransformer."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ the families

FAMILIES = (
    Family("clip_text", "text", {"clip_text_model": CLIPTextConfig}, sys.modules[__name__], "eos",
           pooled_only=True, options=ENCODER_OPTIONS, stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.token_embedding.weight", tokenizer="clip"),
    Family("metaclip_2_text", "text", {"metaclip_2_text_model": MetaClip2TextConfig}, sys.modules[__name__], "eos",
           pooled_only=True, options=ENCODER_OPTIONS, stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.token_embedding.weight"),
    Family("open_clip_text", "text", {"open_clip_text": OpenCLIPTextConfig}, sys.modules[__name__], "last",
           pooled_only=True, options=ENCODER_OPTIONS, stacks=("encoder",), prefixes=("", "text_model."),
           anchor="embeddings.token_embedding.weight"),
    Family("siglip_text", "text", {"siglip_text_model": SiglipTextConfig, "siglip2_text_model": Siglip2TextConfig},
           sys.modules[__name__], "last", pooled_only=True, options=ENCODER_OPTIONS, pooled_size="projection_size",
           stacks=("encoder",), prefixes=("", "text_model."), anchor="embeddings.token_embedding.weight"),
)
