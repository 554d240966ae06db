"""The SigLIP 2 NaFlex vision tower: Siglip2VisionModel, init / apply on patchified images of any shape.

Images come patchified and padded to a fixed number of patches (dualenc.NaFlexImageProcessor, as transformers'
Siglip2ImageProcessor): pixel_values (B, N, C * p * p), pixel_attention_mask (B, N) marking real patches and
spatial_shapes (B, 2), each image's patch grid (rows, columns). A linear patch embedding; the square
position-embedding grid resized to each image's grid with antialiased bilinear interpolation (padding positions
take the first resized position, as transformers does); SigLIP's encoder under the padding mask; then
post_layernorm and the attention-pooling head, which ignores the padding too. Shapes stay static for a given
N, so a batch of mixed aspect ratios compiles once.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.fields import ACTIVATION_NAMES, bool_field, choice_field, TransformerConfig, fail, float_field, int_field, rate_field, same_head_dim, \
    builds
from dualenc.towers import siglip, vit
from dualenc.towers.family import ENCODER_OPTIONS, Family


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Siglip2VisionConfig(TransformerConfig):
    """transformers' Siglip2VisionConfig (model_type "siglip2_vision_model", or the vision_config of a "siglip2")."""

    model_types: ClassVar[tuple[str, ...]] = ("siglip2_vision_model",)
    rejected: ClassVar[Mapping[str, Any]] = {"head_dim": same_head_dim}

    hidden_size: int = int_field(768)
    intermediate_size: int = int_field(3072, hi=1 << 18)
    num_hidden_layers: int = int_field(12, hi=1024)
    num_attention_heads: int = int_field(12, hi=4096)
    num_channels: int = int_field(3, hi=64)
    patch_size: int = int_field(16, hi=8192)
    hidden_act: str = choice_field("gelu_pytorch_tanh", ACTIVATION_NAMES)
    layer_norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    attention_dropout: float = rate_field(0.0)
    vision_use_head: bool = bool_field(True)
    num_patches: int = int_field(256, hi=1 << 16)  # the position grid's size: a square number

    def _validate(self):
        side = int(round(self.num_patches ** 0.5))
        if side * side != self.num_patches:
            fail(self.name, "num_patches", f"must be a square number (the position grid), got {self.num_patches}")
        super()._validate()

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


encoder_spec = siglip.encoder_spec


def specs(config: Siglip2VisionConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to Siglip2VisionTransformer
    and big_vision's NaFlex image tower (a Dense patch embedding over patches flattened as (row, column,
    channel), the order the kernel keeps; a (G, G, D) position grid)."""
    d = config.hidden_size
    return [
        *declare.dense(("embeddings", "patch"), config.patch_dim, d, config.patch_dim ** -0.5, ("patch_in", "embed"),
                       hf="embeddings.patch_embedding", bv="embedding/"),
        declare.table(("embeddings", "position"), config.num_patches, d, d ** -0.5, "position",
                      hf="embeddings.position_embedding.weight", bv="pos_embedding", bv_kind="grid"),
        *siglip.tail_specs(config, encoder_spec(config)),
    ]


@builds(Siglip2VisionConfig)
def _build(normal: layers.Normal, config: Siglip2VisionConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def _axis_weights(grid: int, sizes: jax.Array, index: jax.Array) -> jax.Array:
    """(B, N, grid): antialiased bilinear weights (torch's interpolate, align_corners=False) that resize a
    `grid`-long axis to `sizes` (B, 1) and read output positions `index` (B, N)."""
    scale = grid / sizes
    support = jnp.maximum(scale, 1.0)
    center = (index + 0.5) * scale - 0.5
    source = jnp.arange(grid, dtype=jnp.float32)[None, None, :]
    w = jnp.maximum(1.0 - jnp.abs(source - center[..., None]) / support[..., None], 0.0)
    return w / jnp.sum(w, axis=-1, keepdims=True)


def resize_positions(table: jax.Array, spatial_shapes: jax.Array, length: int) -> jax.Array:
    """(B, length, D): the (s * s, D) position table resized to each image's (rows, columns) grid, in row-major
    order, padded to `length` with the first resized position (transformers' resize_positional_embeddings)."""
    grid = int(round(table.shape[0] ** 0.5))
    sizes = spatial_shapes.astype(jnp.float32)  # (B, 2)
    positions = jnp.arange(length, dtype=jnp.float32)[None, :]  # (1, N)
    rows = jnp.floor(positions / sizes[:, 1:])
    cols = positions - rows * sizes[:, 1:]
    inside = positions < (sizes[:, :1] * sizes[:, 1:])
    rows, cols = rows * inside, cols * inside
    weights = jnp.einsum("bnh,bnw->bnhw", _axis_weights(grid, sizes[:, :1], rows),
                         _axis_weights(grid, sizes[:, 1:], cols)).reshape(*rows.shape, grid * grid)
    return jnp.einsum("bnk,kd->bnd", weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def check_pixel_values(config: Siglip2VisionConfig, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
    """Shape and dtype checks that hold under jit (shapes are static)."""
    shape = getattr(pixel_values, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != config.patch_dim:
        raise InputError(f"pixel_values must be patchified images (batch, patches, {config.patch_dim} = channels x "
                         f"patch_size^2) for a NaFlex model (dualenc.NaFlexImageProcessor makes them), got shape "
                         f"{shape}")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise InputError(f"pixel_values must be floating point (processed images), got {pixel_values.dtype}")
    for name, value, want in (("pixel_attention_mask", pixel_attention_mask, tuple(shape[:2])),
                              ("spatial_shapes", spatial_shapes, (shape[0], 2))):
        if value is None:
            raise InputError(f"a NaFlex model needs {name} (dualenc.NaFlexImageProcessor gives it with the pixels)")
        if tuple(getattr(value, "shape", ())) != want or not jnp.issubdtype(value.dtype, jnp.integer) and \
                not jnp.issubdtype(value.dtype, jnp.bool_):
            raise InputError(f"{name} must be an integer array of shape {want}, got "
                             f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")


def check_values(config: Siglip2VisionConfig, pixel_attention_mask, spatial_shapes) -> None:
    """The value checks (outside jit): each grid fits the patches, and the mask marks exactly its patches."""
    mask, shapes = np.asarray(pixel_attention_mask), np.asarray(spatial_shapes)
    counts = shapes.prod(-1)
    if (shapes <= 0).any() or (counts > mask.shape[1]).any():
        bad = int(np.argmax((shapes <= 0).any(-1) | (counts > mask.shape[1])))
        raise InputError(f"spatial_shapes[{bad}] = {shapes[bad].tolist()} must be positive and hold at most "
                         f"{mask.shape[1]} patches")
    if not np.array_equal(mask.astype(bool), np.arange(mask.shape[1])[None] < counts[:, None]):
        raise InputError("pixel_attention_mask must mark each image's first rows x columns patches (as "
                         "spatial_shapes says) and nothing else")


def apply(params: layers.Params, config: Siglip2VisionConfig, pixel_values: jax.Array, pixel_attention_mask=None,
          spatial_shapes=None, *, dropout_key=None, output_hidden_states: bool = False,
          output_attentions: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None, patch_dropout: float = 0.0,
          patch_key: jax.Array | None = None, keep_indices: jax.Array | None = None) -> layers.TowerOutput:
    """Runs the vision tower on patchified images (see the module docstring for the inputs).

    patch_dropout, patch_key, keep_indices: FLIP's patch dropout (training), as in vit.apply, among each image's
    real patches: p > 0 keeps max(1, floor(n * (1 - p))) of an image's n real patches, drawn from patch_key, in
    K = kept_count(p, N) slots (the slots past an image's count are masked, as padding is); keep_indices (B, K)
    names the kept patches instead (those naming padding stay masked). The encoder and the pooling head see the
    kept patches only.

    Returns:
      TowerOutput: last_hidden_state (B, N, D) after post_layernorm (padding rows included, as transformers
      computes them; (B, K, D) with patch dropout); pooler_output (B, D) from the head over the real patches
      (None with vision_use_head false); hidden_states/attentions as tuples when requested. attention: a name
      in layers.IMPLEMENTATIONS; None: the backend's default.
    """
    if pooled_only:
        raise InputError("pooled_only is not supported by the SigLIP 2 vision tower: its attention-pooling head "
                         "reads every token")
    check_pixel_values(config, pixel_values, pixel_attention_mask, spatial_shapes)
    dtype = jnp.dtype(dtype or jnp.float32)
    attention = layers.resolve_attention(attention, dtype)
    emb = params["embeddings"]
    with jax.named_scope("embeddings"):
        x = layers.dense(emb["patch"], pixel_values, dtype).astype(jnp.float32)
        x = (x + resize_positions(emb["position"], spatial_shapes, pixel_values.shape[1])).astype(dtype)
        x, mask = drop_patches(x, pixel_attention_mask, patch_dropout, patch_key, keep_indices)
    return siglip.encode(params, config, x, layers.attention_bias(mask), dtype=dtype,
                         dropout_key=dropout_key, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, remat_policy=remat_policy,
                         attention=attention)


def drop_patches(x: jax.Array, pixel_attention_mask: jax.Array, patch_dropout: float, patch_key,
                 keep_indices) -> tuple[jax.Array, jax.Array]:
    """(x, mask) after patch dropout among each image's real patches (see apply); unchanged without it."""
    b, n = pixel_attention_mask.shape
    real = pixel_attention_mask.astype(bool)
    keep = vit.patch_indices(patch_dropout, patch_key, keep_indices, b, n, real=real)
    if keep is None:
        return x, pixel_attention_mask
    mask = vit.take_tokens(real, keep)
    if keep_indices is None:  # the draw ranks padding last: an image's first kept slots are its real patches
        counts = np.array([vit.kept_count(patch_dropout, count) for count in range(n + 1)], np.int32)
        kept = jnp.asarray(counts)[jnp.sum(real, axis=1, dtype=jnp.int32)]
        mask = mask & (jnp.arange(keep.shape[1])[None, :] < kept[:, None])
    return vit.take_tokens(x, keep), mask.astype(jnp.int32)


def table(config: Siglip2VisionConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to Siglip2VisionTransformer."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ the family

def _check(config: Siglip2VisionConfig, pixel_values, pixel_attention_mask=None, spatial_shapes=None) -> None:
    check_pixel_values(config, pixel_values, pixel_attention_mask, spatial_shapes)
    check_values(config, pixel_attention_mask, spatial_shapes)


FAMILIES = (
    Family("siglip2_vision", "vision", {"siglip2_vision_model": Siglip2VisionConfig}, sys.modules[__name__], "map",
           inputs=("pixel_values", "pixel_attention_mask", "spatial_shapes"),
           options=(*ENCODER_OPTIONS, *vit.PATCH_DROPOUT_OPTIONS),
           stacks=("encoder",), check=_check, prefixes=("", "vision_model."),
           anchor="embeddings.patch_embedding.weight"),
)
