"""The ConvNeXt tower family: transformers' ConvNextModel (also open_clip's timm ConvNeXt towers), on NCHW pixels.

A 4x4 stride-4 patch convolution and a LayerNorm (the stem), then stages: each but the first starts with a
LayerNorm and a 2x2 stride-2 convolution (the downsampling), then blocks of a depthwise 7x7 convolution,
LayerNorm, MLP (pointwise convolutions, as dense layers over channels) and layer scale, with the residual.
The pooled output is the LayerNorm of the mean over every position (timm's NormMlpClassifierHead without its
classifier); open_clip's "mlp" head adds a dense + activation after it (`head_hidden_size`). Runs channels-last.
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
    ACTIVATION_NAMES, TowerConfig, builds, check_int, choice_field, fail, float_field, int_field, rate_field,
)
from dualenc.towers.family import Family
from dualenc.towers.inputs import check_image_layout

KERNEL = 7  # the depthwise convolution's size (ConvNeXt's; padding 3 keeps the grid)
MLP_RATIO = 4


def _sizes(value, d) -> bool:
    """hidden_sizes[-1]"""
    try:
        return value == list(d["hidden_sizes"])[-1]
    except (KeyError, TypeError, IndexError):
        return False


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ConvNextConfig(TowerConfig):
    """transformers' ConvNextConfig (model_type "convnext"), with two fields of timm's that open_clip's ConvNeXt
    towers use and transformers' ConvNextModel lacks: `norm_eps`, the eps of the stem, downsampling and block
    LayerNorms (transformers fixes it at 1e-6; timm's convnext_xxlarge has 1e-5), and `head_hidden_size`, the
    width of open_clip's "mlp" head (a dense + hidden_act after the pooled LayerNorm; None: no head).
    config.json also gets `hidden_size` (hidden_sizes[-1]), which transformers' VisionTextDualEncoderModel reads.
    """

    model_types: ClassVar[tuple[str, ...]] = ("convnext",)
    rejected: ClassVar = {"hidden_size": _sizes}
    size_fields: ClassVar[str] = "hidden_sizes, depths"

    num_channels: int = int_field(3, hi=64)
    patch_size: int = int_field(4, hi=64)
    num_stages: int = int_field(4, hi=16)
    hidden_sizes: tuple[int, ...] = dataclasses.field(default=(96, 192, 384, 768), metadata={"required": True})
    depths: tuple[int, ...] = dataclasses.field(default=(3, 3, 9, 3), metadata={"required": True})
    hidden_act: str = choice_field("gelu", ACTIVATION_NAMES)
    initializer_range: float = float_field(0.02)
    layer_norm_eps: float = float_field(1e-12, hi=1.0, lo_open=True)
    layer_scale_init_value: float = float_field(1e-6)
    drop_path_rate: float = rate_field(0.0)
    image_size: int = int_field(224, hi=8192)
    norm_eps: float = float_field(1e-6, hi=1.0, lo_open=True)
    head_hidden_size: int | None = int_field(None, required=False)

    def _validate(self):
        for name, hi in (("hidden_sizes", 1 << 16), ("depths", 1024)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != self.num_stages:
                fail(self.name, name, f"must be a list of num_stages ({self.num_stages}) integers, got {value!r}")
            for v in value:
                check_int(self.name, name, v, 1, hi)
        if self.image_size < self.min_size:
            fail(self.name, "image_size", f"= {self.image_size} is smaller than the {self.min_size} pixels the "
                                          f"stem and {self.num_stages - 1} downsamplings need")
        super()._validate()

    @property
    def hidden_size(self) -> int:
        return self.hidden_sizes[-1]

    @property
    def pooled_size(self) -> int:
        """The width of pooler_output: head_hidden_size with the head, else hidden_sizes[-1]."""
        return self.head_hidden_size or self.hidden_size

    @property
    def min_size(self) -> int:
        """The smallest image side every stage gets at least one position of."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Each block's stochastic-depth rate, rising linearly from 0 to drop_path_rate (timm's, transformers')."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "hidden_size": self.hidden_size}


def specs(config: ConvNextConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); names relative to ConvNextModel. The
    trunk is the "embeddings" group (no per-layer stack: LiT's unlocked_layers sees it as one block), the
    pooled LayerNorm and head the "head" group."""
    std, c, sizes = config.initializer_range, config.num_channels, config.hidden_sizes
    p = config.patch_size
    out = [*declare.conv(("embeddings", "patch"), c, (p, p), sizes[0], std, hf="embeddings.patch_embeddings"),
           *declare.norm(("embeddings", "norm"), sizes[0], hf="embeddings.layernorm")]
    for s, (d, depth) in enumerate(zip(sizes, config.depths)):
        stage, hf = ("stages", str(s)), f"encoder.stages.{s}."
        if s > 0:
            out += declare.norm(stage + ("downsample", "norm"), sizes[s - 1], hf=hf + "downsampling_layer.0")
            out += declare.conv(stage + ("downsample", "conv"), sizes[s - 1], (2, 2), d, std,
                                hf=hf + "downsampling_layer.1")
        for j in range(depth):
            block, name = stage + ("blocks", str(j)), f"{hf}layers.{j}."
            out += [declare.Param(block + ("dwconv", "kernel"), (1, KERNEL, KERNEL, d),
                                  ("channels", "patch", "patch", "embed"), declare.normal(std), name + "dwconv.weight",
                                  "conv", decay=True),
                    declare.Param(block + ("dwconv", "bias"), (d,), ("embed",), declare.ZEROS, name + "dwconv.bias")]
            out += declare.norm(block + ("norm",), d, hf=name + "layernorm")
            out += declare.dense(block + ("fc1",), d, MLP_RATIO * d, std, ("embed", "mlp"), hf=name + "pwconv1")
            out += declare.dense(block + ("fc2",), MLP_RATIO * d, d, std, ("mlp", "embed"), hf=name + "pwconv2")
            if config.layer_scale_init_value > 0:
                out.append(declare.Param(block + ("layer_scale",), (d,), ("norm",),
                                         declare.constant(config.layer_scale_init_value),
                                         name + "layer_scale_parameter"))
    out += declare.norm(("post_norm",), sizes[-1], hf="layernorm", group="head")
    if config.head_hidden_size:
        out += declare.dense(("head",), sizes[-1], config.head_hidden_size, std, ("embed", "mlp"), hf="head.dense",
                             group="head")
    return out


@builds(ConvNextConfig)
def _build(normal: layers.Normal, config: ConvNextConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def check_pixel_values(config: ConvNextConfig, pixel_values, interpolate_pos_encoding: bool = False):
    """Shape and dtype checks that hold under jit: (B, num_channels, H, W) floats, H and W at least min_size
    (any size runs: there is no position table)."""
    check_image_layout(config, pixel_values)
    shape = pixel_values.shape
    if min(shape[2:]) < config.min_size:
        raise InputError(f"pixel_values of size {shape[2]}x{shape[3]} is smaller than the {config.min_size} "
                         f"pixels a side this ConvNeXt needs")


def patchify(p: layers.Params, x_BHWC: jax.Array, k: int, dtype) -> jax.Array:
    """A k x k stride-k convolution (kernel (C, k, k, D)) as a matmul over non-overlapping patches; rows and
    columns past the last whole patch are dropped, as the convolution does."""
    b, h, w, c = x_BHWC.shape
    gh, gw = h // k, w // k
    x = x_BHWC[:, :gh * k, :gw * k].reshape(b, gh, k, gw, k, c)
    y = jnp.einsum("bgpwqc,cpqd->bgwd", x.astype(dtype), p["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32)
    return (y + layers.lead(p["bias"], 4)).astype(dtype)


def _conv(x_BHWC: jax.Array, kernel: jax.Array) -> jax.Array:
    """The depthwise convolution as XLA's grouped convolution (zero padding keeps the grid)."""
    pad = KERNEL // 2
    return lax.conv_general_dilated(x_BHWC, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "IHWO", "NHWC"), feature_group_count=x_BHWC.shape[-1],
                                    preferred_element_type=jnp.float32)


@jax.custom_vjp
def _taps(x_BHWC: jax.Array, kernel: jax.Array) -> jax.Array:
    """_conv's value, float32, as a sum of KERNEL * KERNEL shifted products: one fused elementwise pass, far faster
    than XLA's grouped convolution on CPU; its gradient is the convolution's, which compiles several times faster
    than that of the shifted sums."""
    h, w, pad = x_BHWC.shape[1], x_BHWC.shape[2], KERNEL // 2
    x = jnp.pad(x_BHWC.astype(jnp.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel[0].astype(jnp.float32)
    return sum(x[:, i:i + h, j:j + w] * layers.lead(k[i, j], 4) for i in range(KERNEL) for j in range(KERNEL))


def _taps_forward(x_BHWC, kernel):
    return _taps(x_BHWC, kernel), (x_BHWC, kernel)


def _taps_backward(saved, grad):
    x_BHWC, kernel = saved
    _, pullback = jax.vjp(_conv, x_BHWC, kernel)
    return pullback(grad)


_taps.defvjp(_taps_forward, _taps_backward)


def depthwise(p: layers.Params, x_BHWC: jax.Array, dtype) -> jax.Array:
    """The depthwise KERNEL x KERNEL convolution, zero-padded to keep the grid; summed in float32."""
    y = _taps(x_BHWC.astype(dtype), p["kernel"].astype(dtype))
    return (y + layers.lead(p["bias"], 4)).astype(dtype)


def block(p: layers.Params, x: jax.Array, config: ConvNextConfig, dtype, keep: jax.Array | None = None,
          rate: float = 0.0) -> jax.Array:
    """One ConvNeXt block on (B, H, W, C); keep (B,) bool drops the branch of the other samples, scaling the kept
    ones by 1 / (1 - rate) (drop path)."""
    y = depthwise(p["dwconv"], x, dtype)
    y = layers.layer_norm(p["norm"], y, config.norm_eps, dtype)
    y = layers.ACTIVATIONS[config.hidden_act](layers.dense(p["fc1"], y, dtype))
    y = layers.dense(p["fc2"], y, dtype)
    if "layer_scale" in p:
        y = y * layers.lead(p["layer_scale"].astype(dtype), 4)
    if keep is not None:
        y = jnp.where(keep.reshape(-1, 1, 1, 1), y / jnp.asarray(1.0 - rate, dtype), jnp.zeros((), dtype))
    return x + y


def apply(params: layers.Params, config: ConvNextConfig, pixel_values: jax.Array, *, dropout_key=None,
          dtype=None, output_hidden_states: bool = False,
          interpolate_pos_encoding: bool = False) -> layers.TowerOutput:
    """Runs the ConvNeXt tower.

    Args:
      pixel_values: (B, C, H, W) float images, H and W at least config.min_size (any size runs;
        interpolate_pos_encoding is accepted and changes nothing: there is no position table).
      dropout_key: enables drop path (training) at config.drop_path_rates when given.
      dtype: compute dtype of the convolutions and matmuls (default float32); LayerNorm statistics in float32.
      output_hidden_states: also return the stem's output and each stage's, as transformers does.

    Returns:
      TowerOutput: last_hidden_state (B, C, H / 32, W / 32) as ConvNextModel's (NCHW); pooler_output
      (B, pooled_size); hidden_states (num_stages + 1 arrays, NCHW) when requested.
    """
    check_pixel_values(config, pixel_values)
    dtype = jnp.dtype(dtype or jnp.float32)
    rates = config.drop_path_rates
    keep = None  # every block's drop-path draw at once: (blocks, B), one program step instead of one per block
    if dropout_key is not None and config.drop_path_rate > 0:
        keep = jax.random.uniform(dropout_key, (len(rates), pixel_values.shape[0])) >= np.asarray(rates)[:, None]
    with jax.named_scope("embeddings"):
        x = patchify(params["embeddings"]["patch"], jnp.transpose(pixel_values, (0, 2, 3, 1)), config.patch_size,
                     dtype)
        x = layers.layer_norm(params["embeddings"]["norm"], x, config.norm_eps, dtype)
    states, index = [x], 0
    for s in range(config.num_stages):
        stage = params["stages"][str(s)]
        with jax.named_scope(f"stage{s}"):
            if s > 0:
                x = layers.layer_norm(stage["downsample"]["norm"], x, config.norm_eps, dtype)
                x = patchify(stage["downsample"]["conv"], x, 2, dtype)
            for j in range(config.depths[s]):
                drop = keep is not None and rates[index] > 0
                x = block(stage["blocks"][str(j)], x, config, dtype, keep[index] if drop else None, rates[index])
                index += 1
        states.append(x)
    with jax.named_scope("pooler"):
        pooled = layers.layer_norm(params["post_norm"], jnp.mean(x.astype(jnp.float32), axis=(1, 2)),
                                   config.layer_norm_eps, dtype)
        if config.head_hidden_size:
            pooled = layers.ACTIVATIONS[config.hidden_act](layers.dense(params["head"], pooled, dtype))
    nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
    hidden = tuple(nchw(a) for a in states) if output_hidden_states else None
    return layers.TowerOutput(nchw(x), pooled, hidden)


def table(config: ConvNextConfig) -> list[tables.Entry]:
    """The tower's transformers key table, names relative to ConvNextModel."""
    return declare.hf_table(specs(config))


FAMILIES = (
    Family("convnext", "vision", {"convnext": ConvNextConfig}, sys.modules[__name__], "gap",
           options=("output_hidden_states", "interpolate_pos_encoding"), pooled_size="pooled_size",
           check=check_pixel_values, prefixes=("", "convnext."), anchor="embeddings.patch_embeddings.weight"),
)
