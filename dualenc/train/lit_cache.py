"""The LiT cache on disk: a locked vision tower's pooled outputs for every record of a source, streamed.

Features are computed a batch at a time (decoded by grain, split over this process's devices) and written
straight into memory-mapped .npy files, so memory does not grow with the dataset. Process i of P encodes
records i*N//P .. (i+1)*N//P - 1 into its own part; the parts and cache.json live in one folder named by a
fingerprint of the tower's weights and config, the image preprocessing and the data source, so a resumed or
repeated run (on any number of processes) finds the finished cache and computes nothing. Under several
processes the folder must be on storage they share.

Layout of `<root>/lit-<fingerprint[:16]>/`:
  part-IIIII-of-PPPPP.npy     float32 (rows, dim) features of records start..stop-1
  part-IIIII-of-PPPPP.valid.npy  bool (rows,): False where the image could not be read (the pipeline skips it)
  part-IIIII-of-PPPPP.json    written last: {"start", "stop", "fingerprint", "dim", "sha256": {"features",
                              "valid"}}: the part is complete; sha256 of each file's array data, hashed as written
  cache.json                  written last by process 0: {"fingerprint", "records", "dim", "parts": [{"name",
                              "start", "stop", "sha256"}]}

Every open checks cache.json against the layout (part i of P holds records i*N//P .. (i+1)*N//P - 1) and each
part's files: plain .npy files in the folder (never unpickled) of exactly the dtype and shape it gives. When
build() finds a cache again (a repeated or resumed run), it also reads every part once (a full read of the
cache, in each process) to check its sha256 and that every feature is finite. Any damage is a CheckpointError
naming the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import stat
from tokenize import TokenError
from typing import Any

import numpy as np

from dualenc.errors import CheckpointError
from dualenc.files import read_json, write_json_atomic

CACHE_FILE = "cache.json"
_FORMAT = b"dualenc-lit-cache-2;"  # in the fingerprint: a cache of another format is another folder
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 16 << 20  # bytes hashed at a time when a part is verified
_REMEDY = "delete {} to compute the cache again"


def _hash_tree(digest, tree) -> None:
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())


def source_fingerprint(source) -> str:
    """What identifies a source's data: a prepared folder's manifest, else every image (path or pixels) and
    the number of records; a Mixture's, its sources' and weights' (data_fingerprint)."""
    from dualenc.data.mixing import Mixture

    if isinstance(source, Mixture):
        from dualenc.data.pipeline import data_fingerprint

        return data_fingerprint(source)
    digest = hashlib.sha256(f"records:{len(source)};".encode())
    manifest = getattr(source, "manifest", None)
    if manifest is not None:
        digest.update(json.dumps(manifest, sort_keys=True).encode())
        digest.update(str(getattr(source, "image_root", None)).encode())
    else:
        for image in getattr(source, "images"):
            if isinstance(image, (str, os.PathLike)):
                digest.update(b"path:" + os.fsencode(os.path.abspath(image)) + b";")
            else:
                array = np.ascontiguousarray(image)
                digest.update(f"array:{array.dtype}:{array.shape};".encode() + array.tobytes())
    return digest.hexdigest()


def fingerprint(params: dict, config, processor, source) -> str:
    """sha256 of the vision tower's weights and config, the image processor's settings and the data."""
    image_processor = getattr(processor, "image_processor", processor)
    digest = hashlib.sha256(_FORMAT)
    _hash_tree(digest, params["vision"])
    digest.update(json.dumps(config.vision.to_dict() if hasattr(config.vision, "to_dict") else repr(config.vision),
                             sort_keys=True, default=str).encode())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(source_fingerprint(source).encode())
    return digest.hexdigest()


def layout(records: int, count: int) -> list[dict]:
    """The parts of a cache of `records` rows built by `count` processes: {"name", "start", "stop"} each."""
    return [{"name": f"part-{i:05d}-of-{count:05d}", "start": i * records // count,
             "stop": (i + 1) * records // count} for i in range(count)]


class FeatureCache:
    """Read access to a finished cache: `row(record)` is the record's features, or None for an unreadable
    image. Picklable (the arrays are memory-mapped again in each process, checked but not verified again).

    Args:
      folder: the cache folder (holding cache.json).
      fingerprint, records: what cache.json must say (checked when given).
      verify: also read every part to check its sha256 and that its features are finite (see verify()).
    """

    def __init__(self, folder: str, *, fingerprint: str | None = None, records: int | None = None,
                 verify: bool = False):
        self.folder = folder
        self.meta = read_json(os.path.join(folder, CACHE_FILE), "LiT cache index")
        _check_index(self.meta, os.path.join(folder, CACHE_FILE), fingerprint, records)
        self._open()
        if verify:
            self.verify()

    def _open(self):
        self.starts = [part["start"] for part in self.meta["parts"]]
        self._features, self._valid = [], []
        for part in self.meta["parts"]:
            rows = part["stop"] - part["start"]
            base = os.path.join(self.folder, part["name"])
            self._features.append(_open_npy(base + ".npy", np.dtype("<f4"), (rows, self.dim)))
            self._valid.append(_open_npy(base + ".valid.npy", np.dtype("|b1"), (rows,)))

    def verify(self) -> None:
        """Reads every part to check its data's sha256 against cache.json and that every feature is finite; a
        damaged part is a CheckpointError naming its file."""
        for part, features, valid in zip(self.meta["parts"], self._features, self._valid):
            _verify(self.folder, part, features, valid)

    def __getstate__(self):
        return {"folder": self.folder, "meta": self.meta}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.meta["records"])

    def row(self, record: int) -> np.ndarray | None:
        part = bisect.bisect_right(self.starts, record) - 1
        offset = record - self.starts[part]
        if not self._valid[part][offset]:
            return None
        return np.array(self._features[part][offset], np.float32)


def _verify(folder: str, part: dict, features: np.ndarray, valid: np.ndarray) -> None:
    """One part's data against its recorded sha256 ({"features", "valid"}), its features finite; a full read."""
    base = os.path.join(folder, part["name"])
    for what, array, file in (("features", features, base + ".npy"), ("valid", valid, base + ".valid.npy")):
        digest = hashlib.sha256()
        step = max(1, _CHUNK // max(1, array[:1].nbytes))
        for at in range(0, len(array), step):
            chunk = np.ascontiguousarray(array[at:at + step])
            if what == "features" and not np.isfinite(chunk).all():
                raise CheckpointError(f"LiT cache part {file} holds non-finite features (rows from "
                                      f"{part['start'] + at}): {_REMEDY.format(folder)}")
            digest.update(chunk.data)
        if digest.hexdigest() != part["sha256"][what]:
            raise CheckpointError(f"LiT cache part {file} does not match the sha256 recorded for it (damaged or "
                                  f"changed): {_REMEDY.format(folder)}")


def _check_index(meta: dict, path: str, fingerprint: str | None, records: int | None) -> None:
    """cache.json's fields, and its parts against the layout of as many parts: a CheckpointError naming it."""
    remedy = _REMEDY.format(os.path.dirname(path))
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} does not describe this model and data (another fingerprint)")
    n, dim, parts = meta.get("records"), meta.get("dim"), meta.get("parts")
    if type(n) is not int or n < 0 or type(dim) is not int or dim < (1 if n else 0) or not isinstance(parts, list) \
            or not parts:
        raise CheckpointError(f"{path}: needs a record count, a width (dim) and a list of parts; {remedy}")
    if records is not None and n != records:
        raise CheckpointError(f"{path} holds {n} records, the data has {records}: {remedy}")
    for i, (part, want) in enumerate(zip(parts, layout(n, len(parts)))):
        sha = part.get("sha256") if isinstance(part, dict) else None
        if not isinstance(sha, dict) or set(part) != {*want, "sha256"} \
                or not all(type(part[k]) is type(v) and part[k] == v for k, v in want.items()) \
                or set(sha) != {"features", "valid"} \
                or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in sha.values()):
            raise CheckpointError(f"{path}: part {i} is {_short(part)}, expected {want} and the sha256 of its "
                                  f"features and valid flags: {remedy}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _open_npy(path: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A .npy file of the cache, memory-mapped read-only, once it is a regular file in its folder whose header
    says exactly `dtype` and `shape` (a part of no rows may also be (0, 0)) and whose size fits them."""
    folder = os.path.dirname(path)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise CheckpointError(f"LiT cache file {path} resolves to {os.path.realpath(path)}, outside its folder: "
                              f"{_REMEDY.format(folder)}")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CheckpointError(f"LiT cache file {path} is not a regular file: {_REMEDY.format(folder)}")
            size = os.fstat(f.fileno()).st_size
            try:
                version = np.lib.format.read_magic(f)
                header = readers[version](f) if version in readers else None
            except (ValueError, TypeError, SyntaxError, RecursionError, EOFError, OverflowError, TokenError):
                header = None  # numpy's header parser fails in these ways on bytes that are not a header
            offset = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"LiT cache file not found: {path} ({_REMEDY.format(folder)})") from None
    except IsADirectoryError:
        raise CheckpointError(f"LiT cache file {path} is a directory: {_REMEDY.format(folder)}") from None
    if header is None:
        raise CheckpointError(f"LiT cache file {path} is not a .npy array file (its header cannot be read): "
                              f"{_REMEDY.format(folder)}")
    found, fortran, found_dtype = header
    empty = len(shape) == 2 and shape[0] == 0 and tuple(found) == (0, 0)  # as an empty part is written
    if found_dtype != dtype or fortran or (tuple(found) != shape and not empty):
        raise CheckpointError(f"LiT cache file {path} holds a {found_dtype} array of shape {_short(found)}"
                              f"{' (Fortran order)' if fortran else ''}, expected {dtype} of shape {shape}: "
                              f"{_REMEDY.format(folder)}")
    nbytes = math.prod(found) * dtype.itemsize
    if size != offset + nbytes:
        raise CheckpointError(f"LiT cache file {path} is {size} bytes, its header says {offset + nbytes}: "
                              f"{_REMEDY.format(folder)}")
    if not nbytes:
        return np.zeros(found, dtype)
    return np.memmap(path, dtype, "r", offset, tuple(found))


def build(root: str, params: dict, config, processor, source, *, batch_size: int = 64, workers: int = 0,
          threads: int = 8, process_index: int | None = None, process_count: int | None = None,
          progress: Any = None) -> tuple[FeatureCache, bool]:
    """The cache of `source` under `root`, computed where missing (this process's part), else reused.

    A cache found finished is verified (FeatureCache.verify: a full read) before use; a part this process
    finds finished by an earlier, interrupted run is verified too. Damage is a CheckpointError naming the file.

    Returns (cache, computed): computed is False when every part was found complete.
    """
    import jax

    from dualenc.data.pipeline import PairSource

    if hasattr(source, "caption_image"):
        source = PairSource(source)
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    key = fingerprint(params, config, processor, source)
    folder = os.path.join(root, f"lit-{key[:16]}")
    n = len(source)
    if os.path.isfile(os.path.join(folder, CACHE_FILE)):
        return FeatureCache(folder, fingerprint=key, records=n, verify=True), False
    os.makedirs(folder, exist_ok=True)
    mine = layout(n, process_count)[process_index]
    found = _part_meta(folder, mine, key)
    if found is None:
        _encode_part(folder, mine["name"], mine["start"], mine["stop"], key, params, config, processor, source,
                     batch_size=batch_size, workers=workers, threads=threads, progress=progress)
    else:  # finished by an earlier run that stopped before cache.json
        base, rows = os.path.join(folder, mine["name"]), mine["stop"] - mine["start"]
        _verify(folder, {**mine, "sha256": found["sha256"]}, _open_npy(base + ".npy", np.dtype("<f4"),
                                                                       (rows, found["dim"])),
                _open_npy(base + ".valid.npy", np.dtype("|b1"), (rows,)))
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lit-cache-{key[:16]}")
    if process_index == 0:
        write_json_atomic(os.path.join(folder, CACHE_FILE), _index(folder, key, n, process_count))
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lit-cache-index-{key[:16]}")
    return FeatureCache(folder, fingerprint=key, records=n), found is None


def _index(folder: str, key: str, records: int, count: int) -> dict:
    """cache.json's content, from the parts' own JSON files (every part must be complete)."""
    parts, dim = [], 0
    for part in layout(records, count):
        meta = _part_meta(folder, part, key)
        if meta is None:
            raise CheckpointError(f"LiT cache part {os.path.join(folder, part['name'])} is missing: with several "
                                  f"processes the cache folder must be on storage they share")
        parts.append({**part, "sha256": meta["sha256"]})
        dim = max(dim, meta["dim"])
    return {"fingerprint": key, "records": records, "dim": dim, "parts": parts}


def _part_meta(folder: str, part: dict, key: str) -> dict | None:
    """A part's JSON when it says the part is complete for these records and fingerprint, else None."""
    path = os.path.join(folder, part["name"] + ".json")
    if not os.path.isfile(path):
        return None
    meta = read_json(path, "LiT cache part")
    if {k: meta.get(k) for k in ("start", "stop", "fingerprint")} != {**{k: part[k] for k in ("start", "stop")},
                                                                       "fingerprint": key}:
        return None
    sha, dim = meta.get("sha256"), meta.get("dim")
    if not isinstance(sha, dict) or set(sha) != {"features", "valid"} or type(dim) is not int or dim < 0 \
            or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in sha.values()):
        raise CheckpointError(f"LiT cache part {path} is damaged (its dim or sha256): {_REMEDY.format(folder)}")
    return meta


class _PartWriter:
    """One part written in order into memory-mapped .npy files under temporary names, its data hashed as it is
    written; finish() renames them into place and writes the part's JSON last."""

    def __init__(self, folder: str, part: dict, key: str):
        self.folder, self.part, self.key = folder, part, key
        self.tmp = os.path.join(folder, f"{part['name']}.tmp-{os.getpid()}")
        self.rows, self.written = part["stop"] - part["start"], 0
        self.features = self.valid = None
        self.digests = {"features": hashlib.sha256(), "valid": hashlib.sha256()}

    def write(self, features: np.ndarray, ok: np.ndarray) -> None:
        """The next rows: (n, dim) features and (n,) flags (False: the image could not be read; zeros kept)."""
        ok = np.ascontiguousarray(ok, np.bool_)
        features = np.where(ok[:, None], np.asarray(features, "<f4"), np.float32(0)).astype("<f4", copy=False)
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            record = self.part["start"] + self.written + int(np.flatnonzero(~finite)[0])
            raise CheckpointError(f"LiT cache part {os.path.join(self.folder, self.part['name'])}: the vision "
                                  f"tower's features of record {record} are not finite (check its weights)")
        if self.features is None:
            self.features = np.lib.format.open_memmap(self.tmp + ".npy", "w+", "<f4", (self.rows, features.shape[1]))
            self.valid = np.lib.format.open_memmap(self.tmp + ".valid.npy", "w+", np.bool_, (self.rows,))
        n = len(ok)
        self.features[self.written:self.written + n] = features
        self.valid[self.written:self.written + n] = ok
        self.digests["features"].update(features.data)
        self.digests["valid"].update(ok.data)
        self.written += n

    def finish(self) -> dict:
        if self.written != self.rows:
            raise CheckpointError(f"LiT cache part {self.part['name']}: {self.written} rows written, {self.rows} "
                                  f"expected")
        if self.features is None:  # an empty part
            self.features = np.lib.format.open_memmap(self.tmp + ".npy", "w+", "<f4", (0, 0))
            self.valid = np.lib.format.open_memmap(self.tmp + ".valid.npy", "w+", np.bool_, (0,))
        dim = int(self.features.shape[1])
        self.features.flush(), self.valid.flush()
        self.features = self.valid = None
        base = os.path.join(self.folder, self.part["name"])
        os.replace(self.tmp + ".npy", base + ".npy")
        os.replace(self.tmp + ".valid.npy", base + ".valid.npy")
        meta = {"start": self.part["start"], "stop": self.part["stop"], "fingerprint": self.key, "dim": dim,
                "sha256": {k: d.hexdigest() for k, d in self.digests.items()}}
        write_json_atomic(base + ".json", meta)
        return meta


def _encode_part(folder, name, start, stop, key, params, config, processor, source, *, batch_size, workers,
                 threads, progress):
    """Encodes records start..stop-1 a batch at a time into memory-mapped files, then marks the part done."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dualenc.data.pipeline import RecordReader, grain_module, exit_with_parent
    from dualenc.train.step import pooled

    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)  # splits evenly over this process's devices
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    reader = RecordReader(source, processor)
    grain = grain_module()
    ds = grain.MapDataset.range(start, stop).map(_VisionRow(reader)).batch(batch_size)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=batch_size))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=exit_with_parent)
    writer = _PartWriter(folder, {"name": name, "start": start, "stop": stop}, key)
    for batch in ds:
        ok = batch.pop("_ok")
        n = len(ok)
        inputs = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) if n < batch_size else v
                  for k, v in batch.items()}
        out = np.asarray(pooled(params["vision"], config, "vision", jax.device_put(inputs, sharding)),
                         np.float32)[:n]
        writer.write(out, ok)
        if progress is not None:
            progress(writer.written, writer.rows)
    writer.finish()


class _VisionRow:
    """Record index -> its vision inputs and "_ok" (False, with a black stand-in image, when unusable)."""

    def __init__(self, reader):
        self.reader, self._blank = reader, None

    def __call__(self, record: int) -> dict:
        from dualenc.data.pipeline import Unusable

        try:
            return {**self.reader.vision(self.reader.read(record)[0]), "_ok": np.bool_(True)}
        except Unusable:
            if self._blank is None:  # the processor's output for a black image: every output has its shape
                self._blank = self.reader.vision(np.zeros((64, 64, 3), np.uint8))
            return {**self._blank, "_ok": np.bool_(False)}
