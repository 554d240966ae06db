"""transformers directories <-> dualenc params: VisionTextDualEncoderModel and CLIPModel, and single towers.

Each tower family declares its key table (dualenc.towers); this module places the tables under the prefixes
transformers uses, reads strictly and writes atomically.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import files, kinds, model, params as declare, tables, towers
from dualenc.config import DualEncoderConfig, pooled_size, tower_config_from_dict
from dualenc.formats.configs import load_config
from dualenc.errors import CheckpointError, ConfigError
from dualenc.hub import resolve
from dualenc.formats.weights import (
    BUFFERS, CONFIG, WEIGHTS, Weights, carry_over, dump_table, listed, load_table, read_weights,
)
from dualenc.tables import Entry

LOGIT_BIAS = "dualenc.logit_bias"
SIDES = towers.SIDES


class NewlyInitializedWarning(UserWarning):
    """Params that a checkpoint did not hold and were initialised at random (train them before use)."""


class UnusedWeightsWarning(UserWarning):
    """Tensors of a single-tower checkpoint outside the tower (task heads, another tower) that were not loaded."""


def dual_table(config: DualEncoderConfig, prefixes: dict[str, str] | None = None) -> list[Entry]:
    """The key table of a whole model's checkpoint (VisionTextDualEncoderModel, CLIPModel, SiglipModel...)."""
    kind = config.kind
    prefixes = prefixes or kind.modules
    out = []
    for side in SIDES:
        tower = getattr(config, side)
        out += tables.prefixed(prefixes[side], (side,), towers.family(tower).table(tower))
    for name in model.PROJECTIONS.values() if kind.has_projections else ():
        out.append(Entry(f"{name}.weight", (name, "kernel"), "linear"))
        if kind.projections == "bias":
            out.append(Entry(f"{name}.bias", (name, "bias"), "id"))
    scalar = {(): "id", (1,): "scalar"}[kind.scalar_shape]
    out.append(Entry(*kind.scale_entry[:1], ("logit_scale",), kind.scale_entry[1]))
    return out + ([Entry("logit_bias", ("logit_bias",), scalar)] if kind.own_bias else [])  # else in the metadata


def _dual_prefixes(config: DualEncoderConfig, names: set[str]) -> dict[str, str]:
    # transformers 4.x nested a CLIP tower's own "vision_model." / "text_model." inside the dual encoder's;
    # 5.x does not.
    out = {}
    for side, prefix in config.kind.modules.items():
        nested = prefix + prefix
        family = towers.family(getattr(config, side))
        out[side] = nested if prefix in family.prefixes and any(n.startswith(nested) for n in names) else prefix
    return out


def param_shapes(config: DualEncoderConfig) -> dict:
    shapes = declare.shape_tree(model.specs(config))
    if not config.kind.own_bias:
        shapes.pop("logit_bias", None)  # kept in the weights' metadata, see load_dir
    return shapes


def to_device(params: dict, stacked: bool) -> dict:
    """Loaded (numpy, stacked) params as jax arrays in the layout asked for; per-layer arrays are cut from
    the host copy, so the device never holds two copies of the encoder."""
    return jax.tree_util.tree_map(jnp.asarray, model.with_layout(params, stacked))


def load_dir(path: str, stacked: bool = False) -> tuple[DualEncoderConfig, dict]:
    """Loads a transformers VisionTextDualEncoder, CLIP or SigLIP directory (config.json + safetensors)."""
    config = load_config(path)
    if not isinstance(config, DualEncoderConfig):
        raise ConfigError(f"{os.path.join(path, CONFIG)}: is a single {type(config).__name__} tower, not a "
                          f"dual encoder ({', '.join(map(repr, kinds.MODEL_TYPES))}); combine towers with "
                          f"from_vision_text_pretrained")
    weights = read_weights(path)
    table = dual_table(config, _dual_prefixes(config, set(weights.tensors)))
    params, _ = load_table(weights, table, param_shapes(config))
    if config.logit_bias_init_value is not None and not config.kind.own_bias:
        # transformers' VisionTextDualEncoder and CLIP have no logit bias: dualenc keeps a learned one in the
        # safetensors metadata.
        try:
            params["logit_bias"] = jnp.asarray(float(weights.metadata[LOGIT_BIAS]), jnp.float32)
        except (KeyError, ValueError):
            raise CheckpointError(f"{weights.where}: config.json has logit_bias_init_value but the weights' "
                                  f"metadata has no valid '{LOGIT_BIAS}'") from None
    return config, to_device(params, stacked)


def save_pretrained(path: str | os.PathLike, config: DualEncoderConfig, params: dict, *, processor=None,
                    extra_files: Callable[[str], None] | None = None) -> str:
    """Writes a directory that transformers loads as is, as the class of the config's kind (its architecture:
    CLIPModel for model_type "clip", SiglipModel / Siglip2Model for "siglip" / "siglip2", else a
    VisionTextDualEncoderModel).

    The write is atomic (see files.atomic_directory): `path` holds either the old or the new checkpoint,
    whatever moment the process is killed. What an existing checkpoint holds besides weights and config
    (tokenizer, preprocessor, README, subdirectories) is carried over, hard-linked where possible. A
    `processor` (dualenc.Processor) writes its tokenizer and preprocessor files into the same atomic step, so
    transformers' AutoProcessor loads the directory too; `extra_files(tmp_dir)` may add other files.
    """
    if not isinstance(config, DualEncoderConfig):
        raise ConfigError(f"save_pretrained needs a DualEncoderConfig, got {type(config).__name__}")
    flat = _flat_params(config, params)
    metadata = {LOGIT_BIAS: repr(float(flat[("logit_bias",)]))} \
        if ("logit_bias",) in flat and not config.kind.own_bias else {}
    tensors = dump_table(dual_table(config), flat)
    with files.atomic_directory(os.fspath(path)) as tmp:
        carry_over(os.fspath(path), tmp)
        files.write_safetensors(os.path.join(tmp, WEIGHTS), tensors, metadata)
        files.write_json_atomic(os.path.join(tmp, CONFIG), config.to_dict())
        if processor is not None:
            processor.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return os.fspath(path)


def _flat_params(config: DualEncoderConfig, params: dict) -> dict[tuple[str, ...], np.ndarray]:
    try:
        model.check_params(params, config)
    except ValueError as e:
        raise CheckpointError(f"cannot save: {e}") from None
    params = model.stack_layers(params)
    return {tuple(k.key for k in path): np.asarray(jax.device_get(leaf), dtype=np.float32)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


# ------------------------------------------------------------------------------------------------ single towers

_PROJECTION = {"vision": "visual_projection", "text": "text_projection"}


def load_tower(path: str | os.PathLike, key: jax.Array, side: str | None = None):
    """Loads one tower from a model directory: (config, params, newly initialised names, extras).

    Accepts every single-tower class of the registered families (ViTModel, ViTForImageClassification,
    CLIPVisionModel[WithProjection], CLIPTextModel[WithProjection], BertModel, BertForMaskedLM incl. the legacy
    layout, RobertaModel, XLM-RoBERTa and their task-head variants), and a CLIPModel (its tower on `side`).
    A missing optional part (a pooler) is initialised at random; tensors outside the tower (heads, the other
    tower) are reported with an UnusedWeightsWarning unless returned in extras: {"projection": the tower's
    trained projection kernel, "logit_scale": a CLIPModel's} when the checkpoint has them.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    raw = files.read_json(os.path.join(path, CONFIG), "config")
    model_type = raw.get("model_type")
    whole = kinds.KINDS.get(model_type) if isinstance(model_type, str) else None
    whole = whole if whole is not None and whole.towers is not None else None
    if whole is not None:  # one tower of a whole model of a kind with fixed towers (CLIP, SigLIP)
        config = tower_config_from_dict(raw, where=os.path.join(path, CONFIG), side=side or "vision")
    else:
        config = load_config(path)
        if isinstance(config, DualEncoderConfig):
            raise ConfigError(f"{os.path.join(path, CONFIG)} is a whole dual encoder; load it with "
                              f"load_pretrained")
    family = towers.family(config)
    weights = read_weights(path)
    names = set(weights.tensors)
    candidates = (whole.modules[family.side],) if whole is not None else family.prefixes
    prefix = next((p for p in candidates if p + family.anchor in names), None)
    if prefix is None:
        raise CheckpointError(f"{weights.where}: no {type(config).__name__} weights found "
                              f"(looked for {' or '.join(p + family.anchor for p in candidates)})")
    table = tables.prefixed(prefix, (), family.table(config))
    extra_table = [Entry(f"{_PROJECTION[family.side]}.weight", ("projection", "kernel"), "linear")]
    if whole is not None and whole.has_projections:  # its logit scale goes with the trained projections
        extra_table.append(Entry(whole.scale_entry[0], ("logit_scale",), whole.scale_entry[1]))
    extra_table = [e for e in extra_table if e.hf in names]
    extra_names = {e.hf for e in extra_table}
    specs = family.module.specs(config)
    shapes = declare.shape_tree(specs)
    optional = tuple(prefix + name + "." for name in family.optional)
    unused = {n for n in names if not n.startswith(prefix) and not BUFFERS.search(n)} if prefix else set()
    unused -= extra_names
    params, absent = load_table(weights, table, shapes, allowed_missing=lambda n: n.startswith(optional),
                                ignored=lambda n: n in unused or n in extra_names)
    extras = _load_extras(weights, extra_table, config)
    if unused:
        warnings.warn(f"{weights.where}: {len(unused)} tensor(s) outside the {type(config).__name__} tower were "
                      f"not used: {listed(unused)}", UnusedWeightsWarning, stacklevel=3)
    new = []
    for name in family.optional:
        if any(n.startswith(prefix + name + ".") for n in absent):
            params[name] = declare.init(key, [p for p in specs if p.path[0] == name])[name]
            new.append(name)
    return config, params, new, extras


def _load_extras(weights: Weights, table: list[Entry], config) -> dict:
    out = {}
    for e in table:
        value = np.asarray(tables.TO_PARAM[e.kind](weights.tensors[e.hf]), np.float32)
        if e.path[0] == "projection" and (value.ndim != 2 or value.shape[0] != config.hidden_size):
            raise CheckpointError(f"{weights.where}: {e.hf} has shape {weights.tensors[e.hf].shape}, not "
                                  f"(projection_dim, {config.hidden_size})")
        if e.path[0] == "logit_scale" and value.shape != ():
            raise CheckpointError(f"{weights.where}: {e.hf} has shape {value.shape}, expected a scalar")
        out[e.path[0]] = jnp.asarray(value)
    return out


def _suggested_dim(loaded: dict, trained: list) -> int:
    """The projection size the towers suggest for new projections (see from_vision_text_pretrained)."""
    for kernel in trained:
        if kernel is not None:
            return int(kernel.shape[1])
    for side in SIDES:
        dim = getattr(loaded[side][0], "projection_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
    return 512


def from_vision_text_pretrained(vision_path: str | os.PathLike, text_path: str | os.PathLike, *, key: jax.Array,
                                projection_dim: int | None = None, logit_scale_init_value: float = 2.6592,
                                stacked: bool = False):
    """A dual encoder from two single-tower directories (or one CLIPModel for either side); either may be a
    Hugging Face Hub model id (see dualenc.hub.resolve).

    Projections: when both sides come from the same CLIPModel directory, its trained projections and
    logit_scale are kept, so the result gives that CLIP's logits exactly. When both sides carry a trained
    projection of the same size (CLIPVisionModelWithProjection + CLIPTextModelWithProjection), those are kept
    and logit_scale is new. Otherwise both projections are new (N(0, 0.02)) of projection_dim, by default the size
    the towers suggest: a tower's trained projection (CLIP*ModelWithProjection), else a CLIP tower config's own
    projection_dim (vision side first), else 512.

    Returns (config, params), the encoders per-layer unless stacked (see init). Every newly initialised param
    is reported with a NewlyInitializedWarning.
    """
    vision_path, text_path = resolve(vision_path), resolve(text_path)
    kv, kt, kvp, ktp = jax.random.split(key, 4)
    one_dir = os.path.realpath(vision_path) == os.path.realpath(text_path)
    loaded = {}
    for side, path, k in (("vision", vision_path, kv), ("text", text_path, kt)):
        with warnings.catch_warnings():
            if one_dir:  # both towers of one model: the other tower's tensors are used too
                warnings.simplefilter("ignore", UnusedWeightsWarning)
            tower_config, params, new, extras = load_tower(path, k, side)
        if towers.family(tower_config).side != side:
            raise ConfigError(f"{path}: is a {type(tower_config).__name__}, not a {side} tower")
        loaded[side] = (tower_config, params, new, extras)
    same_clip = one_dir and all("logit_scale" in loaded[s][3] for s in SIDES)
    trained = [loaded[s][3].get("projection") for s in SIDES]
    keep = all(p is not None for p in trained) and trained[0].shape[1] == trained[1].shape[1]
    if keep and projection_dim is not None and projection_dim != trained[0].shape[1]:
        keep = False  # an explicit other size asks for new projections
    dim = trained[0].shape[1] if keep else (projection_dim or _suggested_dim(loaded, trained))
    keep_scale = keep and same_clip
    logit_scale = loaded["vision"][3]["logit_scale"] if keep_scale else jnp.asarray(logit_scale_init_value,
                                                                                     jnp.float32)
    config = DualEncoderConfig(vision=loaded["vision"][0], text=loaded["text"][0], projection_dim=dim,
                               logit_scale_init_value=float(logit_scale) if keep_scale else logit_scale_init_value)
    params = {"vision": loaded["vision"][1], "text": loaded["text"][1], "logit_scale": logit_scale}
    for (side, name), k, kernel in zip(_PROJECTION.items(), (kvp, ktp), trained):
        params[name] = {"kernel": kernel} if keep else model.projection_init(
            k, pooled_size(getattr(config, side)), dim, config.kind.projections == "bias")
    new = [f"{side}/{n}" for side in SIDES for n in loaded[side][2]]
    new += [] if keep else ["visual_projection", "text_projection"]
    new += [] if keep_scale else ["logit_scale"]
    if new:
        warnings.warn(f"newly initialised params (train them before use): {', '.join(new)}",
                      NewlyInitializedWarning, stacklevel=2)
    return config, to_device(params, stacked)
