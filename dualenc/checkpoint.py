"""transformers checkpoints <-> dualenc params: one declarative key table per tower, strict, atomic saves.

Only safetensors is read; pickled formats (pytorch_model.bin, flax_model.msgpack, ...) are never opened.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import bert, files, layers, model, vit
from dualenc.config import (
    BertConfig, CLIPVisionConfig, DualEncoderConfig, ViTConfig, load_config, read_json,
)
from dualenc.errors import CheckpointError, ConfigError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "flax_model.msgpack",
                  "flax_model.msgpack.index.json", "tf_model.h5", "model.ckpt.index")
# Non-persistent buffers that older transformers versions wrote into checkpoints; they hold no weights.
BUFFERS = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")
MAX_LISTED = 20
LOGIT_BIAS = "dualenc.logit_bias"


class NewlyInitializedWarning(UserWarning):
    """Params that a checkpoint did not hold and were initialised at random (train them before use)."""


class UnusedWeightsWarning(UserWarning):
    """Tensors of a single-tower checkpoint outside the tower (task heads, another tower) that were not loaded."""


# ------------------------------------------------------------------------------------------------ key tables

class Entry(NamedTuple):
    hf: str  # transformers name; "{i}" marks the layer index
    path: tuple[str, ...]  # where it lives in the params tree (layers stacked on axis 0)
    kind: str  # layout transform, see _TO_PARAM


_TO_PARAM: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,  # torch Linear (out, in) -> kernel (in, out)
    "conv": lambda a: a.transpose(1, 2, 3, 0),  # torch Conv2d (D, C, p, p) -> (C, p, p, D)
    "cls": lambda a: a.reshape(a.shape[-1]),  # ViT cls_token (1, 1, D) -> (D,)
    "pos": lambda a: a.reshape(a.shape[1:]),  # ViT position_embeddings (1, N, D) -> (N, D)
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 0, 1, 2),
    "cls": lambda a: a.reshape(1, 1, -1),
    "pos": lambda a: a[None],
}


def _dense(hf: str, path: tuple[str, ...], bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", path + ("kernel",), "linear")]
    return out + [Entry(f"{hf}.bias", path + ("bias",), "id")] if bias else out


def _norm(hf: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{hf}.weight", path + ("scale",), "id"), Entry(f"{hf}.bias", path + ("bias",), "id")]


def _layer(prefix: str, names: dict[str, str], qkv_bias: bool = True) -> list[Entry]:
    enc = ("encoder",)
    out = []
    for param in ("query", "key", "value"):
        out += _dense(prefix + names[param], enc + ("attention", param), qkv_bias)
    out += _dense(prefix + names["out"], enc + ("attention", "out"))
    out += _norm(prefix + names["attention_norm"], enc + ("attention_norm",))
    out += _dense(prefix + names["fc1"], enc + ("mlp", "fc1"))
    out += _dense(prefix + names["fc2"], enc + ("mlp", "fc2"))
    out += _norm(prefix + names["mlp_norm"], enc + ("mlp_norm",))
    return out


_VIT_LAYER = dict(query="attention.attention.query", key="attention.attention.key",
                  value="attention.attention.value", out="attention.output.dense", attention_norm="layernorm_before",
                  fc1="intermediate.dense", fc2="output.dense", mlp_norm="layernorm_after")
_CLIP_LAYER = dict(query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
                   out="self_attn.out_proj", attention_norm="layer_norm1", fc1="mlp.fc1", fc2="mlp.fc2",
                   mlp_norm="layer_norm2")
_BERT_LAYER = dict(query="attention.self.query", key="attention.self.key", value="attention.self.value",
                   out="attention.output.dense", attention_norm="attention.output.LayerNorm",
                   fc1="intermediate.dense", fc2="output.dense", mlp_norm="output.LayerNorm")


def tower_table(config) -> list[Entry]:
    """The key table of one tower, names relative to the tower's module in transformers."""
    if isinstance(config, ViTConfig):
        return [
            Entry("embeddings.cls_token", ("embeddings", "cls"), "cls"),
            Entry("embeddings.position_embeddings", ("embeddings", "position"), "pos"),
            Entry("embeddings.patch_embeddings.projection.weight", ("embeddings", "patch", "kernel"), "conv"),
            Entry("embeddings.patch_embeddings.projection.bias", ("embeddings", "patch", "bias"), "id"),
            *_layer("encoder.layer.{i}.", _VIT_LAYER, config.qkv_bias),
            *_norm("layernorm", ("post_norm",)),
            *_dense("pooler.dense", ("pooler",)),
        ]
    if isinstance(config, CLIPVisionConfig):
        return [
            Entry("embeddings.class_embedding", ("embeddings", "cls"), "id"),
            Entry("embeddings.position_embedding.weight", ("embeddings", "position"), "id"),
            Entry("embeddings.patch_embedding.weight", ("embeddings", "patch", "kernel"), "conv"),
            *_norm("pre_layrnorm", ("pre_norm",)),
            *_layer("encoder.layers.{i}.", _CLIP_LAYER),
            *_norm("post_layernorm", ("post_norm",)),
        ]
    return [
        Entry("embeddings.word_embeddings.weight", ("embeddings", "word"), "id"),
        Entry("embeddings.position_embeddings.weight", ("embeddings", "position"), "id"),
        Entry("embeddings.token_type_embeddings.weight", ("embeddings", "token_type"), "id"),
        *_norm("embeddings.LayerNorm", ("embeddings", "norm")),
        *_layer("encoder.layer.{i}.", _BERT_LAYER),
        *_dense("pooler.dense", ("pooler",)),
    ]


def dual_table(config: DualEncoderConfig, vision_prefix: str = "vision_model.") -> list[Entry]:
    """The key table of a VisionTextDualEncoderModel checkpoint."""
    return [
        *(Entry(vision_prefix + e.hf, ("vision",) + e.path, e.kind) for e in tower_table(config.vision)),
        *(Entry("text_model." + e.hf, ("text",) + e.path, e.kind) for e in tower_table(config.text)),
        Entry("visual_projection.weight", ("visual_projection", "kernel"), "linear"),
        Entry("text_projection.weight", ("text_projection", "kernel"), "linear"),
        Entry("logit_scale", ("logit_scale",), "id"),
    ]


def _expand(table: Iterable[Entry], depth: int) -> dict[str, tuple[Entry, int | None]]:
    out = {}
    for e in table:
        if "{i}" in e.hf:
            out.update({e.hf.format(i=i): (e, i) for i in range(depth)})
        else:
            out[e.hf] = (e, None)
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------ reading

class Weights(NamedTuple):
    tensors: dict[str, np.ndarray]
    source: dict[str, str]  # tensor name -> file it came from
    where: str  # the file (or index) to name in errors
    metadata: dict[str, str]  # safetensors metadata (of the first shard)


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def read_weights(directory: str) -> Weights:
    """All tensors of a checkpoint directory (model.safetensors, or shards named by its index)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(single):
        tensors, metadata = files.read_safetensors(single)
        tensors = _legacy_norm_names(tensors, single)
        return Weights(tensors, dict.fromkeys(tensors, single), single, metadata)
    if os.path.isfile(index):
        weight_map = read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
        tensors, source, metadata = {}, {}, None
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard or shard in (".", ".."):
                raise CheckpointError(f"{index}: shard {shard!r} is not a plain file name in the directory")
            path = os.path.join(directory, shard)
            shard_tensors, shard_metadata = files.read_safetensors(path)
            shard_tensors = _legacy_norm_names(shard_tensors, path)
            metadata = shard_metadata if metadata is None else metadata
            wanted = {k for k, v in weight_map.items() if v == shard}
            strays = set(shard_tensors) - wanted
            if strays:
                raise CheckpointError(f"{path}: holds tensors the index does not assign to it: {_listed(strays)}")
            absent = wanted - set(shard_tensors)
            if absent:
                raise CheckpointError(f"{path}: lacks tensors the index assigns to it: {_listed(absent)}")
            tensors.update(shard_tensors)
            source.update(dict.fromkeys(shard_tensors, path))
        return Weights(tensors, source, index, metadata or {})
    present = [f for f in UNSAFE_WEIGHTS if os.path.exists(os.path.join(directory, f))]
    if present:
        raise CheckpointError(
            f"{directory} holds only {', '.join(present)}; dualenc reads safetensors only and never unpickles. "
            f"If you trust the file, convert it with transformers: "
            f"AutoModel.from_pretrained(DIR).save_pretrained(DIR) writes {WEIGHTS}")
    raise CheckpointError(f"{directory} has no {WEIGHTS} or {WEIGHTS_INDEX}")


def _legacy_norm_names(tensors: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Old TF-converted BERT checkpoints call LayerNorm's weight/bias gamma/beta."""
    out = {}
    for name, value in tensors.items():
        new = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        if new in out or (new != name and new in tensors):
            raise CheckpointError(f"{path}: holds both {name!r} and {new!r}")
        out[new] = value
    return out


def _param_shapes(fn, *args) -> Any:
    return jax.eval_shape(fn, jax.random.key(0), *args)


def load_table(weights: Weights, table: list[Entry], shapes, depths: dict[str, int], *,
               allowed_missing: Callable[[str], bool] = lambda name: False,
               ignored: Callable[[str], bool] = lambda name: False) -> tuple[dict, set[str]]:
    """Loads `weights` into a params tree shaped like `shapes` through `table`, strictly.

    Returns (params, names of allowed-missing tensors that were absent). Raises CheckpointError listing
    missing, unexpected and mis-shaped tensors.
    """
    expected = {}
    for e in table:
        depth = depths[e.path[0]] if "{i}" in e.hf else 0
        expected.update(_expand([e], depth))
    available = set(weights.tensors)
    missing = {n for n in expected if n not in available}
    absent_ok = {n for n in missing if allowed_missing(n)}
    missing -= absent_ok
    unexpected = {n for n in available - set(expected) if not (BUFFERS.search(n) or ignored(n))}
    wrong = []
    for name, (e, i) in expected.items():
        if name not in available:
            continue
        param_shape = _get(shapes, e.path).shape[(0 if i is None else 1):]
        want = _TO_HF[e.kind](np.zeros(param_shape, np.uint8)).shape
        have = weights.tensors[name].shape
        if have != want:
            wrong.append(f"{name} {tuple(have)} (expected {tuple(want)})")
        elif weights.tensors[name].dtype not in files.FLOATING:
            wrong.append(f"{name} of dtype {weights.tensors[name].dtype} (expected floating point)")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape or dtype: {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"{weights.where} does not match its config: " + "; ".join(problems))
    params: dict = {}
    for e in table:
        leaf = _get(shapes, e.path)
        if "{i}" in e.hf:
            names = [e.hf.format(i=i) for i in range(depths[e.path[0]])]
            if any(n in absent_ok for n in names):
                continue
            value = np.stack([_TO_PARAM[e.kind](weights.tensors[n]) for n in names]) if names else \
                np.zeros(leaf.shape, np.float32)
        else:
            if e.hf in absent_ok:
                continue
            value = _TO_PARAM[e.kind](weights.tensors[e.hf])
        _set(params, e.path, jnp.asarray(np.asarray(value, dtype=leaf.dtype)))
    return params, absent_ok


def _vision_prefix_in_dual(config: DualEncoderConfig, names: set[str]) -> str:
    # transformers 4.x nested CLIPVisionModel's own "vision_model." inside the dual encoder's; 5.x does not.
    if isinstance(config.vision, CLIPVisionConfig) and any(n.startswith("vision_model.vision_model.")
                                                           for n in names):
        return "vision_model.vision_model."
    return "vision_model."


def load_pretrained(path: str | os.PathLike) -> tuple[DualEncoderConfig, dict]:
    """Loads a transformers VisionTextDualEncoder directory (config.json + safetensors) as (config, params)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config = load_config(path)
    if not isinstance(config, DualEncoderConfig):
        raise ConfigError(f"{os.path.join(path, CONFIG)}: model_type is {type(config).__name__}'s, not "
                          f"'vision-text-dual-encoder'; for single towers use from_vision_text_pretrained")
    weights = read_weights(path)
    table = dual_table(config, _vision_prefix_in_dual(config, set(weights.tensors)))
    depths = {"vision": config.vision.num_hidden_layers, "text": config.text.num_hidden_layers,
              "visual_projection": 0, "text_projection": 0, "logit_scale": 0}
    shapes = _param_shapes(model.init, config)
    shapes.pop("logit_bias", None)
    params, _ = load_table(weights, table, shapes, depths)
    if config.logit_bias_init_value is not None:
        # transformers' model has no logit bias: dualenc keeps a learned one in the safetensors metadata.
        try:
            params["logit_bias"] = jnp.asarray(float(weights.metadata[LOGIT_BIAS]), jnp.float32)
        except (KeyError, ValueError):
            raise CheckpointError(f"{weights.where}: config.json has logit_bias_init_value but the weights' "
                                  f"metadata has no valid '{LOGIT_BIAS}'") from None
    return config, params


def save_pretrained(path: str | os.PathLike, config: DualEncoderConfig, params: dict, *, processor=None,
                    extra_files: Callable[[str], None] | None = None) -> str:
    """Writes a directory that transformers.VisionTextDualEncoderModel.from_pretrained loads as is.

    The write is atomic (see files.atomic_directory): `path` holds either the old or the new checkpoint,
    whatever moment the process is killed. What an existing checkpoint holds besides weights and config
    (tokenizer, preprocessor, README, subdirectories) is carried over, hard-linked where possible. A `processor` (dualenc.Processor) writes its
    tokenizer and preprocessor files into the same atomic step, so transformers' AutoProcessor loads the
    directory too; `extra_files(tmp_dir)` may add other files.
    """
    if not isinstance(config, DualEncoderConfig):
        raise ConfigError(f"save_pretrained needs a DualEncoderConfig, got {type(config).__name__}")
    tensors = {}
    flat = _flat_params(config, params)
    metadata = {LOGIT_BIAS: repr(float(flat[("logit_bias",)]))} if ("logit_bias",) in flat else {}
    for e in dual_table(config):
        value = flat[e.path]
        if "{i}" in e.hf:
            for i in range(value.shape[0]):
                tensors[e.hf.format(i=i)] = _TO_HF[e.kind](value[i])
        else:
            tensors[e.hf] = _TO_HF[e.kind](value)
    with files.atomic_directory(os.fspath(path)) as tmp:
        _carry_over(os.fspath(path), tmp)
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


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str):
    """Hard-links (or copies) what the old checkpoint holds besides weights and config: tokenizer and
    preprocessor files, a README, subdirectories such as training checkpoints. The old directory is left
    untouched until the swap, so a kill at any point loses nothing."""
    if not os.path.isdir(old):
        return
    replaced = {CONFIG, WEIGHTS, WEIGHTS_INDEX, *UNSAFE_WEIGHTS}
    for entry in os.scandir(old):
        target = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_file(follow_symlinks=False) and not (entry.name in replaced
                                                           or entry.name.endswith(".safetensors")):
            _link_or_copy(entry.path, target)


# ------------------------------------------------------------------------------------------------ single towers

_TOWER_PREFIXES = {ViTConfig: ("", "vit."), CLIPVisionConfig: ("", "vision_model."),
                   BertConfig: ("", "bert."), "roberta": ("", "roberta.")}
_ANCHORS = {ViTConfig: "embeddings.patch_embeddings.projection.weight",
            CLIPVisionConfig: "embeddings.patch_embedding.weight"}


def load_tower(path: str | os.PathLike, key: jax.Array):
    """Loads one tower from a single-model directory: (config, params, newly initialised names).

    Accepts ViTModel, ViTForImageClassification, CLIPVisionModel, CLIPModel (its vision tower), BertModel,
    BertForMaskedLM (incl. the legacy layout), RobertaModel and their task-head variants. A missing pooler is
    initialised at random; tensors outside the tower (heads, CLIP's text side) are left unused.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    config = load_config(path)
    if isinstance(config, DualEncoderConfig):
        raise ConfigError(f"{os.path.join(path, CONFIG)} is a whole dual encoder; use load_pretrained")
    weights = read_weights(path)
    names = set(weights.tensors)
    kind = type(config) if type(config) in _TOWER_PREFIXES else "roberta"
    anchor = _ANCHORS.get(type(config), "embeddings.word_embeddings.weight")
    # A whole CLIPModel keeps its vision tower under "vision_model." in every transformers version.
    candidates = ("vision_model.",) if read_json(os.path.join(path, CONFIG)).get("model_type") == "clip" \
        else _TOWER_PREFIXES[kind]
    prefix = next((p for p in candidates if p + anchor in names), None)
    if prefix is None:
        raise CheckpointError(f"{weights.where}: no {type(config).__name__} weights found "
                              f"(looked for {' or '.join(p + anchor for p in candidates)})")
    table = [Entry(prefix + e.hf, e.path, e.kind) for e in tower_table(config)]
    pooler = prefix + "pooler."
    init_fn = vit.init if isinstance(config, (ViTConfig, CLIPVisionConfig)) else bert.init
    shapes = _param_shapes(init_fn, config)
    unused = {n for n in names if not n.startswith(prefix) and not BUFFERS.search(n)} if prefix else set()
    params, absent = load_table(
        weights, table, shapes,
        {"encoder": config.num_hidden_layers, "embeddings": 0, "pooler": 0, "post_norm": 0, "pre_norm": 0},
        allowed_missing=lambda n: n.startswith(pooler), ignored=lambda n: n in unused)
    if unused:
        warnings.warn(f"{weights.where}: {len(unused)} tensor(s) outside the {type(config).__name__} tower were "
                      f"not used: {_listed(unused)}", UnusedWeightsWarning, stacklevel=3)
    new = []
    if absent:
        d = config.hidden_size
        params["pooler"] = layers.init_params(
            key, lambda normal: layers.dense_init(normal, d, d, config.initializer_range))
        new.append("pooler")
    return config, params, new


def from_vision_text_pretrained(vision_path: str | os.PathLike, text_path: str | os.PathLike, *, key: jax.Array,
                                projection_dim: int = 512, logit_scale_init_value: float = 2.6592):
    """A dual encoder from two single-tower directories, with new projections and logit_scale.

    Returns (config, params). Every newly initialised param is reported with a NewlyInitializedWarning.
    """
    kv, kt, kvp, ktp = jax.random.split(key, 4)
    vision_config, vision_params, vision_new = load_tower(vision_path, kv)
    if not isinstance(vision_config, (ViTConfig, CLIPVisionConfig)):
        raise ConfigError(f"{vision_path}: is a {type(vision_config).__name__}, not a vision tower")
    text_config, text_params, text_new = load_tower(text_path, kt)
    if isinstance(text_config, (ViTConfig, CLIPVisionConfig)):
        raise ConfigError(f"{text_path}: is a {type(text_config).__name__}, not a text tower")
    config = DualEncoderConfig(vision=vision_config, text=text_config, projection_dim=projection_dim,
                               logit_scale_init_value=logit_scale_init_value)
    params = {
        "vision": vision_params,
        "text": text_params,
        "visual_projection": model.projection_init(kvp, vision_config.hidden_size, projection_dim),
        "text_projection": model.projection_init(ktp, text_config.hidden_size, projection_dim),
        "logit_scale": jnp.asarray(logit_scale_init_value, jnp.float32),
    }
    new = [f"vision/{n}" for n in vision_new] + [f"text/{n}" for n in text_new]
    new += ["visual_projection", "text_projection", "logit_scale"]
    warnings.warn(f"newly initialised params (train them before use): {', '.join(new)}",
                  NewlyInitializedWarning, stacklevel=2)
    return config, params
