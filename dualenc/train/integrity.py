"""What a training checkpoint records so that a damaged one is refused when it is restored: the size of every
file written, a checksum of every array saved, and that its numbers are finite.

An array's checksum depends only on its dtype, shape and values, never on how it is sharded: each element's
bits pass through a bijective mix keyed by the element's global (row-major) index, and the mixed words are
summed modulo 2**32, in two independent lanes (64 bits). Integer sums are exact in any order, so each shard is
summed on its own device and the shards' sums added on the host (across processes, one gather): the same array
gives the same checksum whatever the mesh or the number of processes that saved or restored it. Changing any
one element always changes the checksum (each term is a bijection of that element's bits); other damage goes
unseen with a chance of about 2**-64.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, ConfigError

META_FILE = "state.json"

_LANES = ((0x9E3779B1, 0x85EBCA77, 0x2545F491), (0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))  # odd multipliers, seeds
_ON_HOST = 1 << 16  # elements: smaller shards are summed by numpy (no compile per shape), larger ones by XLA


def _fmix(xp, h):
    """murmur3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(xp, x):
    """The array's bits as uint32 words, one per element (two, trailing, for 8-byte elements)."""
    if x.dtype == xp.bool_:
        return x.astype(xp.uint32)
    size = x.dtype.itemsize
    if xp is np:
        words = np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16}.get(size, np.uint32))
        return words.reshape(x.shape + (2,)) if size == 8 else words.astype(np.uint32, copy=False)
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)


def _lanes(xp, x, start, strides: tuple[int, ...]):
    """(3,) uint32: the two checksum lanes of one shard (its elements' global index: start + local index, dotted
    with the whole array's row-major strides), and 1 when every element is finite. xp: numpy or jax.numpy."""
    words = _words(xp, x)
    index = xp.zeros((), xp.uint32)
    for axis, stride in enumerate(strides):
        where = [1] * words.ndim
        where[axis] = words.shape[axis]
        position = xp.arange(words.shape[axis], dtype=xp.uint32) + (start[axis] if axis < x.ndim else xp.uint32(0))
        index = index + position.reshape(where) * xp.uint32(stride)
    lanes = [xp.sum(_fmix(xp, words * xp.uint32(k) + _fmix(xp, index ^ xp.uint32(seed)) + xp.uint32(add)),
                    dtype=xp.uint32) for k, seed, add in _LANES]
    finite = xp.all(xp.isfinite(x)) if xp.issubdtype(x.dtype, xp.inexact) else True
    return xp.stack([*lanes, xp.asarray(finite).astype(xp.uint32)])


_digest = jax.jit(functools.partial(_lanes, jnp), static_argnums=2)


def _parts(leaf) -> list[tuple[object, tuple[int, ...]]]:
    """(data, global start) of each part of a leaf this process counts: the first replica of each shard of an
    array spread over processes; an array local to each process (numpy, or on this process's devices), which is
    the same on every process, only on process 0."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return [(s.data, tuple(i.start or 0 for i in s.index)) for s in leaf.addressable_shards if s.replica_id == 0]
    if jax.process_index() != 0:
        return []
    if isinstance(leaf, jax.Array):
        return [(s.data, tuple(i.start or 0 for i in s.index)) for s in leaf.addressable_shards if s.replica_id == 0]
    return [(np.asarray(leaf), (0,) * np.ndim(leaf))]


def checksums(leaves: list[tuple[str, object]]) -> tuple[dict[str, str], list[str]]:
    """({name: checksum, 16 hex digits}, [names of the leaves holding NaN or inf]) of named arrays (jax arrays
    on any sharding, or numpy). Under jax.distributed every process must call it with the same leaves: each
    computes its shards, then the parts are gathered (one collective)."""
    partials = []
    for _, leaf in leaves:
        digests = []
        for data, start in _parts(leaf):  # each shard on its own device: no collective is involved
            shape = tuple(np.shape(leaf)) + ((2,) if data.dtype.itemsize == 8 else ())
            strides = tuple(int(np.prod(shape[axis + 1:], dtype=object)) % 2**32 for axis in range(len(shape)))
            start = np.asarray(start, np.uint32)
            if np.size(data) <= _ON_HOST:
                with np.errstate(over="ignore"):
                    digests.append(_lanes(np, np.asarray(data), start, strides))
            else:
                digests.append(_digest(data, start, strides))
        partials.append(digests)
    table = np.zeros((len(leaves), 3), np.uint64)
    for row, parts in zip(table, partials):
        row[2] = 1
        for part in parts:
            lanes = np.asarray(part).astype(np.uint64)
            row[:2] += lanes[:2]
            row[2] &= lanes[2]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(table.astype(np.uint32))).astype(np.uint64)
        table = np.concatenate([gathered[..., :2].sum(axis=0), gathered[..., 2:].min(axis=0)], axis=-1)
    table[:, :2] %= 2**32
    names = [name for name, _ in leaves]
    return ({name: f"{int(hi):08x}{int(lo):08x}" for name, (hi, lo, _) in zip(names, table)},
            [name for name, (_, _, finite) in zip(names, table) if not finite])


def file_sizes(folder: str, skip: Iterable[str] = ()) -> dict[str, int]:
    """{path relative to folder ("/"-separated): size} of every regular file under folder, but `skip`."""
    skip, found = set(skip), {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder).replace(os.sep, "/")
            if relative not in skip and os.path.isfile(full):
                found[relative] = os.path.getsize(full)
    return found


def missing_or_resized(folder: str, sizes: dict[str, int]) -> str | None:
    """What is wrong with the files `sizes` lists (relative path: size written), or None: the first missing
    file, else the first of another size (e.g. cut short), and how many more are."""
    missing, resized = [], []
    for relative, size in sizes.items():
        full = os.path.join(folder, *relative.split("/"))
        if not os.path.isfile(full):
            missing.append(relative)
        elif os.path.getsize(full) != size:
            resized.append(f"{relative} is {os.path.getsize(full):,} bytes, {size:,} written")
    if missing:
        return f"files missing: {missing[0]}" + (f" and {len(missing) - 1} more of its {len(sizes)}"
                                                 if len(missing) > 1 else "")
    if resized:
        return f"files changed size: {resized[0]}" + (f" and {len(resized) - 1} more" if len(resized) > 1 else "")
    return None


def compare(saved: dict[str, str], restored: dict[str, str]) -> str | None:
    """What differs between the checksums recorded at save and those of the restored arrays, or None."""
    differ = sorted(name for name in saved if restored.get(name) != saved[name])
    if not differ:
        return None
    return (f"{len(differ)} of its {len(saved)} arrays differ from what was saved (their checksums), e.g. "
            f"{', '.join(differ[:3])}")


def _count(meta: dict, key: str, least: int = 0) -> str | None:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        return f'"{key}" must be an integer of at least {least}, got {_shown(value)}'
    return None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _relative(name) -> bool:
    parts = name.split("/") if isinstance(name, str) else []
    return bool(parts) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def meta_problem(meta: dict, step: int | None, formats: tuple[str, ...]) -> str | None:
    """What is wrong with the keys of a checkpoint's state.json that restoring reads, or None: "step" (the
    folder's `step` when known), and when present "steps", "data_step", "format", "holds_frozen", "settings",
    "checksums" ({name: 16 hex digits}) and "files" ({relative path: size})."""
    if "step" not in meta:
        return 'it records no "step"'
    problem = _count(meta, "step")
    if problem is None and step is not None and meta["step"] != step:
        problem = f'"step" is {meta["step"]}, in the folder of step {step}'
    for key in ("steps", "data_step"):
        if problem is None and key in meta:
            problem = _count(meta, key, meta["step"] if key == "steps" else 0)
    if problem is None and "format" in meta and meta["format"] not in formats:
        problem = f'"format" must be one of {formats}, got {_shown(meta["format"])}'
    if problem is None and not isinstance(meta.get("holds_frozen", False), bool):
        problem = f'"holds_frozen" must be true or false, got {_shown(meta["holds_frozen"])}'
    if problem is None and not isinstance(meta.get("settings", {}), dict):
        problem = f'"settings" must be an object, got {_shown(meta["settings"])}'
    sums, sizes = meta.get("checksums", {}), meta.get("files", {})
    if problem is None and not (isinstance(sums, dict) and all(
            isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v) for v in sums.values())):
        problem = f'"checksums" must map names to 16 hex digits, got {_shown(sums)}'
    if problem is None and not (isinstance(sizes, dict) and all(
            _relative(k) and type(v) is int and v >= 0 for k, v in sizes.items())):
        problem = f'"files" must map relative paths inside the folder to sizes, got {_shown(sizes)}'
    return problem


def meta_of(path: str, step: int | None, formats: tuple[str, ...]) -> tuple[dict, str | None]:
    """(a checkpoint's state.json, what is wrong with it or None); `step`: the one its folder names."""
    name = os.path.join(path, META_FILE)
    try:
        meta = files.read_json(name, "training checkpoint metadata")
    except FileNotFoundError:
        return {}, f"its {META_FILE} is missing"
    except (OSError, ConfigError) as e:
        return {}, f"its {META_FILE} {str(e).split(name, 1)[-1].strip()}"  # the message without the path
    problem = meta_problem(meta, step, formats)
    return meta, None if problem is None else f"in its {META_FILE}, {problem}"


def damaged(path: str, step: int | None, problem: str, earlier: list[tuple[int, str]],
            formats: tuple[str, ...]) -> CheckpointError:
    """The error for the damaged checkpoint at `path`, naming the newest of `earlier` ((step, path), oldest
    first) whose state.json and files pass the checks, to resume from."""
    directory = os.path.dirname(os.path.normpath(path)) or "."
    for previous_step, previous in reversed(earlier):
        meta, wrong = meta_of(previous, previous_step, formats)
        if wrong is None and missing_or_resized(previous, meta.get("files", {})) is None:
            remedy = (f"the newest checkpoint before it that passes these checks is step {previous_step} "
                      f"({previous}): move {path} out of {directory} (or delete it) to resume from step "
                      f"{previous_step}")
            break
    else:
        remedy = f"no earlier checkpoint in {directory} passes these checks: start the run again (after moving " \
                 f"{directory} aside)"
    where = f"the training checkpoint {path}" + (f" (step {step})" if step is not None else "")
    return CheckpointError(f"{where} is damaged: {' '.join(problem.split())}; {remedy}")
