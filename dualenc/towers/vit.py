"""The ViT tower family: ViTModel and CLIPVisionModel (also open_clip's ViT), init / apply on NCHW pixels.

Both pool the first (class) token. ViT applies its final LayerNorm to every token and a dense + tanh pooler;
CLIP normalises before the encoder (pre_layrnorm) and applies post_layernorm to the pooled token only. open_clip's
average-pooled ViT (CLIPA: OpenCLIPVisionConfig) pools the mean of the patch tokens instead.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.towers import open_clip_pool
from dualenc.towers.family import ENCODER_OPTIONS, Family
from dualenc.towers.inputs import check_image_layout
from dualenc.fields import (
    ACTIVATION_NAMES, bool_field, check_int, choice_field, TransformerConfig, fail, float_field, int_field, pair, rate_field, same_head_dim,
    builds,
)

class VisionTransformerConfig(TransformerConfig):
    rejected: ClassVar[Mapping[str, Any]] = {"head_dim": same_head_dim}
    average_pool: ClassVar[bool] = False  # pooled: the class token (False) or the mean of the patch tokens

    def _validate(self):
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            parts = value if isinstance(value, tuple) else (value,)
            if not isinstance(self, ViTConfig) and isinstance(value, tuple):
                fail(self.name, name, f"must be an integer, got {value!r}")
            if isinstance(value, tuple) and len(value) != 2:
                fail(self.name, name, f"must be an integer or a pair, got {value!r}")
            for part in parts:
                check_int(self.name, name, part, 1, 8192)
        for img, patch in zip(self.image_hw, self.patch_hw):
            if patch > img:
                fail(self.name, "patch_size", f"{self.patch_size} is larger than image_size {self.image_size}")
        if self.num_patches > 1 << 16:
            fail(self.name, "image_size", f"gives {self.num_patches} patches, over the limit of {1 << 16}")
        super()._validate()

    @property
    def image_hw(self) -> tuple[int, int]:
        return pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return pair(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(i // p for i, p in zip(self.image_hw, self.patch_hw))

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ViTConfig(VisionTransformerConfig):
    """transformers' ViTConfig (model_type "vit"): a ViTModel with its pooler."""

    model_types: ClassVar[tuple[str, ...]] = ("vit",)
    # Layout: a patch bias, no LayerNorm before the encoder, the final LayerNorm on every token, then the
    # pooler's dense + activation on the first token.
    patch_bias: ClassVar[bool] = True
    pre_norm: ClassVar[bool] = False
    pooler: ClassVar[bool] = True

    hidden_size: int = int_field(768)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    hidden_act: str = choice_field("gelu", ACTIVATION_NAMES)
    hidden_dropout_prob: float = rate_field(0.0)
    attention_probs_dropout_prob: float = rate_field(0.0)
    initializer_range: float = float_field(0.02)
    layer_norm_eps: float = float_field(1e-12, hi=1.0, lo_open=True)
    image_size: int | tuple[int, int] = dataclasses.field(default=224, metadata={"required": True})
    patch_size: int | tuple[int, int] = dataclasses.field(default=16, metadata={"required": True})
    num_channels: int = int_field(3, hi=64)
    qkv_bias: bool = bool_field(True)
    encoder_stride: int = int_field(16, hi=1 << 16, required=False)
    pooler_output_size: int | None = int_field(None, required=False)
    pooler_act: str = choice_field("tanh", ACTIVATION_NAMES)

    def _validate(self):
        super()._validate()
        if self.pooler_output_size is not None and self.pooler_output_size != self.hidden_size:
            fail(self.name, "pooler_output_size",
                  f"= {self.pooler_output_size} is not implemented; supported: None or hidden_size "
                  f"({self.hidden_size})")
        object.__setattr__(self, "pooler_output_size", None)  # one spelling of the default, for equality

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["pooler_output_size"] = self.hidden_size
        return out


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(VisionTransformerConfig):
    """transformers' CLIPVisionConfig (model_type "clip_vision_model", or the vision_config of a "clip")."""

    model_types: ClassVar[tuple[str, ...]] = ("clip_vision_model",)
    # Layout: no patch bias, pre_layrnorm before the encoder, post_layernorm on the first token only.
    patch_bias: ClassVar[bool] = False
    pre_norm: ClassVar[bool] = True
    pooler: ClassVar[bool] = False

    hidden_size: int = int_field(768)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    projection_dim: int = int_field(512, required=False)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    num_channels: int = int_field(3, hi=64)
    image_size: int = dataclasses.field(default=224, metadata={"required": True})
    patch_size: int = dataclasses.field(default=32, metadata={"required": True})
    hidden_act: str = choice_field("quick_gelu", ACTIVATION_NAMES)
    layer_norm_eps: float = float_field(1e-5, hi=1.0, lo_open=True)
    attention_dropout: float = rate_field(0.0)
    initializer_range: float = float_field(0.02)
    initializer_factor: float = float_field(1.0)



@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MetaClip2VisionConfig(CLIPVisionConfig):
    """transformers' MetaClip2VisionConfig (model_type "metaclip_2_vision_model", or the vision_config of a
    "metaclip_2"): CLIP's vision tower, the same fields."""

    model_types: ClassVar[tuple[str, ...]] = ("metaclip_2_vision_model",)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class OpenCLIPVisionConfig(CLIPVisionConfig):
    """open_clip's VisionTransformer pooled by the mean of its patch tokens (pool_type "avg": CLIPA) or by its
    attentional pooler (attentional_pool: CoCa), model_type "open_clip_vision", dualenc's own: transformers has no
    such model (AutoConfig refuses the model_type).

    CLIP's vision tower with: pre_norm (open_clip's ln_pre; false for no_ln_pre), and the pooled output either
    - (attention_pool_size None) the mean of the patch tokens (the class token left out), norm_after_pool
      (final_ln_after_pool) choosing post_layernorm on that mean (true) or on every token before it (false); or
    - (attention_pool_size set) open_clip's AttentionalPooler's first query (its contrastive embedding; the other
      queries feed CoCa's captioning decoder): a learned query, LayerNorm'd, attends with attention_pool_heads
      heads over every token, LayerNorm'd, in attention_pool_size wide, then post_layernorm (that wide) follows;
      norm_after_pool must be true.
    The defaults are coca_ViT-B-32's pooling, every optional part (the train state's catalogue of params reads
    them); a config.json without attention_pool_size has none (CLIPA's, as dualenc first wrote them).
    """

    model_types: ClassVar[tuple[str, ...]] = ("open_clip_vision",)

    pre_norm: bool = bool_field(True)
    norm_after_pool: bool = bool_field(True)
    attention_pool_size: int | None = int_field(512, required=False)
    attention_pool_heads: int = int_field(8, hi=4096, required=False)

    @classmethod
    def from_dict(cls, d, **kwargs):
        return super().from_dict({"attention_pool_size": None, **d} if isinstance(d, Mapping) else d, **kwargs)

    def _validate(self):
        if self.attention_pool_size is not None:
            if self.attention_pool_size % self.attention_pool_heads:
                fail(self.name, "attention_pool_heads", f"must divide attention_pool_size: "
                     f"{self.attention_pool_size} is not a multiple of {self.attention_pool_heads}")
            if not self.norm_after_pool:
                fail(self.name, "norm_after_pool", "= False is not implemented with attention_pool_size; supported: "
                     "True (post_layernorm follows the attentional pooler)")
        super()._validate()

    @property
    def average_pool(self) -> bool:
        return self.attention_pool_size is None

    @property
    def pooled_size(self) -> int:
        """The width of pooler_output: attention_pool_size, else hidden_size."""
        return self.attention_pool_size or self.hidden_size


VisionConfig = ViTConfig | CLIPVisionConfig


def encoder_spec(config: VisionConfig) -> layers.EncoderSpec:
    if isinstance(config, CLIPVisionConfig):
        stds = layers.clip_init_stds(config.hidden_size, config.num_hidden_layers, config.initializer_factor)
        hidden_dropout, attention_dropout, qkv_bias = 0.0, config.attention_dropout, True
    else:
        stds = (config.initializer_range,) * 4
        hidden_dropout, attention_dropout = config.hidden_dropout_prob, config.attention_probs_dropout_prob
        qkv_bias = config.qkv_bias
    return layers.EncoderSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, eps=config.layer_norm_eps, prenorm=True, qkv_bias=qkv_bias,
        hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, init_stds=stds)


def specs(config: VisionConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to ViTModel /
    CLIPVisionTransformer."""
    d = config.hidden_size
    is_clip = isinstance(config, CLIPVisionConfig)
    std = config.initializer_range * (config.initializer_factor if is_clip else 1.0)
    cls_std = d ** -0.5 * config.initializer_factor if is_clip else std
    if is_clip:
        names = dict(patch="embeddings.patch_embedding", cls=("embeddings.class_embedding", "id"),
                     position=("embeddings.position_embedding.weight", "id"), layer="encoder.layers.{i}.",
                     post_norm="post_layernorm")
    else:
        names = dict(patch="embeddings.patch_embeddings.projection", cls=("embeddings.cls_token", "cls"),
                     position=("embeddings.position_embeddings", "pos"), layer="encoder.layer.{i}.",
                     post_norm="layernorm")
    out = [
        *declare.conv(("embeddings", "patch"), config.num_channels, config.patch_hw, d, std, hf=names["patch"],
                      bias=config.patch_bias),
        declare.Param(("embeddings", "cls"), (d,), ("embed",), declare.normal(cls_std), *names["cls"]),
        declare.table(("embeddings", "position"), config.num_patches + 1, d, std, "position",
                      hf=names["position"][0], hf_kind=names["position"][1]),
        *(declare.norm(("pre_norm",), d, hf="pre_layrnorm") if config.pre_norm else []),
        *declare.encoder(encoder_spec(config), names["layer"], tables.CLIP_LAYER if is_clip else _VIT_LAYER),
        *(open_clip_pool.specs(config) if getattr(config, "attention_pool_size", None) else []),
        *declare.norm(("post_norm",), getattr(config, "pooled_size", d), hf=names["post_norm"], group="head"),
    ]
    if config.pooler:
        out += declare.dense(("pooler",), d, d, std, ("embed", "embed"), hf="pooler.dense", group="head")
    return out


@builds(ViTConfig, CLIPVisionConfig)
def _build(normal: layers.Normal, config: VisionConfig) -> layers.Params:
    return declare.build(normal, specs(config))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bicubic resize (A = -0.75, align_corners=False, no antialias)."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as in torch
        base = int(np.floor(src))
        t = src - base
        for offset, coeff in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            w[i, min(max(base + offset, 0), n_in - 1)] += coeff
    return w.astype(np.float32)


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def resize_positions(patch_table: jax.Array, config, grid: tuple[int, int], square_input: bool) -> jax.Array:
    """(gh * gw, D): a square grid's (n, D) patch position table resized bicubically to `grid`, as transformers'
    interpolate_pos_encoding does (unchanged when the grid and input are the config's)."""
    n = patch_table.shape[0]
    if grid[0] * grid[1] == n and square_input:
        return patch_table
    side = int(round(n ** 0.5))
    if side * side != n:
        raise InputError(f"interpolate_pos_encoding needs a square patch grid in the config, got {config.grid}")
    resized = jnp.einsum("hi,ijd,wj->hwd", bicubic_matrix(side, grid[0]), patch_table.reshape(side, side, -1),
                         bicubic_matrix(side, grid[1]), precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(grid[0] * grid[1], -1)


def position_embeddings(params: layers.Params, config: VisionConfig, grid: tuple[int, int],
                        square_input: bool) -> jax.Array:
    """(1 + gh * gw, D) position table (class token first) for a patch grid, resized as transformers does."""
    table = params["embeddings"]["position"]
    return jnp.concatenate([table[:1], resize_positions(table[1:], config, grid, square_input)], axis=0)


def embed_patches(patch: layers.Params, pixel_values: jax.Array, patch_hw: tuple[int, int], dtype) -> jax.Array:
    """(B, gh * gw, D) patch embeddings in `dtype`: the stride-p convolution as a matmul over non-overlapping
    patches (rows and columns past the last whole patch are dropped, as the convolution does)."""
    b, c, h, w = pixel_values.shape
    ph, pw = patch_hw
    gh, gw = h // ph, w // pw
    x = pixel_values[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)
    x = jnp.einsum("bcgpwq,cpqd->bgwd", x.astype(dtype), patch["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32)
    x = x.reshape(b, gh * gw, -1)
    if "bias" in patch:
        x = x + layers.lead(patch["bias"], 3)
    return x.astype(dtype)


def check_pixel_values(config: VisionConfig, pixel_values, interpolate_pos_encoding: bool = False):
    """Shape and dtype checks that hold under jit (shapes are static)."""
    check_image_layout(config, pixel_values)
    h, w = pixel_values.shape[2:]
    ph, pw = config.patch_hw
    if interpolate_pos_encoding:
        if h < ph or w < pw:
            raise InputError(f"pixel_values of size {h}x{w} is smaller than one {ph}x{pw} patch")
    elif (h, w) != config.image_hw:
        raise InputError(f"pixel_values of size {h}x{w} does not match the model's image_size "
                         f"{config.image_hw[0]}x{config.image_hw[1]}; pass interpolate_pos_encoding=True "
                         f"to resize the position embeddings")


PATCH_DROPOUT_OPTIONS = ("patch_dropout", "patch_key", "keep_indices")  # the family options patch_indices reads


def kept_count(patch_dropout: float, num_tokens: int) -> int:
    """How many of num_tokens patch tokens patch dropout at rate patch_dropout keeps: max(1, floor(num_tokens *
    (1 - patch_dropout))), as open_clip's PatchDropout."""
    return max(1, int(num_tokens * (1.0 - patch_dropout)))


def patch_indices(patch_dropout: float, patch_key: jax.Array | None, keep_indices: jax.Array | None, batch: int,
                  num_tokens: int, real: jax.Array | None = None) -> jax.Array | None:
    """(B, K) int indices of the patch tokens to keep (FLIP's patch dropout), or None to keep them all.

    keep_indices, when given, is returned as it is (checked: (batch, K) integers; K = kept_count when
    patch_dropout > 0). Otherwise patch_dropout > 0 draws, per image, K = kept_count(patch_dropout, num_tokens)
    tokens from patch_key, as open_clip's PatchDropout does (random normal scores, the top K in score order);
    real (B, N) bool, where given, ranks the tokens it marks False (padding) last.
    """
    if isinstance(patch_dropout, bool) or not isinstance(patch_dropout, (int, float)):
        raise InputError(f"patch_dropout must be a Python float in [0, 1) (static under jit), got "
                         f"{type(patch_dropout).__name__}")
    if not 0.0 <= patch_dropout < 1.0:
        raise InputError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
    count = kept_count(patch_dropout, num_tokens)
    if keep_indices is not None:
        if patch_key is not None:
            raise InputError("patch_key and keep_indices were both given: keep_indices names the kept patches "
                             "itself; pass one of them")
        shape = tuple(getattr(keep_indices, "shape", ()))
        dtype = getattr(keep_indices, "dtype", None)
        if len(shape) != 2 or shape[0] != batch or not 1 <= shape[1] <= num_tokens or dtype is None or \
                not jnp.issubdtype(dtype, jnp.integer):
            raise InputError(f"keep_indices must be an integer array of shape (batch {batch}, K) with 1 <= K <= "
                             f"{num_tokens} (the patch tokens), got {dtype} {shape}")
        if patch_dropout > 0 and shape[1] != count:
            raise InputError(f"keep_indices keeps {shape[1]} patches; patch_dropout={patch_dropout} keeps {count} "
                             f"of {num_tokens}")
        if not isinstance(keep_indices, jax.core.Tracer):
            values = np.asarray(keep_indices)
            if values.min() < 0 or values.max() >= num_tokens:
                raise InputError(f"keep_indices must be in [0, {num_tokens}) (the patch tokens, no class token), "
                                 f"got values from {values.min()} to {values.max()}")
        return jnp.asarray(keep_indices, jnp.int32)
    if patch_dropout == 0:
        return None
    if patch_key is None:
        raise InputError(f"patch_dropout={patch_dropout} needs a patch_key (a jax.random key) or keep_indices; "
                         f"leave patch_dropout at 0 outside training")
    scores = jax.random.normal(patch_key, (batch, num_tokens), jnp.float32)
    if real is not None:
        scores = jnp.where(real, scores, -jnp.inf)
    return jax.lax.top_k(scores, count)[1]


def take_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
    """(B, K, ...): the tokens of x (B, N, ...) at indices (B, K)."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def apply(params: layers.Params, config: VisionConfig, pixel_values: jax.Array, *, dropout_key=None,
          output_hidden_states: bool = False, output_attentions: bool = False,
          interpolate_pos_encoding: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None,
          patch_dropout: float = 0.0, patch_key: jax.Array | None = None,
          keep_indices: jax.Array | None = None) -> layers.TowerOutput:
    """Runs the vision tower.

    Args:
      pixel_values: (B, C, H, W) float images, as transformers' image processors give them.
      dropout_key: enables dropout (training) when given.
      dtype: compute dtype of the matmuls (default float32).
      pooled_only: return last_hidden_state for the first token only, (B, 1, D), which is all pooler_output
        needs. The last layer then computes just that token (its attention still reads every token):
        about 7% less work for a 12-layer tower, same pooler_output. Stacked layers do so when evaluated;
        differentiated, they run the last layer in full (a faster backward).
      attention: the attention implementation, a name in layers.IMPLEMENTATIONS; None: the backend's default.
      patch_dropout: FLIP's patch dropout (training): a Python float p in [0, 1); p > 0 keeps, per image,
        kept_count(p, patches) = max(1, floor(patches * (1 - p))) of the patch tokens, drawn from patch_key as
        open_clip's PatchDropout does, after the position embeddings are added; the class token is always kept.
        0 (the default): every token.
      patch_key: the jax.random key of that draw; needed when p > 0 unless keep_indices is given.
      keep_indices: (B, K) int indices in [0, patches) of the patch tokens to keep (class token not counted), in
        place of the draw (K = kept_count when p > 0).

    Returns:
      TowerOutput: last_hidden_state (B, 1 + patches, D) (1 + K with patch dropout, the kept tokens in the order
      of their indices); pooler_output (B, D) (ViT: tanh(dense(CLS)) after the final LayerNorm; CLIP:
      post_layernorm(CLS); OpenCLIPVisionConfig: the mean of the patch tokens, post_layernorm after it or on each
      token before it, or the attentional pooler's first query then post_layernorm, (B, attention_pool_size));
      hidden_states/attentions as tuples when requested.
    """
    check_pixel_values(config, pixel_values, interpolate_pos_encoding)
    if pooled_only and isinstance(config, OpenCLIPVisionConfig):
        raise InputError(f"pooled_only is not supported by {config.name}: it pools every patch token (their mean, "
                         f"or its attentional pooler)")
    dtype = jnp.dtype(dtype or jnp.float32)
    attention = layers.resolve_attention(attention, dtype)
    b, c, h, w = pixel_values.shape
    ph, pw = config.patch_hw
    gh, gw = h // ph, w // pw
    emb = params["embeddings"]
    with jax.named_scope("embeddings"):
        x = embed_patches(emb["patch"], pixel_values, (ph, pw), dtype)
        cls = jnp.broadcast_to(emb["cls"].astype(dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        pos = position_embeddings(params, config, (gh, gw), h == w) if interpolate_pos_encoding else emb["position"]
        x = x + pos.astype(dtype)[None]
        keep = patch_indices(patch_dropout, patch_key, keep_indices, b, gh * gw)
        if keep is not None:
            x = jnp.concatenate([x[:, :1], take_tokens(x[:, 1:], keep)], axis=1)
        embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        if config.pre_norm:
            x = layers.layer_norm(params["pre_norm"], x, config.layer_norm_eps, dtype)
        elif isinstance(config, ViTConfig):
            x = layers.dropout(x, config.hidden_dropout_prob, embed_key)
    spec = encoder_spec(config)
    with jax.named_scope("encoder"):
        last, states, probs = layers.encoder(
            params["encoder"], x, None, spec, dtype=dtype, key=encoder_key,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat_policy=remat_policy, first_only=pooled_only, attention=attention)
    with jax.named_scope("pooler"):
        if config.pooler:
            last = layers.layer_norm(params["post_norm"], last, config.layer_norm_eps, dtype)
            pooled = layers.ACTIVATIONS[config.pooler_act](layers.dense(params["pooler"], last[:, 0], dtype))
        elif getattr(config, "attention_pool_size", None):
            pooled = open_clip_pool.apply(params["pool"], config, encoder_spec(config), last, dtype, attention)
            pooled = layers.layer_norm(params["post_norm"], pooled, config.layer_norm_eps, dtype)
        elif config.average_pool:
            tokens = last[:, 1:]
            if not config.norm_after_pool:
                tokens = layers.layer_norm(params["post_norm"], tokens, config.layer_norm_eps, dtype)
            pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(dtype)
            if config.norm_after_pool:
                pooled = layers.layer_norm(params["post_norm"], pooled, config.layer_norm_eps, dtype)
        else:
            pooled = layers.layer_norm(params["post_norm"], last[:, 0], config.layer_norm_eps, dtype)
    return layers.tower_output(last, pooled, x, states, probs)


# ------------------------------------------------------------------------------------------------ checkpoints

_VIT_LAYER = dict(query="attention.attention.query", key="attention.attention.key",
                  value="attention.attention.value", out="attention.output.dense", attention_norm="layernorm_before",
                  fc1="intermediate.dense", fc2="output.dense", mlp_norm="layernorm_after")


def table(config: VisionConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to ViTModel / CLIPVisionTransformer."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ the family

FAMILIES = (
    Family("vit", "vision", {"vit": ViTConfig}, sys.modules[__name__], "first", pooled_only=True,
           options=(*ENCODER_OPTIONS, "interpolate_pos_encoding", *PATCH_DROPOUT_OPTIONS), stacks=("encoder",),
           check=check_pixel_values, prefixes=("", "vit."), anchor="embeddings.patch_embeddings.projection.weight",
           optional=("pooler",)),
    Family("clip_vision", "vision", {"clip_vision_model": CLIPVisionConfig,
                                     "metaclip_2_vision_model": MetaClip2VisionConfig}, sys.modules[__name__], "first",
           pooled_only=True, options=(*ENCODER_OPTIONS, "interpolate_pos_encoding", *PATCH_DROPOUT_OPTIONS),
           stacks=("encoder",), check=check_pixel_values, prefixes=("", "vision_model."),
           anchor="embeddings.patch_embedding.weight"),
    Family("open_clip_vision", "vision", {"open_clip_vision": OpenCLIPVisionConfig}, sys.modules[__name__], "gap",
           options=(*ENCODER_OPTIONS, "interpolate_pos_encoding", *PATCH_DROPOUT_OPTIONS), pooled_size="pooled_size",
           stacks=("encoder",),
           check=check_pixel_values, prefixes=("", "vision_model."), anchor="embeddings.patch_embedding.weight"),
)
