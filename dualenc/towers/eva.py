"""The EVA tower family: timm's Eva (EVA-CLIP's EVA01 and EVA02 image towers, and Meta's Perception Encoder
PE-Core, as open_clip builds them through timm), init / apply on NCHW pixels.

A ViT with a class token (PE-Core-bigG has none) and a learned position table (class token included), a
LayerNorm before the blocks where the config says (PE's use_pre_transformer_norm, whose patch embedding has no
bias), then blocks that differ from ViT's where the config says: rotary position embeddings on the patch tokens'
queries and keys (timm's RotaryEmbeddingCat with in_pixels=False: per head, a quarter of the head size of
frequency bands 1 / temperature ** (j / bands) over the row and column indices plus rope_grid_offset, each scaled
by ref_feat_shape / grid, the row frequencies first ("ij") or the column ones ("xy", PE), in the interleaved
layout of apply_rot_embed_cat), a LayerNorm on the attention output before its projection (scale_attn_inner), a
SwiGLU MLP (silu(fc1_g(x)) * fc1_x(x)) with a LayerNorm on its hidden layer (scale_mlp), and post-norm blocks
(x + norm(f(x)), EVA02-E). The key projection has no bias in EVA's attention, one in PE's (timm's AttentionRope).
The final LayerNorm normalises every token; the pooled output is the class token (global_pool "token") or timm's
AttentionPoolLatent over every token (global_pool "map", PE: a learned latent query with its own heads, then
LayerNorm + GELU MLP with the residual; dualenc.towers.siglip's MAP head), through the head (timm's classifier,
a Linear with bias to open_clip's embed_dim) where there is one.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import layers, params as declare, tables
from dualenc.fields import (
    TransformerConfig, bool_field, builds, check_int, choice_field, fail, float_field, int_field, rate_field,
)
from dualenc.towers import siglip, vit
from dualenc.towers.family import Family

MLPS = ("swiglu", "gelu")  # timm's SwiGLU (split fc1_g / fc1_x; with scale_mlp) or Mlp with GELU
POOLS = ("token", "map")  # timm's global_pool: the class token, or AttentionPoolLatent
GRID_INDEXING = ("ij", "xy")  # timm's rope_grid_indexing: row frequencies first, or column ones


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EvaConfig(TransformerConfig):
    """timm's Eva (model_type "eva", dualenc's own: transformers has no EVA model).

    Fields as timm's Eva arguments: hidden_size (embed_dim), intermediate_size (int(embed_dim * mlp_ratio)),
    mlp ("swiglu": swiglu_mlp, or "gelu"), scale_mlp, scale_attn_inner, post_norm (use_post_norm),
    rope (use_rot_pos_emb), ref_feat_shape (None, or the (rows, columns) the rotary grid is scaled to),
    rope_temperature, rope_grid_offset, rope_grid_indexing, layer_norm_eps (timm's LayerNorm: 1e-6; PE's 1e-5),
    head_size (the classifier's width: open_clip's embed_dim when its timm_proj is null; None for none),
    drop_path_rate (stochastic depth, rising linearly over the blocks as timm's), class_token, patch_bias,
    pre_norm (use_pre_transformer_norm), key_bias (attn_type "rope": AttentionRope's qkv bias covers the key),
    global_pool ("token" or "map"), pool_heads and pool_mlp_ratio (attn_pool_num_heads, attn_pool_mlp_ratio:
    the "map" head's). The defaults are EVA02-B-16's image tower (its optional parts: the train state's
    catalogue of params reads them; PE's extra params, pre_norm, the key bias and the "map" head, carry the
    names the CLIP and SigLIP towers declare them under, so the catalogue holds them too).
    """

    model_types: ClassVar[tuple[str, ...]] = ("eva",)

    hidden_size: int = int_field(768)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    intermediate_size: int = int_field(2048, hi=1 << 18)
    image_size: int = int_field(224, hi=8192)
    patch_size: int = int_field(16, hi=8192)
    num_channels: int = int_field(3, hi=64)
    mlp: str = choice_field("swiglu", MLPS)
    scale_mlp: bool = bool_field(True)
    scale_attn_inner: bool = bool_field(True)
    post_norm: bool = bool_field(False)
    rope: bool = bool_field(True)
    ref_feat_shape: tuple[int, int] | None = (16, 16)
    rope_temperature: float = float_field(10000.0, lo_open=True)
    layer_norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    head_size: int | None = int_field(512, required=False)
    drop_path_rate: float = rate_field(0.0)
    initializer_range: float = float_field(0.02)
    class_token: bool = bool_field(True)
    patch_bias: bool = bool_field(True)
    pre_norm: bool = bool_field(False)
    key_bias: bool = bool_field(False)
    rope_grid_offset: float = float_field(0.0)
    rope_grid_indexing: str = choice_field("ij", GRID_INDEXING)
    global_pool: str = choice_field("token", POOLS)
    pool_heads: int = int_field(8, hi=4096, required=False)
    pool_mlp_ratio: float = float_field(4.0, hi=1024.0, lo_open=True)

    def _validate(self):
        if isinstance(self.ref_feat_shape, list):
            object.__setattr__(self, "ref_feat_shape", tuple(self.ref_feat_shape))
        if self.ref_feat_shape is not None:
            if not isinstance(self.ref_feat_shape, tuple) or len(self.ref_feat_shape) != 2:
                fail(self.name, "ref_feat_shape", f"must be null or a pair of integers, got {self.ref_feat_shape!r}")
            for v in self.ref_feat_shape:
                check_int(self.name, "ref_feat_shape", v, 1, 8192)
        if self.patch_size > self.image_size:
            fail(self.name, "patch_size", f"{self.patch_size} is larger than image_size {self.image_size}")
        if self.mlp == "swiglu" and not self.scale_mlp:
            fail(self.name, "scale_mlp", "= false with mlp 'swiglu' (timm's packed GluMlp) is not implemented; "
                                         "supported: true")
        if self.rope and (self.hidden_size // max(self.num_attention_heads, 1)) % 4:
            fail(self.name, "num_attention_heads", f"gives a head size of {self.hidden_size} / "
                                                   f"{self.num_attention_heads}, not a multiple of 4 (rope)")
        if self.global_pool == "token" and not self.class_token:
            fail(self.name, "global_pool", "'token' needs the class token (class_token is false)")
        if self.global_pool == "map" and self.hidden_size % self.pool_heads:
            fail(self.name, "pool_heads", f"= {self.pool_heads} does not divide hidden_size {self.hidden_size}")
        super()._validate()

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    @property
    def patch_hw(self) -> tuple[int, int]:
        return self.patch_size, self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def prefix_tokens(self) -> int:
        """The tokens before the patches (the class token), which take no rotary embedding."""
        return int(self.class_token)

    @property
    def pool_spec(self) -> layers.EncoderSpec:
        """The "map" head's attention and MLP (timm's AttentionPoolLatent: GELU, the tower's LayerNorm eps)."""
        d = self.hidden_size
        return layers.EncoderSpec(num_layers=1, hidden_size=d, num_heads=self.pool_heads,
                                  intermediate_size=int(d * self.pool_mlp_ratio), activation="gelu",
                                  eps=self.layer_norm_eps, prenorm=True, init_stds=(self.initializer_range,) * 4)

    @property
    def pooled_size(self) -> int:
        """The width of pooler_output: head_size with the head, else hidden_size."""
        return self.head_size or self.hidden_size

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.num_hidden_layers,
                                                   dtype=np.float32))


def specs(config: EvaConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names as timm's Eva with split q/k/v
    (qkv_fused=False), the "map" head's as SiglipVisionModel's (its q and kv packed as one in_proj). The blocks
    are the "encoder" stack."""
    d, m, depth, std = config.hidden_size, config.intermediate_size, config.num_hidden_layers, \
        config.initializer_range
    layer = "blocks.{i}."

    def dense(path, d_in, d_out, axes, hf, bias=True):
        return declare.dense(("encoder",) + path, d_in, d_out, std, axes, hf=layer + hf, bias=bias, group="layers",
                             layers=depth)

    def norm(path, width, hf):
        return declare.norm(("encoder",) + path, width, hf=layer + hf, group="layers", layers=depth)

    out = declare.conv(("embeddings", "patch"), config.num_channels, config.patch_hw, d, std, hf="patch_embed.proj",
                       bias=config.patch_bias)
    if config.class_token:
        out.append(declare.Param(("embeddings", "cls"), (d,), ("embed",), declare.normal(std), "cls_token", "cls"))
    out.append(declare.table(("embeddings", "position"), config.num_patches + config.prefix_tokens, d, std,
                             "position", hf="pos_embed", hf_kind="pos"))
    if config.pre_norm:
        out += declare.norm(("pre_norm",), d, hf="norm_pre")
    out += norm(("attention_norm",), d, "norm1")
    out += dense(("attention", "query"), d, d, ("embed", "qkv"), "attn.q_proj")
    out += dense(("attention", "key"), d, d, ("embed", "qkv"), "attn.k_proj", bias=config.key_bias)
    out += dense(("attention", "value"), d, d, ("embed", "qkv"), "attn.v_proj")
    if config.scale_attn_inner:
        out += norm(("attention", "norm"), d, "attn.norm")
    out += dense(("attention", "out"), d, d, ("qkv", "embed"), "attn.proj")
    out += norm(("mlp_norm",), d, "norm2")
    if config.mlp == "swiglu":
        out += dense(("mlp", "gate"), d, m, ("embed", "mlp"), "mlp.fc1_g")
        out += dense(("mlp", "fc1"), d, m, ("embed", "mlp"), "mlp.fc1_x")
    else:
        out += dense(("mlp", "fc1"), d, m, ("embed", "mlp"), "mlp.fc1")
    if config.scale_mlp:
        out += norm(("mlp", "norm"), m, "mlp.norm")
    out += dense(("mlp", "fc2"), m, d, ("mlp", "embed"), "mlp.fc2")
    out += declare.norm(("post_norm",), d, hf="norm", group="head")
    if config.global_pool == "map":
        out += siglip.head_specs(config.pool_spec)
    if config.head_size:
        out += declare.dense(("head",), d, config.head_size, std, ("embed", "mlp"), hf="head", group="head")
    return out


@builds(EvaConfig)
def _build(normal: layers.Normal, config: EvaConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def check_pixel_values(config: EvaConfig, pixel_values, interpolate_pos_encoding: bool = False):
    """(B, num_channels, image_size, image_size) floats: the position table and rotary grid are the config's."""
    vit.check_pixel_values(config, pixel_values, False)


def rope_tables(config: EvaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each (patches, head size) float32: timm's RotaryEmbeddingCat(in_pixels=False) embedding for
    the config's grid, computed in float32 as timm does (bands 1 / T ** (j / n), index grid plus
    rope_grid_offset scaled by ref_feat_shape / grid, row frequencies then column frequencies ("ij"; the other
    way round for "xy"), each repeated twice: interleaved pairs)."""
    head = config.hidden_size // config.num_attention_heads
    n = head // 4
    exp = np.arange(n, dtype=np.int64).astype(np.float32) / np.float32(n)
    bands = np.float32(1.0) / np.power(np.float32(config.rope_temperature), exp)
    grid = config.grid
    ref = config.ref_feat_shape
    axes = [np.arange(s, dtype=np.int64).astype(np.float32) + np.float32(config.rope_grid_offset) for s in grid]
    if ref is not None:
        axes = [a / np.float32(s) * np.float32(r) for a, s, r in zip(axes, grid, ref)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (gh, gw, 2): (row, column)
    if config.rope_grid_indexing == "xy":
        coords = coords[..., ::-1]  # (column, row), the same positions
    angles = (coords[..., None] * bands).reshape(grid[0] * grid[1], 2 * n)
    return (np.repeat(np.sin(angles), 2, axis=-1).astype(np.float32),
            np.repeat(np.cos(angles), 2, axis=-1).astype(np.float32))


def rotate(x: jax.Array, sin: np.ndarray, cos: np.ndarray) -> jax.Array:
    """x * cos + rot(x) * sin over the last axis (pairs (x0, x1) -> (-x1, x0)), in float32; x (B, N, H, K)."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[None, :, None] + turned * sin[None, :, None]).astype(x.dtype)


def attention(p: layers.Params, x: jax.Array, config: EvaConfig, rope, dtype) -> jax.Array:
    """EVA's self-attention on (B, L, D): q/k/v (a key bias with key_bias), the rotary embedding on the patch
    tokens, the inner LayerNorm (scale_attn_inner), the output projection."""
    b, l, d = x.shape
    h = config.num_attention_heads
    k = d // h
    q, key, v = (layers.dense(p[name], x, dtype).reshape(b, l, h, k) for name in ("query", "key", "value"))
    if rope is not None:
        n = config.prefix_tokens
        q, key = (jnp.concatenate([t[:, :n], rotate(t[:, n:], *rope)], axis=1) for t in (q, key))
    q = q * jnp.asarray(k ** -0.5, dtype)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(b, l, d).astype(dtype)
    if "norm" in p:
        out = layers.layer_norm(p["norm"], out, config.layer_norm_eps, dtype)
    return layers.dense(p["out"], out, dtype)


def mlp(p: layers.Params, x: jax.Array, config: EvaConfig, dtype) -> jax.Array:
    if "gate" in p:
        y = jax.nn.silu(layers.dense(p["gate"], x, dtype)) * layers.dense(p["fc1"], x, dtype)
    else:
        y = layers.ACTIVATIONS["gelu"](layers.dense(p["fc1"], x, dtype))
    if "norm" in p:
        y = layers.layer_norm(p["norm"], y, config.layer_norm_eps, dtype)
    return layers.dense(p["fc2"], y, dtype)


def block(p: layers.Params, x: jax.Array, config: EvaConfig, rope, dtype, keep: jax.Array | None = None,
          scale: jax.Array | None = None) -> jax.Array:
    """One block, pre-norm (x + f(norm(x))) or post-norm (x + norm(f(x))); keep (2, B) bool drops each branch
    of the other samples (drop path), scaling the kept ones by `scale` (1 / (1 - rate))."""
    eps = config.layer_norm_eps
    norm = lambda name, y: layers.layer_norm(p[name], y, eps, dtype)  # noqa: E731

    def drop(y, i):
        if keep is None:
            return y
        return jnp.where(keep[i].reshape(-1, 1, 1), y * scale.astype(dtype), jnp.zeros((), dtype))

    if config.post_norm:
        x = x + drop(norm("attention_norm", attention(p["attention"], x, config, rope, dtype)), 0)
        return x + drop(norm("mlp_norm", mlp(p["mlp"], x, config, dtype)), 1)
    x = x + drop(attention(p["attention"], norm("attention_norm", x), config, rope, dtype), 0)
    return x + drop(mlp(p["mlp"], norm("mlp_norm", x), config, dtype), 1)


def apply(params: layers.Params, config: EvaConfig, pixel_values: jax.Array, *, dropout_key=None, dtype=None,
          output_hidden_states: bool = False, remat_policy: str | None = None) -> layers.TowerOutput:
    """Runs the EVA tower.

    Args:
      pixel_values: (B, C, image_size, image_size) float images.
      dropout_key: enables drop path (training) at config.drop_path_rates when given.
      dtype: compute dtype of the matmuls (default float32); LayerNorm statistics, softmax and the rotary
        embedding in float32.
      output_hidden_states: also return the embeddings and each block's output.
      remat_policy: a name in jax.checkpoint_policies to rematerialise each block under grad.

    Returns:
      TowerOutput: last_hidden_state (B, prefix_tokens + patches, D) after the final LayerNorm (timm's
      forward_features); pooler_output (B, pooled_size): its class token ("token") or the attention pool's
      output ("map") through the head; hidden_states (the blocks' input, after pre_norm, then each block's
      output) when requested.
    """
    check_pixel_values(config, pixel_values)
    dtype = jnp.dtype(dtype or jnp.float32)
    b = pixel_values.shape[0]
    emb = params["embeddings"]
    with jax.named_scope("embeddings"):
        x = vit.embed_patches(emb["patch"], pixel_values, config.patch_hw, dtype)
        if config.class_token:
            x = jnp.concatenate([jnp.broadcast_to(emb["cls"].astype(dtype), (b, 1, x.shape[-1])), x], axis=1)
        x = x + emb["position"].astype(dtype)[None]
        if config.pre_norm:
            x = layers.layer_norm(params["pre_norm"], x, config.layer_norm_eps, dtype)
    embeddings = x
    rope = rope_tables(config) if config.rope else None
    with jax.named_scope("encoder"):
        x, states = layers.run_blocks(lambda p, h, keep, scale: block(p, h, config, rope, dtype, keep, scale), params["encoder"],
                                      x, dropout_key=dropout_key, drop_path_rates=config.drop_path_rates,
                                      remat_policy=remat_policy, collect=output_hidden_states)
    with jax.named_scope("pooler"):
        last = layers.layer_norm(params["post_norm"], x, config.layer_norm_eps, dtype)
        if config.global_pool == "map":
            pooled = siglip.attention_pool(params["head"], last, None, config.pool_spec, dtype)
        else:
            pooled = last[:, 0]
        if config.head_size:
            pooled = layers.dense(params["head"], pooled, dtype)
    hidden = (embeddings, *states) if output_hidden_states else None
    return layers.TowerOutput(last, pooled, hidden)


def table(config: EvaConfig) -> list[tables.Entry]:
    """The tower's key table, names as timm's Eva (split q/k/v)."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("eva", "vision", {"eva": EvaConfig}, sys.modules[__name__], "first",
           options=("output_hidden_states", "remat_policy"), pooled_size="pooled_size", stacks=("encoder",),
           check=check_pixel_values, anchor="patch_embed.proj.weight"),
)
