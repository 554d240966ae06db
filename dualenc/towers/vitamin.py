"""The ViTamin tower family: timm's ViTamin (the image towers of open_clip's ViTamin-* configs), init / apply on NCHW
pixels.

A convolutional stem and stages feed a ViT whose MLPs are GeGLUs (timm/models/vitamin.py over its
VisionTransformer). The stem: a 3x3 stride-2 convolution, a LayerNorm over channels (timm's LayerNorm2d) and GELU,
a 3x3 convolution. Each stage: MbConv blocks (LayerNorm over channels, a 1x1 expansion to make_divisible(4 * width)
channels, GELU, a 3x3 depthwise convolution, GELU, a 1x1 projection, plus the shortcut), the first of a stage with
stride 2 (its shortcut a 3x3 stride-2 average pool that leaves the zero padding out of the mean, then a 1x1
convolution where the width changes). Then a LayerNorm over channels and a 3x3 stride-2 convolution to the
transformer's width: every 3x3 convolution is zero-padded by 1, so each halving gives ceil(side / 2). The grid's
tokens (no class token) plus a learned position table (none for the xlarge models) run through pre-norm blocks
(fused q/k/v with biases; the MLP a LayerNorm, then gelu(gate(x)) * fc1(x), then fc2). No final LayerNorm on the
tokens: the pooled output is the LayerNorm (timm's fc_norm) of their mean. Every LayerNorm has eps 1e-6.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.fields import (
    TransformerConfig, bool_field, builds, check_int, fail, float_field, int_field, rate_field,
)
from dualenc.layers import multihead
from dualenc.layers.transformer import EncoderSpec
from dualenc.towers.family import Family
from dualenc.towers.inputs import check_image_layout

EXPAND = 4.0  # an MbConv block's expansion (timm's VitConvCfg.expand_ratio), of its output width
BACKBONE = "patch_embed.backbone."  # timm's names of the convolutional part


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's make_divisible: the nearest multiple of divisor (at least divisor), never under 90% of value."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VitaminConfig(TransformerConfig):
    """timm's ViTamin (model_type "vitamin", dualenc's own: transformers has no ViTamin model).

    Fields as timm's: hidden_size (the transformer's embed_dim, also the last convolution's width),
    num_hidden_layers (depth), num_attention_heads, intermediate_size (int(embed_dim * mlp_ratio)), stem_size
    (VitCfg.stem_width), stage_sizes and stage_depths (VitCfg.embed_dim[:2] and depths[:2]: the MbConv stages),
    image_size, position_embedding (false: pos_embed "none"), layer_norm_eps (every LayerNorm's), drop_path_rate
    (stochastic depth on the transformer blocks, rising linearly over them as timm's; the MbConv blocks have
    none). The defaults are vitamin_small_224's.
    """

    model_types: ClassVar[tuple[str, ...]] = ("vitamin",)
    size_fields: ClassVar[str] = "hidden_size, intermediate_size, num_hidden_layers, stage_sizes, stage_depths"

    hidden_size: int = int_field(384)
    num_hidden_layers: int = int_field(14, hi=1024)
    num_attention_heads: int = int_field(6, hi=4096)
    intermediate_size: int = int_field(768, hi=1 << 18)
    stem_size: int = int_field(64)
    stage_sizes: tuple[int, ...] = dataclasses.field(default=(64, 128), metadata={"required": True})
    stage_depths: tuple[int, ...] = dataclasses.field(default=(2, 4), metadata={"required": True})
    image_size: int = int_field(224, hi=8192)
    num_channels: int = int_field(3, hi=64)
    position_embedding: bool = bool_field(True)
    layer_norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    drop_path_rate: float = rate_field(0.0)
    initializer_range: float = float_field(0.02)

    def _validate(self):
        for name in ("stage_sizes", "stage_depths"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not 1 <= len(value) <= 8:
                fail(self.name, name, f"must be a list of 1 to 8 integers, got {value!r}")
            for v in value:
                check_int(self.name, name, v, 1, 1 << 16 if name == "stage_sizes" else 1024)
        if len(self.stage_sizes) != len(self.stage_depths):
            fail(self.name, "stage_depths", f"has {len(self.stage_depths)} entries, stage_sizes "
                                            f"{len(self.stage_sizes)}")
        if self.num_patches > 1 << 16:
            fail(self.name, "image_size", f"gives {self.num_patches} tokens, over the limit of {1 << 16}")
        super()._validate()

    @property
    def side(self) -> int:
        """The token grid's side: image_size halved (rounding up) by the stem, each stage and the last
        convolution."""
        side = self.image_size
        for _ in range(len(self.stage_sizes) + 2):
            side = -(-side // 2)
        return side

    @property
    def num_patches(self) -> int:
        return self.side ** 2

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.num_hidden_layers, self.hidden_size, self.num_attention_heads, self.intermediate_size,
                           "gelu", self.layer_norm_eps, prenorm=True)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.num_hidden_layers,
                                                   dtype=np.float32))

    def blocks(self) -> list[tuple[int, int, int, int, int]]:
        """(stage, block, in width, out width, stride) of every MbConv block, in order."""
        out, width = [], self.stem_size
        for s, (size, depth) in enumerate(zip(self.stage_sizes, self.stage_depths)):
            for j in range(depth):
                out.append((s, j, width, size, 2 if j == 0 else 1))
                width = size
        return out


def specs(config: VitaminConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names as timm's ViTamin with the blocks'
    q/k/v split (q_proj, k_proj, v_proj). The convolutions and position table are the "embeddings" group, the
    blocks the "encoder" stack, fc_norm the "head"."""
    d, m, depth, std = config.hidden_size, config.intermediate_size, config.num_hidden_layers, \
        config.initializer_range
    conv = lambda path, c_in, k, c_out, hf: declare.conv(("embeddings",) + path, c_in, (k, k), c_out, std,  # noqa: E731
                                                         hf=BACKBONE + hf)
    norm2d = lambda path, width, hf: declare.norm(("embeddings",) + path, width, hf=BACKBONE + hf)  # noqa: E731
    out = [*conv(("stem", "conv1"), config.num_channels, 3, config.stem_size, "stem.conv1"),
           *norm2d(("stem", "norm"), config.stem_size, "stem.norm1"),
           *conv(("stem", "conv2"), config.stem_size, 3, config.stem_size, "stem.conv2")]
    for s, j, c_in, c_out, stride in config.blocks():
        path, hf, mid = ("stages", str(s), str(j)), f"stages.{s}.{j}.", make_divisible(c_out * EXPAND)
        if c_in != c_out:
            out += conv(path + ("shortcut",), c_in, 1, c_out, hf + ("shortcut.expand" if stride == 2 else "shortcut"))
        out += norm2d(path + ("norm",), c_in, hf + "pre_norm")
        out += conv(path + ("expand",), c_in, 1, mid, hf + "conv1_1x1")
        out += [declare.Param(("embeddings",) + path + ("depthwise", "kernel"), (1, 3, 3, mid),
                              ("channels", "patch", "patch", "embed"), declare.normal(std),
                              f"{BACKBONE}{hf}conv2_kxk.weight", "conv", decay=True),
                declare.Param(("embeddings",) + path + ("depthwise", "bias"), (mid,), ("embed",), declare.ZEROS,
                              f"{BACKBONE}{hf}conv2_kxk.bias")]
        out += conv(path + ("project",), mid, 1, c_out, hf + "conv3_1x1")
    out += norm2d(("pool", "norm"), config.stage_sizes[-1], "pool.norm")
    out += conv(("pool", "conv"), config.stage_sizes[-1], 3, d, "pool.proj")
    if config.position_embedding:
        out.append(declare.table(("embeddings", "position"), config.num_patches, d, std, "position", hf="pos_embed",
                                 hf_kind="pos"))
    layer = "blocks.{i}."

    def dense(path, d_in, d_out, axes, hf):
        return declare.dense(("encoder",) + path, d_in, d_out, std, axes, hf=layer + hf, group="layers", layers=depth)

    def norm(path, hf):
        return declare.norm(("encoder",) + path, d, hf=layer + hf, group="layers", layers=depth)

    out += norm(("attention_norm",), "norm1")
    for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out += dense(("attention", name), d, d, ("embed", "qkv"), "attn." + hf)
    out += dense(("attention", "out"), d, d, ("qkv", "embed"), "attn.proj")
    out += norm(("mlp_norm",), "norm2")
    out += norm(("mlp", "norm"), "mlp.norm")
    out += dense(("mlp", "gate"), d, m, ("embed", "mlp"), "mlp.w0")
    out += dense(("mlp", "fc1"), d, m, ("embed", "mlp"), "mlp.w1")
    out += dense(("mlp", "fc2"), m, d, ("mlp", "embed"), "mlp.w2")
    out += declare.norm(("post_norm",), d, hf="fc_norm", group="head")
    return out


@builds(VitaminConfig)
def _build(normal: layers.Normal, config: VitaminConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def check_pixel_values(config: VitaminConfig, pixel_values, interpolate_pos_encoding: bool = False):
    """Shape and dtype checks that hold under jit: (B, num_channels, H, W) floats; H = W = image_size with a
    position table, any size without one (the xlarge models)."""
    check_image_layout(config, pixel_values)
    shape = pixel_values.shape
    if config.position_embedding and tuple(shape[2:]) != (config.image_size,) * 2:
        raise InputError(f"pixel_values of size {shape[2]}x{shape[3]} does not match the model's image_size "
                         f"{config.image_size}x{config.image_size} (its position table is for that grid)")


def conv(p: layers.Params, x_BHWC: jax.Array, dtype, stride: int = 1, groups: int = 1) -> jax.Array:
    """A 3x3 convolution zero-padded by 1 (torch's padding=1), or a 1x1 one (a dense layer over channels), with
    its bias; accumulated in float32. groups = channels: depthwise."""
    kernel = p["kernel"]
    if kernel.shape[1:3] == (1, 1) and groups == 1:
        return layers.dense({"kernel": kernel[:, 0, 0], "bias": p["bias"]}, x_BHWC, dtype)
    y = lax.conv_general_dilated(x_BHWC.astype(dtype), kernel.astype(dtype), (stride, stride), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "IHWO", "NHWC"), feature_group_count=groups,
                                 preferred_element_type=jnp.float32)
    return (y + layers.lead(p["bias"], 4)).astype(dtype)


def average_pool(x_BHWC: jax.Array) -> jax.Array:
    """torch's AvgPool2d(3, stride 2, padding 1, count_include_pad=False): the mean of each window's real
    positions, in float32."""
    window, strides, pad = (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    x32 = x_BHWC.astype(jnp.float32)
    total = lax.reduce_window(x32, 0.0, lax.add, window, strides, pad)
    count = lax.reduce_window(jnp.ones((1, *x32.shape[1:3], 1), jnp.float32), 0.0, lax.add, window, strides, pad)
    return (total / count).astype(x_BHWC.dtype)


def mbconv(p: layers.Params, x: jax.Array, stride: int, eps: float, dtype) -> jax.Array:
    """One MbConv block on (B, H, W, C)."""
    gelu = layers.ACTIVATIONS["gelu"]
    shortcut = average_pool(x) if stride == 2 else x
    if "shortcut" in p:
        shortcut = conv(p["shortcut"], shortcut, dtype)
    y = layers.layer_norm(p["norm"], x, eps, dtype)
    y = gelu(conv(p["expand"], y, dtype))
    y = gelu(conv(p["depthwise"], y, dtype, stride, groups=y.shape[-1]))
    return conv(p["project"], y, dtype) + shortcut.astype(dtype)


def embed(p: layers.Params, config: VitaminConfig, pixel_values: jax.Array, dtype) -> jax.Array:
    """The convolutional part (timm's HybridEmbed): (B, C, H, W) pixels -> (B, side * side, hidden_size) tokens
    in row-major order, plus the position table where there is one."""
    eps, gelu = config.layer_norm_eps, layers.ACTIVATIONS["gelu"]
    x = conv(p["stem"]["conv1"], jnp.transpose(pixel_values, (0, 2, 3, 1)), dtype, 2)
    x = conv(p["stem"]["conv2"], gelu(layers.layer_norm(p["stem"]["norm"], x, eps, dtype)), dtype)
    for s, j, _, _, stride in config.blocks():
        x = mbconv(p["stages"][str(s)][str(j)], x, stride, eps, dtype)
    x = conv(p["pool"]["conv"], layers.layer_norm(p["pool"]["norm"], x, eps, dtype), dtype, 2)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if "position" in p:
        x = x + p["position"].astype(dtype)[None]
    return x


def block(p: layers.Params, x: jax.Array, config: VitaminConfig, dtype, keep: jax.Array | None = None,
          scale: jax.Array | None = None) -> jax.Array:
    """One pre-norm transformer block with the GeGLU MLP; keep (2, B) bool drops each branch of the other
    samples (drop path), scaling the kept ones by `scale` (1 / (1 - rate))."""
    eps = config.layer_norm_eps

    def drop(y, i):
        if keep is None:
            return y
        return jnp.where(keep[i].reshape(-1, 1, 1), y * scale.astype(dtype), jnp.zeros((), dtype))

    a, _ = multihead.attention(p["attention"], layers.layer_norm(p["attention_norm"], x, eps, dtype), None,
                               config.spec, dtype, None)
    x = x + drop(a, 0)
    mp = p["mlp"]
    y = layers.layer_norm(mp["norm"], layers.layer_norm(p["mlp_norm"], x, eps, dtype), eps, dtype)
    y = layers.ACTIVATIONS["gelu"](layers.dense(mp["gate"], y, dtype)) * layers.dense(mp["fc1"], y, dtype)
    return x + drop(layers.dense(mp["fc2"], y, dtype), 1)


def apply(params: layers.Params, config: VitaminConfig, pixel_values: jax.Array, *, dropout_key=None, dtype=None,
          output_hidden_states: bool = False, remat_policy: str | None = None) -> layers.TowerOutput:
    """Runs the ViTamin tower.

    Args:
      pixel_values: (B, C, image_size, image_size) float images (any size without a position table).
      dropout_key: enables drop path (training) on the transformer blocks at config.drop_path_rates when given.
      dtype: compute dtype of the convolutions and matmuls (default float32); LayerNorm statistics and softmax in
        float32.
      output_hidden_states: also return the tokens entering the blocks and each block's output.
      remat_policy: a name in jax.checkpoint_policies to rematerialise each block under grad.

    Returns:
      TowerOutput: last_hidden_state (B, tokens, D), the last block's output (timm's forward_features);
      pooler_output (B, D): the LayerNorm of the tokens' mean; hidden_states when requested.
    """
    check_pixel_values(config, pixel_values)
    dtype = jnp.dtype(dtype or jnp.float32)
    with jax.named_scope("embeddings"):
        x = embed(params["embeddings"], config, pixel_values, dtype)
    embeddings = x
    with jax.named_scope("encoder"):
        x, states = layers.run_blocks(lambda p, h, keep, scale: block(p, h, config, dtype, keep, scale), params["encoder"],
                                      x, dropout_key=dropout_key, drop_path_rates=config.drop_path_rates,
                                      remat_policy=remat_policy, collect=output_hidden_states)
    with jax.named_scope("pooler"):
        pooled = layers.layer_norm(params["post_norm"], jnp.mean(x.astype(jnp.float32), axis=1),
                                   config.layer_norm_eps, dtype)
    hidden = (embeddings, *states) if output_hidden_states else None
    return layers.TowerOutput(x, pooled, hidden)


def table(config: VitaminConfig) -> list[tables.Entry]:
    """The tower's key table, names as timm's ViTamin (q/k/v split)."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("vitamin", "vision", {"vitamin": VitaminConfig}, sys.modules[__name__], "gap",
           options=("output_hidden_states", "remat_policy"), stacks=("encoder",), check=check_pixel_values,
           anchor=BACKBONE + "stem.conv1.weight"),
)
