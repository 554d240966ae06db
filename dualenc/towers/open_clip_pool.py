"""open_clip's AttentionalPooler as the image pooling of its CoCa towers (vit.OpenCLIPVisionConfig with
attention_pool_size): its first query, the contrastive embedding, declared and applied.

open_clip's pooler holds attn_pooler_queries learned queries; each attends on its own (the queries never mix), and
CoCa's contrastive embedding is the first one's output; the others feed its captioning decoder, which a dual
encoder does not run, so only the first is held here. The query and the tokens each pass a LayerNorm (torch's
default eps, whatever the tower's norm_kwargs), then torch's MultiheadAttention with the tower's width as its key and
value width (kdim, vdim) and attention_pool_size as its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare

EPS = 1e-5


def specs(config) -> list[declare.Param]:
    """The pooler's params under "pool", named as dualenc's own checkpoint layout ("attentional_pool.*")."""
    d, p = config.hidden_size, config.attention_pool_size
    projections = [param for part, d_in, short in (("query", p, "q"), ("key", d, "k"), ("value", d, "v"))
                   for param in declare.dense(("attention", part), d_in, p, d_in ** -0.5, ("embed", "qkv"),
                                              hf=f"attention.{short}_proj", group="head")]
    return declare.under(("pool",), [
        declare.Param(("query",), (p,), ("embed",), declare.normal(1.0), "query", group="head"),
        *declare.norm(("query_norm",), p, hf="query_norm", group="head"),
        *declare.norm(("key_norm",), d, hf="key_norm", group="head"),
        *projections,
        *declare.dense(("attention", "out"), p, p, p ** -0.5, ("qkv", "embed"), hf="attention.out_proj",
                       group="head"),
    ], hf="attentional_pool.")


def apply(p: layers.Params, config, spec: layers.EncoderSpec, x: jax.Array, dtype, attention: str) -> jax.Array:
    """(B, attention_pool_size): the first query's output over the tokens x (B, L, hidden_size); spec: the
    tower's encoder spec (its activation and init are not read)."""
    spec = dataclasses.replace(spec, hidden_size=config.attention_pool_size, num_heads=config.attention_pool_heads,
                               attention_dropout=0.0)
    keys = layers.layer_norm(p["key_norm"], x, EPS, dtype)
    query = layers.layer_norm(p["query_norm"], p["query"], EPS, dtype)
    query = jnp.broadcast_to(query, (x.shape[0], 1, config.attention_pool_size))
    out, _ = layers.attention(p["attention"], keys, None, spec, dtype, None, queries=query, attention=attention)
    return out[:, 0]
