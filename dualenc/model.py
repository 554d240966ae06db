"""The dual encoder: both towers, projections (as its kind says), L2-normalised embeddings and scaled logits."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import layers, params as declare, towers
from dualenc.config import DualEncoderConfig, pooled_size
from dualenc.towers.family import IGNORABLE, OPTIONS, POOLINGS
from dualenc.towers.inputs import check_text_inputs
from dualenc.errors import InputError

PROJECTION_INIT_STD = 0.02


class DualEncoderOutput(NamedTuple):
    """The contrastive forward's results; a pytree (a NamedTuple), like transformers' CLIPOutput."""

    logits_per_image: jax.Array  # (n_images, n_texts)
    logits_per_text: jax.Array  # (n_texts, n_images)
    text_embeds: jax.Array  # (n_texts, projection_dim), L2-normalised, float32
    image_embeds: jax.Array  # (n_images, projection_dim), L2-normalised, float32
    text_outputs: layers.TowerOutput
    vision_outputs: layers.TowerOutput


def _projection(name: str, d_in: int, projection_dim: int, bias: bool = False) -> list[declare.Param]:
    return declare.dense((name,), d_in, projection_dim, PROJECTION_INIT_STD, ("embed", "projection"), bias=bias,
                         group="model")


@functools.lru_cache(maxsize=32)
def specs(config: DualEncoderConfig) -> tuple[declare.Param, ...]:
    """Every param of the model, declared once (see dualenc.params): each tower's specs under its side, then
    the model's own (own_specs)."""
    out = [p for side in towers.SIDES for p in declare.under(
        (side,), towers.family(getattr(config, side)).module.specs(getattr(config, side)))]
    widths = {name: (pooled_size(getattr(config, side)), config.projection_dim)
              for side, name in PROJECTIONS.items()} if config.kind.has_projections else {}
    return tuple(out + own_specs(widths, config.kind.projections == "bias", config.logit_scale_init_value,
                                 config.logit_bias_init_value))


def own_specs(projections: dict[str, tuple[int, int]], bias: bool, logit_scale: float,
              logit_bias: float | None) -> list[declare.Param]:
    """The dual encoder's own params: logit_scale, the projections ({name: (in, out)}, N(0, 0.02) kernels, zero
    biases with `bias`), logit_bias unless None; with big_vision's names for the logit scale and bias."""
    out = [declare.Param(("logit_scale",), (), (), declare.constant(logit_scale), bv="t", bv_kind="scalar",
                         group="model")]
    for name, (d_in, d_out) in projections.items():
        out += _projection(name, d_in, d_out, bias)
    if logit_bias is not None:
        out.append(declare.Param(("logit_bias",), (), (), declare.constant(logit_bias), bv="b", bv_kind="scalar",
                                 group="model"))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def projection_init(key: jax.Array, d_in: int, projection_dim: int, bias: bool = False) -> layers.Params:
    return declare.init(key, _projection("projection", d_in, projection_dim, bias))["projection"]


def init(key: jax.Array, config: DualEncoderConfig, *, stacked: bool = False) -> layers.Params:
    """Random params: towers as transformers initialises them, projections N(0, 0.02), logit_scale from config.

    Returns a dict with keys "vision", "text", "visual_projection", "text_projection" (for the kinds with
    projections: not SigLIP, whose towers end in their own heads), "logit_scale" (and "logit_bias" when the
    config has logit_bias_init_value), as `specs(config)` declares them. All random numbers come from one
    chunked draw (dualenc.params.draw), each param a distinct slice of it, in one jitted program. Each tower's
    per-layer stacks (its family's `stacks`: a transformer's "encoder") are tuples of per-layer dicts, or with
    stacked=True one dict whose leaves carry a leading depth axis (see unstack_layers); the numbers are the
    same in both layouts.
    """
    params = _stacked_init(key, config)
    return params if stacked else declare.unstack(params, specs(config))


@functools.partial(jax.jit, static_argnums=1)
def _stacked_init(key: jax.Array, config: DualEncoderConfig) -> layers.Params:
    return declare.init(key, specs(config))


@functools.lru_cache(maxsize=32)
def expected_shapes(config: DualEncoderConfig) -> dict[str, tuple[int, ...]]:
    """{"vision/encoder/mlp/fc1/kernel": shape, ...} of the params `init` makes for `config` (a per-layer
    encoder shown as the stacked shapes it stands for)."""
    return declare.shapes(specs(config))


def with_layout(params: dict, stacked: bool) -> dict:
    """params in the stacked layout or the per-layer one (see unstack_layers), whichever they are in now."""
    return stack_layers(params) if stacked else unstack_layers(params)


def stack_layers(params: dict) -> dict:
    """Params whose towers hold per-layer tuples (see unstack_layers) back in the stacked layout."""
    return _map_encoders(params, lambda enc: layers.stack_layers(enc) if isinstance(enc, (tuple, list)) else enc)


def unstack_layers(params: dict) -> dict:
    """The same params with each tower's encoder as a tuple of per-layer dicts.

    init and load_pretrained return this layout unless asked for the stacked one, and apply and the towers
    accept either. The per-layer one runs the layers as a Python loop: each layer's weights are buffers of
    their own, which on CPU makes the forward faster (B/32 CLIP at batch 1: about 30 ms less than copying
    each layer's slice out of a stacked array) and, in training, the backward. The stacked one runs them
    under lax.scan: compile time flat in depth, for deep models or when compile time matters more.
    """
    return _map_encoders(params, lambda enc: layers.unstack_layers(enc) if isinstance(enc, dict) else enc)


def _map_encoders(params: dict, fn) -> dict:
    """params with fn applied to each tower's per-layer stacks (the names its family gives in `stacks`)."""
    out = dict(params)
    for side in towers.SIDES:
        tower = out.get(side)
        names = [name for name in towers.stack_names() if name in tower] if isinstance(tower, dict) else []
        if names:
            out[side] = {**tower, **{name: fn(tower[name]) for name in names}}
    return out


def _shape_table(params: dict) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape}, with a tuple of per-layer dicts (a stack) shown as the stacked shapes it stands for."""
    flat = {}
    stacks = towers.stack_names()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        if len(keys) > 2 and keys[1] in stacks and isinstance(keys[2], int):
            name = "/".join(map(str, keys[:2] + keys[3:]))
            count = len(params[keys[0]][keys[1]])
            shape = (count,) + tuple(np.shape(leaf))
            if flat.setdefault(name, shape) != shape:
                raise InputError(f"params: the layers of {keys[0]}/{keys[1]} differ in shape at {name}")
            continue
        flat["/".join(map(str, keys))] = tuple(np.shape(leaf))
    return flat


def check_params(params: Any, config: DualEncoderConfig) -> None:
    """Checks that params has exactly the leaves and shapes `init(key, config)` gives (either layer layout).

    Raises InputError listing what differs.
    """
    if not isinstance(params, dict):
        raise InputError(f"params must be the nested dict init/load_pretrained return, got {type(params).__name__}")
    declare.check_tree(expected_shapes(config), _shape_table(params), "params do not match the config")


def _static_flags(**flags):
    for name, value in flags.items():
        if isinstance(value, jax.core.Tracer):
            raise InputError(f"{name} must be a Python value, not a traced array: jit with "
                             f"static_argnames=('{name}', ...)")


PROJECTIONS = {"vision": "visual_projection", "text": "text_projection"}


def project(params: layers.Params, side: str, pooled: jax.Array, dtype=None) -> jax.Array:
    """A tower's pooled output through its projection, in float32 (not normalised); models without
    projections (SigLIP) embed with the pooled output itself."""
    kernel_params = params.get(PROJECTIONS[side])
    if kernel_params is None:
        return pooled.astype(jnp.float32)
    return layers.dense(kernel_params, pooled, dtype or jnp.float32).astype(jnp.float32)


def normalize(x: jax.Array) -> jax.Array:
    """L2 normalisation over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _dropout_keys(train: bool, dropout_key):
    if not train:
        return None, None
    if dropout_key is None:
        raise InputError("train=True needs a dropout_key (a jax.random key); without one there is no dropout")
    return tuple(jax.random.split(dropout_key))


def run_tower(params: layers.Params, config: DualEncoderConfig, side: str, inputs: dict, *,
              pooled: bool = False, **flags) -> layers.TowerOutput:
    """Runs one tower (side "vision" or "text") on its inputs (pixel_values; or input_ids, attention_mask, ...):
    a dict that may hold the other side's inputs too; an input of this side the tower does not take is an error.

    pooled: only pooler_output will be read, so the tower may skip work that does not reach it (pooled_only,
    where its family supports it). flags: the tower apply's keyword arguments (attention, the attention
    implementation's name, among them).
    """
    tower_config = getattr(config, side)
    family = towers.family(tower_config)
    extra = sorted(k for k in towers.SIDE_ALL_INPUTS[side]
                   if inputs.get(k) is not None and k not in family.input_names)
    if extra:
        raise InputError(f"{', '.join(extra)} given, but the {side} tower ({family.name}) takes no such input")
    args = [inputs.get(name) for name in family.input_names]
    if pooled and family.pooled_only:
        flags["pooled_only"] = True
    return family.apply(params[side], tower_config, *args, **_options(family, side, flags))


def _options(family: towers.Family, side: str, flags: dict) -> dict:
    """flags without the options (towers.family.OPTIONS) the family does not list: at their defaults (None,
    False, 0; a patch_key without a patch_dropout rate) or only choosing how a computation runs (IGNORABLE)
    they are dropped, else refused."""
    out = {}
    for name, value in flags.items():
        if name not in OPTIONS or name in family.options:
            out[name] = value
        elif not (value is None or value is False or type(value) in (int, float) and value == 0
                  or name == "patch_key" and not flags.get("patch_dropout")) and name not in IGNORABLE:
            raise InputError(f"{name} is not supported by the {side} tower ({family.name}); leave it unset")
    return out


def _vision_flags(config: DualEncoderConfig, interpolate_pos_encoding: bool) -> dict:
    return {"interpolate_pos_encoding": interpolate_pos_encoding}  # refused by towers without the option


def get_image_features(params: layers.Params, config: DualEncoderConfig, pixel_values: jax.Array,
                       pixel_attention_mask=None, spatial_shapes=None, *, interpolate_pos_encoding: bool = False,
                       dtype=None, attention: str | None = None) -> jax.Array:
    """Projected (not normalised) image features, float32 (n_images, projection_dim). NaFlex models (SigLIP 2)
    also take pixel_attention_mask and spatial_shapes, as dualenc.NaFlexImageProcessor gives them. attention:
    as in `apply`."""
    check_params(params, config)
    _static_flags(interpolate_pos_encoding=interpolate_pos_encoding)
    inputs = dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes)
    out = run_tower(params, config, "vision", inputs, pooled=True, dtype=dtype,
                    attention=layers.resolve_attention(attention, dtype),
                    **_vision_flags(config, interpolate_pos_encoding))
    return project(params, "vision", out.pooler_output, dtype)


def get_text_features(params: layers.Params, config: DualEncoderConfig, input_ids: jax.Array,
                      attention_mask=None, token_type_ids=None, position_ids=None, *, dtype=None,
                      attention: str | None = None) -> jax.Array:
    """Projected (not normalised) text features, float32 (n_texts, projection_dim). attention: as in `apply`."""
    check_params(params, config)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  position_ids=position_ids)
    out = run_tower(params, config, "text", inputs, pooled=True, dtype=dtype,
                    attention=layers.resolve_attention(attention, dtype))
    return project(params, "text", out.pooler_output, dtype)


def apply(params: layers.Params, config: DualEncoderConfig, *, input_ids: jax.Array, pixel_values: jax.Array,
          attention_mask=None, token_type_ids=None, position_ids=None, pixel_attention_mask=None,
          spatial_shapes=None, train: bool = False, dropout_key=None,
          output_hidden_states: bool = False, output_attentions: bool = False,
          interpolate_pos_encoding: bool = False, dtype=None, remat_policy: str | None = None,
          pooled_only: bool = False, attention: str | None = None) -> DualEncoderOutput:
    """The contrastive forward of transformers' VisionTextDualEncoderModel and CLIPModel (and open_clip's CLIP).

    Args:
      params: from `init` or `load_pretrained`.
      config: a DualEncoderConfig (static: it hashes, and jit treats it as part of the function).
      input_ids: (n_texts, L) int token ids; attention_mask / token_type_ids (n_texts, L), default ones / zeros
        (CLIP text towers take no token_type_ids); position_ids default to the text tower's own (arange, or
        RoBERTa's padding-aware count).
      pixel_values: (n_images, C, H, W) float images; for NaFlex models (SigLIP 2), patchified images
        (n_images, N, C * p * p) with pixel_attention_mask (n_images, N) and spatial_shapes (n_images, 2),
        as dualenc.NaFlexImageProcessor gives them.
      train: run dropout (hidden and attention probabilities); needs dropout_key.
      output_hidden_states / output_attentions: add per-layer tuples to the tower outputs.
      interpolate_pos_encoding: resize the vision position table for images of another size.
      dtype: compute dtype of the matmuls (float32 default; bfloat16/float16 keep float32 params), softmax,
        LayerNorm statistics, normalisation and logits stay float32.
      remat_policy: a name in jax.checkpoint_policies to rematerialise each encoder layer under grad.
      pooled_only: the towers' last_hidden_state is the pooled token only (the first; CLIP text: the
        end-of-text token), (B, 1, D), so their last layer computes just that token: the same logits and
        embeddings for less work.
      attention: the attention implementation, a name in layers.IMPLEMENTATIONS: "xla" (einsum and softmax,
        every backend), "jax" (jax.nn.dot_product_attention), "cudnn" (cuDNN's fused kernel: GPU, bfloat16 or
        float16); None for the backend's default (layers.default_attention: "jax" on GPU, else "xla"). Layers
        that need the attention probabilities (output_attentions, attention dropout in training) run "xla".

    The flags, dtype, remat_policy, pooled_only and attention choose the computation: under jit pass them as
    static_argnames.

    Returns:
      DualEncoderOutput.
    """
    _static_flags(train=train, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                  interpolate_pos_encoding=interpolate_pos_encoding, pooled_only=pooled_only)
    check_params(params, config)
    vision_key, text_key = _dropout_keys(train, dropout_key)
    flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions, dtype=dtype,
                 remat_policy=remat_policy, attention=layers.resolve_attention(attention, dtype))
    if pooled_only:
        for side in ("vision", "text"):
            family = towers.family(getattr(config, side))
            if not family.pooled_only:
                raise InputError(f"pooled_only is not supported by the {side} tower ({family.name}: it pools with "
                                 f"{POOLINGS[family.pooling]}); leave it False for this model")
        flags["pooled_only"] = True
    vision_outputs = run_tower(params, config, "vision", dict(pixel_values=pixel_values,
                                                              pixel_attention_mask=pixel_attention_mask,
                                                              spatial_shapes=spatial_shapes),
                               dropout_key=vision_key, **_vision_flags(config, interpolate_pos_encoding), **flags)
    text_outputs = run_tower(params, config, "text", dict(input_ids=input_ids, attention_mask=attention_mask,
                                                          token_type_ids=token_type_ids, position_ids=position_ids),
                             dropout_key=text_key, **flags)
    image_embeds = normalize(project(params, "vision", vision_outputs.pooler_output, dtype))
    text_embeds = normalize(project(params, "text", text_outputs.pooler_output, dtype))
    logit_scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
    logits_per_text = jnp.matmul(text_embeds, image_embeds.T, precision=jax.lax.Precision.HIGHEST) * logit_scale
    if "logit_bias" in params:
        logits_per_text = logits_per_text + params["logit_bias"].astype(jnp.float32)
    return DualEncoderOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds, text_outputs,
                             vision_outputs)


def check_inputs(config: DualEncoderConfig, *, input_ids=None, pixel_values=None, attention_mask=None,
                 token_type_ids=None, position_ids=None, pixel_attention_mask=None, spatial_shapes=None,
                 interpolate_pos_encoding: bool = False) -> None:
    """Checks inputs' shapes and values outside jit, where a gather would silently misread bad ids.

    Raises InputError naming the argument: token ids outside [0, vocab_size), token types outside
    [0, type_vocab_size), positions outside the table, a mask that is not 0/1, non-finite pixels.
    """
    if input_ids is not None:
        text = config.text
        arrays = {k: v if v is None else np.asarray(v) for k, v in dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids).items()}
        check_text_inputs(text, **arrays)
        for name, hi in (("input_ids", text.vocab_size), ("token_type_ids", getattr(text, "type_vocab_size", 0)),
                         ("position_ids", text.max_position_embeddings), ("attention_mask", 2)):
            value = arrays[name]
            if value is not None and value.size and (value.min() < 0 or value.max() >= hi):
                bad = value[(value < 0) | (value >= hi)]
                raise InputError(f"{name} holds {bad.size} value(s) outside [0, {hi}), e.g. {bad.flat[0]}")
    if pixel_values is not None:
        pixels = np.asarray(pixel_values)
        family = towers.family(config.vision)
        given = dict(pixel_values=pixels, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes)
        options = _options(family, "vision", {"interpolate_pos_encoding": interpolate_pos_encoding})
        if family.check is not None:
            family.check(config.vision, *[given.get(name) for name in family.input_names], **options)
        if not np.all(np.isfinite(pixels)):
            raise InputError(f"pixel_values holds {int(np.size(pixels) - np.isfinite(pixels).sum())} "
                             f"non-finite value(s) (NaN or inf)")


def num_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ------------------------------------------------------------------------------------------------ tower state

def split_state(params: dict, config: DualEncoderConfig) -> tuple[dict, dict]:
    """(weights, state): params without the towers' state (the names their families list in `state`, such as
    BatchNorm's running statistics), and that state as {side: {name: value}}. Differentiate and decay the
    weights; join_state(weights, state) gives params again."""
    weights, state = dict(params), {}
    for side in towers.SIDES:
        names = [name for name in towers.family(getattr(config, side)).state if name in params[side]]
        if names:
            weights[side] = {k: v for k, v in params[side].items() if k not in names}
            state[side] = {name: params[side][name] for name in names}
    return weights, state


def join_state(weights: dict, state: dict) -> dict:
    """The inverse of split_state."""
    return {**weights, **{side: {**weights[side], **values} for side, values in state.items()}}


def updated_state(params: dict, config: DualEncoderConfig, output: DualEncoderOutput) -> dict:
    """params with the towers' state replaced by the new values a training forward returned (the `state` field
    of a tower output whose family has state; see towers.Family)."""
    _, state = split_state(params, config)
    for side, tower_out in (("vision", output.vision_outputs), ("text", output.text_outputs)):
        new = getattr(tower_out, "state", None)
        if side in state and new is not None:
            state[side] = {name: new.get(name, value) for name, value in state[side].items()}
    return join_state(params, state)
