"""The text towers, BERT (BertModel) and RoBERTa (RobertaModel): init / apply on token ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualenc import layers
from dualenc.config import BertConfig, RobertaConfig
from dualenc.errors import InputError

TextConfig = BertConfig | RobertaConfig


def encoder_spec(config: TextConfig) -> layers.EncoderSpec:
    return layers.EncoderSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, eps=config.layer_norm_eps, prenorm=False,
        hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        init_stds=(config.initializer_range,) * 4)


@jax.jit
def init(key: jax.Array, config: TextConfig) -> layers.Params:
    """Random params for the tower, initialised as transformers does (the padding rows are zero)."""
    return layers.init_params(key, lambda normal: _build(normal, config))


def _build(normal: layers.Normal, config: TextConfig) -> layers.Params:
    d, std = config.hidden_size, config.initializer_range
    word = normal((config.vocab_size, d), std)
    position = normal((config.max_position_embeddings, d), std)
    if config.pad_token_id is not None:
        word = word.at[config.pad_token_id].set(0.0)
        if isinstance(config, RobertaConfig):
            position = position.at[config.pad_token_id].set(0.0)
    return {
        "embeddings": {
            "word": word,
            "position": position,
            "token_type": normal((config.type_vocab_size, d), std),
            "norm": layers.layer_norm_init(d),
        },
        "encoder": layers.encoder_init(normal, encoder_spec(config)),
        "pooler": layers.dense_init(normal, d, d, std),
    }


def default_position_ids(config: TextConfig, input_ids: jax.Array) -> jax.Array:
    """BERT: 0..L-1. RoBERTa: non-padding tokens count up from pad_token_id + 1; padding gets pad_token_id."""
    if isinstance(config, RobertaConfig):
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def _check_integer(name, value, shape):
    if value is None:
        return
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise InputError(f"{name} must be an array, got {type(value).__name__}")
    if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.bool_)):
        raise InputError(f"{name} must hold integers, got dtype {value.dtype}")
    if name == "position_ids":
        ok = value.ndim in (1, 2) and value.shape[-1] == shape[1] and (value.ndim == 1 or value.shape[0] in (1, shape[0]))
    else:
        ok = tuple(value.shape) == tuple(shape)
    if not ok:
        raise InputError(f"{name} has shape {tuple(value.shape)}, input_ids has shape {tuple(shape)}")


def check_text_inputs(config: TextConfig, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
    """Shape and dtype checks that hold under jit (shapes are static)."""
    if not hasattr(input_ids, "shape") or len(input_ids.shape) != 2:
        raise InputError(f"input_ids must be a 2-D (batch, sequence) array, got shape "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    _check_integer("input_ids", input_ids, input_ids.shape)
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
        _check_integer(name, value, input_ids.shape)
    length = input_ids.shape[1]
    limit = config.max_length if position_ids is None else config.max_position_embeddings
    if length > limit:
        extra = (f" (max_position_embeddings {config.max_position_embeddings} - pad_token_id "
                 f"{config.pad_token_id} - 1)") if limit != config.max_position_embeddings else ""
        raise InputError(f"input_ids has sequence length {length}, longer than the {limit} positions the "
                         f"text tower allows{extra}; truncate the input")
    if length == 0:
        raise InputError("input_ids has sequence length 0; the pooler needs at least one token")


def apply(params: layers.Params, config: TextConfig, input_ids: jax.Array, attention_mask=None,
          token_type_ids=None, position_ids=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False) -> layers.TowerOutput:
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

    Returns:
      TowerOutput: last_hidden_state (B, L, D), pooler_output (B, D) = tanh(dense(first token)), and
      hidden_states/attentions as tuples when requested.
    """
    check_text_inputs(config, input_ids, attention_mask, token_type_ids, position_ids)
    dtype = jnp.dtype(dtype or jnp.float32)
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
            remat_policy=remat_policy, first_only=pooled_only)
    with jax.named_scope("pooler"):
        pooled = jnp.tanh(layers.dense(params["pooler"], last[:, 0], dtype))
    return layers.tower_output(last, pooled, x, states, probs)
