"""The SigLIP vision tower: SiglipVisionModel, init / apply on NCHW pixels.

A patch convolution with bias, no class token, position embeddings over the patches only, pre-LayerNorm
layers, `post_layernorm` on every token, then the multi-head attention pooling head (MAP): a learned probe
attends over the tokens (torch.nn.MultiheadAttention, its q/k/v packed in one `in_proj`), then LayerNorm +
MLP with the residual; the pooled output is the probe's row. Configs with `vision_use_head: false` (the
towers of vision-language models) have no pooled output. The text tower is in clip_text.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.fields import ACTIVATION_NAMES, bool_field, choice_field, float_field, int_field, rate_field, builds
from dualenc.towers import vit
from dualenc.towers.family import ENCODER_OPTIONS, Family


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


def head_specs(spec: layers.EncoderSpec) -> list[declare.Param]:
    """The attention-pooling head's params, named as transformers' SiglipMultiheadAttentionPoolingHead and
    big_vision's MAPHead (whose query, key and value pack into one in_proj, in this order, on its output axis)."""
    d, i = spec.hidden_size, spec.intermediate_size
    _, out_std, fc1_std, fc2_std = spec.init_stds
    attention = "MAPHead_0/MultiHeadDotProductAttention_0/"
    return declare.under(("head",), [
        declare.Param(("probe",), (d,), ("embed",), declare.normal(d ** -0.5), "probe", "cls", "MAPHead_0/probe",
                      "cls", group="head"),
        *declare.dense(("attention", "in_proj"), d, 3 * d, (2.0 / (4 * d)) ** 0.5, ("embed", "qkv"),
                       hf="attention.in_proj", sep="_", bv=tuple(f"{attention}{n}/" for n in ("query", "key", "value")),
                       bv_kinds=declare.ATTENTION_BV_KINDS["query"], group="head"),
        *declare.dense(("attention", "out"), d, d, out_std, ("qkv", "embed"), hf="attention.out_proj",
                       bv=attention + "out/", bv_kinds=declare.ATTENTION_BV_KINDS["out"], group="head"),
        *declare.norm(("norm",), d, hf="layernorm", bv="MAPHead_0/LayerNorm_0/", group="head"),
        *declare.dense(("mlp", "fc1"), d, i, fc1_std, ("embed", "mlp"), hf="mlp.fc1",
                       bv="MAPHead_0/MlpBlock_0/Dense_0/", group="head"),
        *declare.dense(("mlp", "fc2"), i, d, fc2_std, ("mlp", "embed"), hf="mlp.fc2",
                       bv="MAPHead_0/MlpBlock_0/Dense_1/", group="head"),
    ], hf="head.")


def specs(config: SiglipVisionConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to SiglipVisionTransformer
    and to big_vision's image tower (models/vit.py)."""
    d, c = config.hidden_size, config.num_channels
    ph, pw = config.patch_hw
    spec = encoder_spec(config)
    return [
        *declare.conv(("embeddings", "patch"), c, (ph, pw), d, (c * ph * pw) ** -0.5,
                      hf="embeddings.patch_embedding", bv="embedding/"),
        declare.table(("embeddings", "position"), config.num_patches, d, d ** -0.5, "position",
                      hf="embeddings.position_embedding.weight", bv="pos_embedding", bv_kind="pos"),
        *tail_specs(config, spec),
    ]


def tail_specs(config, spec: layers.EncoderSpec) -> list[declare.Param]:
    """What SigLIP's vision towers (this one and NaFlex's) hold after their embeddings: the encoder,
    post_layernorm and the pooling head (with vision_use_head)."""
    return [
        *declare.encoder(spec, "encoder.layers.{i}.", tables.CLIP_LAYER, bv_prefix="Transformer/{blk}/"),
        *declare.norm(("post_norm",), spec.hidden_size, hf="post_layernorm", bv="Transformer/encoder_norm/",
                      group="head"),
        *(head_specs(spec) if config.vision_use_head else []),
    ]


@builds(SiglipVisionConfig)
def _build(normal: layers.Normal, config: SiglipVisionConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def attention_pool(p: layers.Params, x: jax.Array, bias: jax.Array | None, spec: layers.EncoderSpec,
                   dtype, attention: str = "xla") -> jax.Array:
    """(B, D): the MAP head over tokens x (B, L, D); bias (B, 1, 1, L) masks padded tokens (NaFlex)."""
    d = x.shape[-1]
    in_proj = p["attention"]["in_proj"]
    # torch's MultiheadAttention packs q, k, v along the output axis of one projection.
    qkv = {name: {"kernel": in_proj["kernel"][:, i * d:(i + 1) * d], "bias": in_proj["bias"][i * d:(i + 1) * d]}
           for i, name in enumerate(("query", "key", "value"))}
    probe = jnp.broadcast_to(p["probe"].astype(dtype), (x.shape[0], 1, d))
    h, _ = layers.attention({**qkv, "out": p["attention"]["out"]}, x, bias, spec, dtype, None, queries=probe,
                            attention=attention)
    h = h + layers.mlp(p["mlp"], layers.layer_norm(p["norm"], h, spec.eps, dtype), spec.activation, dtype)
    return h[:, 0]


def check_pixel_values(config: SiglipVisionConfig, pixel_values, interpolate_pos_encoding: bool = False):
    vit.check_pixel_values(config, pixel_values, interpolate_pos_encoding)


def apply(params: layers.Params, config: SiglipVisionConfig, pixel_values: jax.Array, *, dropout_key=None,
          output_hidden_states: bool = False, output_attentions: bool = False,
          interpolate_pos_encoding: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None, patch_dropout: float = 0.0,
          patch_key: jax.Array | None = None, keep_indices: jax.Array | None = None) -> layers.TowerOutput:
    """Runs the vision tower.

    Args:
      pixel_values: (B, C, H, W) float images, as transformers' SiglipImageProcessor gives them.
      dropout_key: enables attention dropout (training) when given.
      interpolate_pos_encoding: resize the position grid bicubically for images of another size.
      dtype: compute dtype of the matmuls (default float32).
      pooled_only: refused: the pooling head reads every token.
      attention: the attention implementation, a name in layers.IMPLEMENTATIONS; None: the backend's default.
      patch_dropout, patch_key, keep_indices: FLIP's patch dropout (training), as in vit.apply, among all the
        tokens (there is no class token): the encoder and the pooling head see the kept tokens only.

    Returns:
      TowerOutput: last_hidden_state (B, patches, D) after post_layernorm ((B, K, D) with patch dropout);
      pooler_output (B, D), the head's output (None with vision_use_head false); hidden_states/attentions as
      tuples when requested.
    """
    if pooled_only:
        raise InputError("pooled_only is not supported by the SigLIP vision tower: its attention-pooling head "
                         "reads every token")
    check_pixel_values(config, pixel_values, interpolate_pos_encoding)
    dtype = jnp.dtype(dtype or jnp.float32)
    attention = layers.resolve_attention(attention, dtype)
    b, _, h, w = pixel_values.shape
    ph, pw = config.patch_hw
    emb = params["embeddings"]
    with jax.named_scope("embeddings"):
        x = vit.embed_patches(emb["patch"], pixel_values, (ph, pw), dtype)
        pos = emb["position"]
        if interpolate_pos_encoding:
            pos = vit.resize_positions(pos, config, (h // ph, w // pw), h == w)
        x = x + pos.astype(dtype)[None]
        keep = vit.patch_indices(patch_dropout, patch_key, keep_indices, b, x.shape[1])
        if keep is not None:
            x = vit.take_tokens(x, keep)
    return encode(params, config, x, None, dtype=dtype, dropout_key=dropout_key,
                  output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                  remat_policy=remat_policy, attention=attention)


def encode(params: layers.Params, config, x: jax.Array, bias: jax.Array | None, *, dtype, dropout_key,
           output_hidden_states: bool, output_attentions: bool, remat_policy: str | None,
           attention: str = "xla") -> layers.TowerOutput:
    """What SigLIP's vision towers (this one and NaFlex's) run after their embeddings x: the encoder under the
    key mask `bias`, post_layernorm on every token, and the pooling head (None without vision_use_head)."""
    spec = encoder_spec(config)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, bias, spec, dtype=dtype, key=dropout_key,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy, attention=attention)
    with jax.named_scope("head"):
        last = layers.layer_norm(params["post_norm"], last, config.layer_norm_eps, dtype)
        pooled = attention_pool(params["head"], last, bias, spec, dtype, attention) if config.vision_use_head else None
    return layers.tower_output(last, pooled, x, states, probs)


# ------------------------------------------------------------------------------------------------ checkpoints

def table(config: SiglipVisionConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to SiglipVisionTransformer."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ the family

FAMILIES = (
    Family("siglip_vision", "vision", {"siglip_vision_model": SiglipVisionConfig}, sys.modules[__name__], "map",
           options=(*ENCODER_OPTIONS, "interpolate_pos_encoding", *vit.PATCH_DROPOUT_OPTIONS), stacks=("encoder",),
           check=check_pixel_values, prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight"),
)
