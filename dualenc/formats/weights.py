"""Weights on disk: a checkpoint directory's tensors read strictly, loaded through a key table, carried over.

Only safetensors is read; pickled formats (pytorch_model.bin, flax_model.msgpack, ...) are never opened.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Callable, Iterable, NamedTuple

import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError
from dualenc.files import read_json
from dualenc.params import check_tree, listed  # noqa: F401  (listed: formats name tensors with it)
from dualenc.tables import TO_HF, TO_PARAM, Entry

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "flax_model.msgpack",
                  "flax_model.msgpack.index.json", "tf_model.h5", "model.ckpt.index")
# Non-persistent buffers that older transformers versions wrote into checkpoints; they hold no weights.
BUFFERS = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")


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


class Weights(NamedTuple):
    tensors: dict[str, np.ndarray]
    source: dict[str, str]  # tensor name -> file it came from
    where: str  # the file (or index) to name in errors
    metadata: dict[str, str]  # safetensors metadata (of the first shard)


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
                raise CheckpointError(f"{path}: holds tensors the index does not assign to it: {listed(strays)}")
            absent = wanted - set(shard_tensors)
            if absent:
                raise CheckpointError(f"{path}: lacks tensors the index assigns to it: {listed(absent)}")
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


def _depth(shapes, e: Entry) -> int:
    return _get(shapes, e.path).shape[0] if "{i}" in e.hf else 0


def load_table(weights: Weights, table: list[Entry], shapes, *,
               allowed_missing: Callable[[str], bool] = lambda name: False,
               ignored: Callable[[str], bool] = lambda name: False) -> tuple[dict, set[str]]:
    """Loads `weights` into a params tree shaped like `shapes` through `table`, strictly.

    shapes: the params' abstract shapes (jax.eval_shape of the init); layers are stacked on axis 0.
    Returns (params as numpy arrays, layers stacked; names of allowed-missing tensors that were absent).
    Raises CheckpointError listing
    missing, unexpected and mis-shaped tensors.
    """
    expected = {}
    for e in table:
        expected.update(_expand([e], _depth(shapes, e)))
    available = set(weights.tensors)
    absent_ok = {n for n in expected if n not in available and allowed_missing(n)}
    want, wrong_dtype = {}, []
    for name, (e, i) in expected.items():
        if name in absent_ok:
            continue
        param_shape = _get(shapes, e.path).shape[(0 if i is None else 1):]
        want[name] = tuple(TO_HF[e.kind](np.zeros(param_shape, np.uint8)).shape)
        tensor = weights.tensors.get(name)
        if tensor is not None and tuple(tensor.shape) == want[name] and tensor.dtype not in files.FLOATING:
            wrong_dtype.append(f"{name} of dtype {tensor.dtype} (expected floating point)")
    have = {n: tuple(a.shape) for n, a in weights.tensors.items()
            if n in want or not (BUFFERS.search(n) or ignored(n))}
    check_tree(want, have, f"{weights.where} does not match its config", noun="tensor", error=CheckpointError,
               also_wrong=wrong_dtype)
    params: dict = {}
    for e in table:
        leaf = _get(shapes, e.path)
        if "{i}" in e.hf:
            names = [e.hf.format(i=i) for i in range(_depth(shapes, e))]
            if any(n in absent_ok for n in names):
                continue
            value = np.stack([TO_PARAM[e.kind](weights.tensors[n]) for n in names]) if names else \
                np.zeros(leaf.shape, np.float32)
        else:
            if e.hf in absent_ok:
                continue
            try:
                value = TO_PARAM[e.kind](weights.tensors[e.hf])
            except CheckpointError as err:
                raise CheckpointError(f"{weights.where}: {e.hf}: {err}") from None
        _set(params, e.path, np.asarray(value, dtype=leaf.dtype))
    return params, absent_ok


def dump_table(table: list[Entry], flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors a table names, from flat {param path: stacked array}: the inverse of load_table."""
    tensors = {}
    for e in table:
        value = flat[e.path]
        if "{i}" in e.hf:
            for i in range(value.shape[0]):
                tensors[e.hf.format(i=i)] = TO_HF[e.kind](value[i])
        else:
            tensors[e.hf] = TO_HF[e.kind](value)
    return tensors


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(old: str, new: str):
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
