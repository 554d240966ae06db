"""The ModifiedResNet tower family: OpenAI CLIP's ResNet image towers (RN50, RN101, RN50x4/x16/x64), as open_clip
builds them, init / apply on NCHW pixels.

A three-convolution stem and a 2x2 average pool; four stages of bottleneck blocks whose strides are average
pools (anti-aliased: pool, then a stride-1 convolution, on both the main path and the shortcut); BatchNorm
after every convolution; and an attention pool: the mean feature and every position, plus a learned position
table, attended over by the mean alone through the pool's own q/k/v projections, then c_proj to output_dim.

BatchNorm: without a dropout_key (inference, and locked towers in training) every BatchNorm normalises with its
running statistics, held in params["batch_stats"] (the family's `state`). With a dropout_key (training) it
normalises with the batch's statistics over (batch, height, width), the global batch under a data-parallel
mesh, and the output's `state` holds the running statistics moved towards them as torch does (momentum 0.1,
the unbiased variance), which the train step writes back (see towers.Family.state); gradient accumulation,
which would move them once per micro-batch, refuses such a tower.

LiT groups: the stem and stages are "embeddings", the attention pool the "head" (there is no layer stack for
unlocked_layers to cut).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dualenc import layers, params as declare, tables
from dualenc.errors import InputError
from dualenc.fields import TowerConfig, builds, check_int, fail, float_field, int_field
from dualenc.towers.family import Family
from dualenc.towers.inputs import check_image_layout

EXPANSION = 4  # a bottleneck block's output channels per planes
STRIDE = 32  # the stem and the three strided stages halve the image five times


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig(TowerConfig):
    """open_clip's ModifiedResNet (model_type "modified_resnet"; a vision_cfg whose `layers` is a list).

    Fields as ModifiedResNet's arguments: layers (blocks per stage, 4), width (the stem's output channels;
    stage i has width * 2**i planes and 4x as many output channels), heads (the attention pool's; open_clip
    gives width * 32 // head_width), output_dim (the pooled size: open_clip's embed_dim), image_size (square,
    a multiple of 32). batch_norm_eps / batch_norm_momentum: torch's BatchNorm2d defaults.
    """

    model_types: ClassVar[tuple[str, ...]] = ("modified_resnet",)
    size_fields: ClassVar[str] = "layers, width, output_dim"
    num_channels: ClassVar[int] = 3  # the stem's first convolution takes RGB

    layers: tuple[int, ...] = dataclasses.field(default=(3, 4, 6, 3), metadata={"required": True})
    width: int = int_field(64, lo=2, hi=1 << 12)
    heads: int = int_field(32, hi=1 << 12)
    output_dim: int = int_field(1024)
    image_size: int = int_field(224, lo=STRIDE, hi=8192)
    batch_norm_eps: float = float_field(1e-5, hi=1.0, lo_open=True)
    batch_norm_momentum: float = float_field(0.1, 0.0, 1.0)

    def _validate(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # hashable, one spelling
        if not isinstance(self.layers, tuple) or len(self.layers) != 4:
            fail(self.name, "layers", f"must be a list of 4 block counts (one per stage), got {self.layers!r}")
        for count in self.layers:
            check_int(self.name, "layers", count, 1, 1024)
        if self.image_size % STRIDE:
            fail(self.name, "image_size", f"= {self.image_size} is not implemented; supported: a multiple of "
                                          f"{STRIDE} (the stem and stages halve it five times)")
        if self.embed_dim % self.heads:
            fail(self.name, "heads", f"= {self.heads} must divide the attention pool's width {self.embed_dim} "
                                     f"(width * 32)")
        super()._validate()

    @property
    def embed_dim(self) -> int:
        """The attention pool's width: the last stage's channels."""
        return self.width * 32

    @property
    def grid(self) -> int:
        """The side of the last stage's feature map."""
        return self.image_size // STRIDE


# ------------------------------------------------------------------------------------------------ params

def _conv(path: tuple[str, ...], c_in: int, c_out: int, size: int, hf: str) -> declare.Param:
    """A bias-free convolution's kernel (c_in, k, k, c_out), He-normal over its fan-out (torchvision's ResNet)."""
    return declare.Param(path + ("kernel",), (c_in, size, size, c_out), ("channels", "patch", "patch", "embed"),
                         declare.normal((2.0 / (size * size * c_out)) ** 0.5), f"{hf}.weight", "conv", decay=True)


def _batch_norm(path: tuple[str, ...], c: int, hf: str, zero: bool = False) -> list[declare.Param]:
    """BatchNorm2d: scale (ones, or zeros for a block's last BatchNorm as open_clip initialises it) and bias;
    its running mean and variance under batch_stats (the family's state)."""
    return [declare.Param(path + ("scale",), (c,), ("norm",), declare.ZEROS if zero else declare.ONES,
                          f"{hf}.weight"),
            declare.Param(path + ("bias",), (c,), ("norm",), declare.ZEROS, f"{hf}.bias"),
            declare.Param(("batch_stats",) + path + ("mean",), (c,), ("norm",), declare.ZEROS, f"{hf}.running_mean"),
            declare.Param(("batch_stats",) + path + ("var",), (c,), ("norm",), declare.ONES, f"{hf}.running_var")]


def _conv_bn(path: tuple[str, ...], c_in: int, c_out: int, size: int, names: tuple[str, str],
             hf: tuple[str, str], zero: bool = False) -> list[declare.Param]:
    """A convolution and the BatchNorm after it, at path + names, named hf in open_clip."""
    return [_conv(path + (names[0],), c_in, c_out, size, hf[0]), *_batch_norm(path + (names[1],), c_out, hf[1], zero)]


def stage_specs(config: ModifiedResNetConfig) -> list[tuple[str, str, int, int, int]]:
    """(stage name, block name, in channels, planes, stride) of every bottleneck block, in order."""
    out, c_in = [], config.width
    for i, count in enumerate(config.layers):
        planes = config.width * 2 ** i
        for j in range(count):
            out.append((f"layer{i + 1}", str(j), c_in, planes, 2 if i and not j else 1))
            c_in = planes * EXPANSION
    return out


def specs(config: ModifiedResNetConfig) -> list[declare.Param]:
    """Every param of the tower, declared once (see dualenc.params); `hf` names are open_clip's, relative to its
    ModifiedResNet (CLIP.visual)."""
    w = config.width
    out = []
    for i, (c_in, c_out) in enumerate(((3, w // 2), (w // 2, w // 2), (w // 2, w)), start=1):
        out += _conv_bn((), c_in, c_out, 3, (f"conv{i}", f"bn{i}"), (f"conv{i}", f"bn{i}"))
    for stage, block, c_in, planes, stride in stage_specs(config):
        path, hf = (stage, block), f"{stage}.{block}."
        for i, (c_a, c_b, size) in enumerate(((c_in, planes, 1), (planes, planes, 3),
                                              (planes, planes * EXPANSION, 1)), start=1):
            out += _conv_bn(path, c_a, c_b, size, (f"conv{i}", f"bn{i}"), (f"{hf}conv{i}", f"{hf}bn{i}"), zero=i == 3)
        if stride > 1 or c_in != planes * EXPANSION:
            out += _conv_bn(path + ("downsample",), c_in, planes * EXPANSION, 1, ("conv", "bn"),
                            (f"{hf}downsample.0", f"{hf}downsample.1"))
    d, std = config.embed_dim, config.embed_dim ** -0.5
    out.append(declare.Param(("attnpool", "position"), (config.grid ** 2 + 1, d), ("position", "embed"),
                             declare.normal(std), "attnpool.positional_embedding", decay=True, group="head"))
    for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out += declare.dense(("attnpool", name), d, d, std, ("embed", "qkv"), hf=f"attnpool.{hf}", group="head")
    out += declare.dense(("attnpool", "out"), d, config.output_dim, std, ("qkv", "embed"), hf="attnpool.c_proj",
                         group="head")
    return out


@builds(ModifiedResNetConfig)
def _build(normal: layers.Normal, config: ModifiedResNetConfig) -> layers.Params:
    return declare.build(normal, specs(config))


init = declare.tower_init(specs)  # init(key, config, *, stacked=False) -> params


def table(config: ModifiedResNetConfig) -> list[tables.Entry]:
    """The tower's key table: open_clip's names relative to its ModifiedResNet (no transformers class has one)."""
    return declare.hf_table(specs(config))


# ------------------------------------------------------------------------------------------------ apply

class ResNetOutput(NamedTuple):
    """The tower's outputs: a TowerOutput with the new BatchNorm statistics of a training forward."""

    last_hidden_state: jax.Array  # (B, grid * grid, embed_dim): the last stage's feature map, row by row
    pooler_output: jax.Array  # (B, output_dim): the attention pool's
    hidden_states: tuple[jax.Array, ...] | None = None  # the stem's and each stage's output, NCHW
    attentions: None = None
    state: dict | None = None  # {"batch_stats": ...} after a training forward


def check_pixel_values(config: ModifiedResNetConfig, pixel_values):
    """Shape and dtype checks that hold under jit (shapes are static)."""
    check_image_layout(config, pixel_values)
    shape, size = tuple(pixel_values.shape), config.image_size
    if shape[2:] != (size, size):
        raise InputError(f"pixel_values of size {shape[2]}x{shape[3]} does not match the model's image_size "
                         f"{size}x{size} (its attention pool has a position for each cell of a {config.grid}x"
                         f"{config.grid} grid)")


class _Norms:
    """Runs the BatchNorms: with the running statistics, or (training) the batch's, collecting the new ones."""

    def __init__(self, stats: dict, config: ModifiedResNetConfig, train: bool):
        self.stats, self.config, self.train, self.new = stats, config, train, {}

    def __call__(self, p: layers.Params, path: tuple[str, ...], x: jax.Array, dtype) -> jax.Array:
        """BatchNorm of x (B, H, W, C), float32 statistics, in dtype."""
        stats = self.stats
        for key in path:
            stats = stats[key]
        x32 = x.astype(jnp.float32)
        if self.train:
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - layers.lead(mean, 4)), axis=(0, 1, 2))  # biased, as torch normalises
            n = x.shape[0] * x.shape[1] * x.shape[2]
            m = self.config.batch_norm_momentum
            node = self.new
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = jax.tree_util.tree_map(lax.stop_gradient, {
                "mean": (1 - m) * stats["mean"] + m * mean,
                "var": (1 - m) * stats["var"] + m * var * (n / max(n - 1, 1))})  # torch keeps the unbiased one
        else:
            mean, var = stats["mean"], stats["var"]
        scale = lax.rsqrt(var + self.config.batch_norm_eps) * p["scale"]
        return ((x32 - layers.lead(mean, 4)) * layers.lead(scale, 4) + layers.lead(p["bias"], 4)).astype(dtype)


def _conv2d(p: layers.Params, x: jax.Array, dtype, stride: int = 1) -> jax.Array:
    """A bias-free convolution of x (B, H, W, C), "same" padding (k // 2), accumulated in float32."""
    kernel = p["kernel"]
    pad = kernel.shape[1] // 2
    return lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (stride, stride), [(pad, pad)] * 2,
                                    dimension_numbers=("NHWC", "IHWO", "NHWC"), preferred_element_type=jnp.float32)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
    """torch's AvgPool2d(k) of x (B, H, W, C) whose H and W are multiples of k."""
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // k, k, w // k, k, c).astype(jnp.float32), axis=(2, 4)).astype(x.dtype)


def _bottleneck(p: layers.Params, path: tuple[str, ...], x: jax.Array, stride: int, norm: _Norms, dtype):
    relu = jax.nn.relu
    out = relu(norm(p["bn1"], path + ("bn1",), _conv2d(p["conv1"], x, dtype), dtype))
    out = relu(norm(p["bn2"], path + ("bn2",), _conv2d(p["conv2"], out, dtype), dtype))
    if stride > 1:
        out = _avg_pool(out, stride)
    out = norm(p["bn3"], path + ("bn3",), _conv2d(p["conv3"], out, dtype), dtype)
    identity = x
    if "downsample" in p:
        down = p["downsample"]
        identity = _avg_pool(x, stride) if stride > 1 else x
        identity = norm(down["bn"], path + ("downsample", "bn"), _conv2d(down["conv"], identity, dtype), dtype)
    return relu(out.astype(jnp.float32) + identity.astype(jnp.float32)).astype(dtype)


def attention_pool(p: layers.Params, x: jax.Array, config: ModifiedResNetConfig, dtype) -> jax.Array:
    """(B, output_dim): open_clip's AttentionPool2d over a feature map x (B, H, W, D)."""
    b, h, w, d = x.shape
    tokens = x.reshape(b, h * w, d).astype(jnp.float32)
    tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
    tokens = (tokens + layers.lead(p["position"], 3)).astype(dtype)
    spec = layers.EncoderSpec(num_layers=1, hidden_size=d, num_heads=config.heads, intermediate_size=d,
                              activation="relu", eps=config.batch_norm_eps, prenorm=True)
    out, _ = layers.attention(p, tokens, None, spec, dtype, None, first_only=True)
    return out[:, 0]


def apply(params: layers.Params, config: ModifiedResNetConfig, pixel_values: jax.Array, *, dropout_key=None,
          output_hidden_states: bool = False, dtype=None) -> ResNetOutput:
    """Runs the ResNet tower.

    Args:
      pixel_values: (B, 3, image_size, image_size) float images, as open_clip's transform gives them.
      dropout_key: training: BatchNorm normalises with the batch's statistics and returns the moved running
        ones in `state` (there is no dropout; the key only says "training").
      output_hidden_states: return the stem's and each stage's output (NCHW, as open_clip's
        forward_intermediates gives them).
      dtype: compute dtype of the convolutions and matmuls (default float32); BatchNorm, the residual sums and
        the pool's softmax run in float32.

    Returns:
      ResNetOutput: last_hidden_state (B, grid * grid, width * 32), pooler_output (B, output_dim), hidden_states
      when requested, state (training).
    """
    check_pixel_values(config, pixel_values)
    dtype = jnp.dtype(dtype or jnp.float32)
    norm = _Norms(params["batch_stats"], config, dropout_key is not None)
    relu = jax.nn.relu
    x = jnp.transpose(pixel_values, (0, 2, 3, 1))
    with jax.named_scope("stem"):
        for i in (1, 2, 3):
            conv = _conv2d(params[f"conv{i}"], x, dtype, stride=2 if i == 1 else 1)
            x = relu(norm(params[f"bn{i}"], (f"bn{i}",), conv, dtype))
        x = _avg_pool(x, 2)
    states = [x]
    stages = stage_specs(config)
    for index, (stage, block, _, _, stride) in enumerate(stages):
        with jax.named_scope(f"{stage}.{block}"):
            x = _bottleneck(params[stage][block], (stage, block), x, stride, norm, dtype)
        if index + 1 == len(stages) or stages[index + 1][0] != stage:
            states.append(x)
    with jax.named_scope("attnpool"):
        pooled = attention_pool(params["attnpool"], x, config, dtype)
    b, h, w, d = x.shape
    hidden = tuple(jnp.transpose(s, (0, 3, 1, 2)) for s in states) if output_hidden_states else None
    return ResNetOutput(x.reshape(b, h * w, d), pooled, hidden, None,
                        {"batch_stats": norm.new} if norm.train else None)


# ------------------------------------------------------------------------------------------------ the family

FAMILIES = (
    Family("modified_resnet", "vision", {"modified_resnet": ModifiedResNetConfig}, sys.modules[__name__], "map",
           options=("output_hidden_states",), pooled_size="output_dim", state=("batch_stats",),
           check=check_pixel_values, prefixes=("", "vision_model."), anchor="conv1.weight"),
)
