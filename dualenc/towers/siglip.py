"""The SigLIP vision tower: SiglipVisionModel, init / apply on NCHW pixels.

A patch convolution with bias, no class token, position embeddings over the patches only, pre-LayerNorm
layers, `post_layernorm` on every token, then the multi-head attention pooling head (MAP): a learned probe
attends over the tokens (torch.nn.MultiheadAttention, its q/k/v packed in one `in_proj`), then LayerNorm +
MLP with the residual; the pooled output is the probe's row. Configs with `vision_use_head: false` (the
towers of vision-language models) have no pooled output. The text tower is in clip_text.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dualenc import layers, tables
from dualenc.errors import InputError
from dualenc.fields import ACTIVATION_NAMES, bool_field, choice_field, float_field, int_field, rate_field, builds
from dualenc.towers import vit


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(vit.VisionTransformerConfig):
    """transformers' SiglipVisionConfig (model_type "siglip_vision_model", or the vision_config of a "siglip")."""

    model_types: ClassVar[tuple[str, ...]] = ("siglip_vision_model",)

    hidden_size: int = int_field(768)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    num_channels: int = int_field(3, hi=64)
    image_size: int = dataclasses.field(default=224, metadata={"required": True})
    patch_size: int = dataclasses.field(default=16, metadata={"required": True})
    hidden_act: str = choice_field("gelu_pytorch_tanh", ACTIVATION_NAMES)
    layer_norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    attention_dropout: float = rate_field(0.0)
    vision_use_head: bool = bool_field(True)


def encoder_spec(config: SiglipVisionConfig) -> layers.EncoderSpec:
    return layers.EncoderSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, eps=config.layer_norm_eps, prenorm=True,
        attention_dropout=config.attention_dropout,
        init_stds=layers.xavier_stds(config.hidden_size, config.intermediate_size))


def head_init(normal: layers.Normal, spec: layers.EncoderSpec) -> layers.Params:
    """The attention-pooling head's params, named as transformers' SiglipMultiheadAttentionPoolingHead."""
    d, i = spec.hidden_size, spec.intermediate_size
    _, out_std, fc1_std, fc2_std = spec.init_stds
    return {
        "probe": normal((d,), d ** -0.5),
        "attention": {"in_proj": layers.dense_init(normal, d, 3 * d, (2.0 / (4 * d)) ** 0.5),
                      "out": layers.dense_init(normal, d, d, out_std)},
        "norm": layers.layer_norm_init(d),
        "mlp": {"fc1": layers.dense_init(normal, d, i, fc1_std), "fc2": layers.dense_init(normal, i, d, fc2_std)},
    }


@builds(SiglipVisionConfig)
def _build(normal: layers.Normal, config: SiglipVisionConfig) -> layers.Params:
    d, c = config.hidden_size, config.num_channels
    ph, pw = config.patch_hw
    spec = encoder_spec(config)
    params = {
        "embeddings": {
            "patch": {"kernel": normal((c, ph, pw, d), (c * ph * pw) ** -0.5), "bias": jnp.zeros((d,), jnp.float32)},
            "position": normal((config.num_patches, d), d ** -0.5),
        },
        "encoder": layers.encoder_init(normal, spec),
        "post_norm": layers.layer_norm_init(d),
    }
    if config.vision_use_head:
        params["head"] = head_init(normal, spec)
    return params


init = layers.tower_init(_build)  # init(key, config) -> params


def attention_pool(p: layers.Params, x: jax.Array, bias: jax.Array | None, spec: layers.EncoderSpec,
                   dtype) -> jax.Array:
    """(B, D): the MAP head over tokens x (B, L, D); bias (B, 1, 1, L) masks padded tokens (NaFlex)."""
    d = x.shape[-1]
    in_proj = p["attention"]["in_proj"]
    # torch's MultiheadAttention packs q, k, v along the output axis of one projection.
    qkv = {name: {"kernel": in_proj["kernel"][:, i * d:(i + 1) * d], "bias": in_proj["bias"][i * d:(i + 1) * d]}
           for i, name in enumerate(("query", "key", "value"))}
    probe = jnp.broadcast_to(p["probe"].astype(dtype), (x.shape[0], 1, d))
    h, _ = layers.attention({**qkv, "out": p["attention"]["out"]}, x, bias, spec, dtype, None, queries=probe)
    h = h + layers.mlp(p["mlp"], layers.layer_norm(p["norm"], h, spec.eps, dtype), spec.activation, dtype)
    return h[:, 0]


def check_pixel_values(config: SiglipVisionConfig, pixel_values, interpolate_pos_encoding: bool = False):
    vit.check_pixel_values(config, pixel_values, interpolate_pos_encoding)


def apply(params: layers.Params, config: SiglipVisionConfig, pixel_values: jax.Array, *, dropout_key=None,
          output_hidden_states: bool = False, output_attentions: bool = False,
          interpolate_pos_encoding: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False) -> layers.TowerOutput:
    """Runs the vision tower.

    Args:
      pixel_values: (B, C, H, W) float images, as transformers' SiglipImageProcessor gives them.
      dropout_key: enables attention dropout (training) when given.
      interpolate_pos_encoding: resize the position grid bicubically for images of another size.
      dtype: compute dtype of the matmuls (default float32).
      pooled_only: refused: the pooling head reads every token.

    Returns:
      TowerOutput: last_hidden_state (B, patches, D) after post_layernorm; pooler_output (B, D), the head's
      output (None with vision_use_head false); hidden_states/attentions as tuples when requested.
    """
    if pooled_only:
        raise InputError("pooled_only is not supported by the SigLIP vision tower: its attention-pooling head "
                         "reads every token")
    check_pixel_values(config, pixel_values, interpolate_pos_encoding)
    dtype = jnp.dtype(dtype or jnp.float32)
    _, _, h, w = pixel_values.shape
    ph, pw = config.patch_hw
    emb = params["embeddings"]
    with jax.named_scope("embeddings"):
        x = vit.embed_patches(emb["patch"], pixel_values, (ph, pw), dtype)
        pos = emb["position"]
        if interpolate_pos_encoding:
            pos = vit.resize_positions(pos, config, (h // ph, w // pw), h == w)
        x = x + pos.astype(dtype)[None]
    return encode(params, config, x, None, dtype=dtype, dropout_key=dropout_key,
                  output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                  remat_policy=remat_policy)


def encode(params: layers.Params, config, x: jax.Array, bias: jax.Array | None, *, dtype, dropout_key,
           output_hidden_states: bool, output_attentions: bool, remat_policy: str | None) -> layers.TowerOutput:
    """What SigLIP's vision towers (this one and NaFlex's) run after their embeddings x: the encoder under the
    key mask `bias`, post_layernorm on every token, and the pooling head (None without vision_use_head)."""
    spec = encoder_spec(config)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, bias, spec, dtype=dtype, key=dropout_key,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy)
    with jax.named_scope("head"):
        last = layers.layer_norm(params["post_norm"], last, config.layer_norm_eps, dtype)
        pooled = attention_pool(params["head"], last, bias, spec, dtype) if config.vision_use_head else None
    return layers.tower_output(last, pooled, x, states, probs)


# ------------------------------------------------------------------------------------------------ checkpoints

def head_table(prefix: str) -> list[tables.Entry]:
    """The pooling head's entries (SiglipMultiheadAttentionPoolingHead) under `prefix`."""
    return [
        tables.Entry(f"{prefix}probe", ("head", "probe"), "cls"),
        *tables.dense(f"{prefix}attention.in_proj", ("head", "attention", "in_proj"), sep="_"),
        *tables.dense(f"{prefix}attention.out_proj", ("head", "attention", "out")),
        *tables.norm(f"{prefix}layernorm", ("head", "norm")),
        *tables.dense(f"{prefix}mlp.fc1", ("head", "mlp", "fc1")),
        *tables.dense(f"{prefix}mlp.fc2", ("head", "mlp", "fc2")),
    ]


def table(config: SiglipVisionConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to SiglipVisionTransformer."""
    E = tables.Entry
    return [
        E("embeddings.patch_embedding.weight", ("embeddings", "patch", "kernel"), "conv"),
        E("embeddings.patch_embedding.bias", ("embeddings", "patch", "bias"), "id"),
        E("embeddings.position_embedding.weight", ("embeddings", "position"), "id"),
        *tables.layer("encoder.layers.{i}.", tables.CLIP_LAYER),
        *tables.norm("post_layernorm", ("post_norm",)),
        *(head_table("head.") if config.vision_use_head else []),
    ]
