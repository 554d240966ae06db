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
  part-IIIII-of-PPPPP.json    written last: {"start", "stop", "fingerprint"}: the part is complete
  cache.json                  written last by process 0: {"fingerprint", "records", "dim", "parts": [...]}
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Any

import numpy as np

from dualenc.errors import CheckpointError
from dualenc.files import read_json, write_json_atomic

CACHE_FILE = "cache.json"


def _hash_tree(digest, tree) -> None:
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())


def source_fingerprint(source) -> str:
    """What identifies a source's data: a prepared folder's manifest, else every image (path or pixels) and
    the number of records."""
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
    digest = hashlib.sha256(b"dualenc-lit-cache-1;")
    _hash_tree(digest, params["vision"])
    digest.update(json.dumps(config.vision.to_dict() if hasattr(config.vision, "to_dict") else repr(config.vision),
                             sort_keys=True, default=str).encode())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(source_fingerprint(source).encode())
    return digest.hexdigest()


class FeatureCache:
    """Read access to a finished cache: `row(record)` is the record's features, or None for an unreadable
    image. Picklable (the arrays are memory-mapped again in each process)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = read_json(os.path.join(folder, CACHE_FILE), "LiT cache index")
        self._open()

    def _open(self):
        self.starts = [part["start"] for part in self.meta["parts"]]
        self._features, self._valid = [], []
        for part in self.meta["parts"]:
            base = os.path.join(self.folder, part["name"])
            self._features.append(np.load(base + ".npy", mmap_mode="r", allow_pickle=False))
            self._valid.append(np.load(base + ".valid.npy", mmap_mode="r", allow_pickle=False))

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


def build(root: str, params: dict, config, processor, source, *, batch_size: int = 64, workers: int = 0,
          threads: int = 8, process_index: int | None = None, process_count: int | None = None,
          progress: Any = None) -> tuple[FeatureCache, bool]:
    """The cache of `source` under `root`, computed where missing (this process's part), else reused.

    Returns (cache, computed): computed is False when every part was found complete.
    """
    import jax

    from dualenc.datasets.pipeline import PairSource

    if hasattr(source, "caption_image"):
        source = PairSource(source)
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    key = fingerprint(params, config, processor, source)
    folder = os.path.join(root, f"lit-{key[:16]}")
    done = os.path.join(folder, CACHE_FILE)
    if os.path.isfile(done):
        cache = FeatureCache(folder)
        if cache.meta.get("fingerprint") != key or len(cache) != len(source):
            raise CheckpointError(f"{done} does not describe this model and data (another fingerprint)")
        return cache, False
    os.makedirs(folder, exist_ok=True)
    n = len(source)
    start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
    name = f"part-{process_index:05d}-of-{process_count:05d}"
    computed = not _part_done(folder, name, start, stop, key)
    if computed:
        _encode_part(folder, name, start, stop, key, params, config, processor, source, batch_size=batch_size,
                     workers=workers, threads=threads, progress=progress)
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lit-cache-{key[:16]}")
    parts = [{"name": f"part-{i:05d}-of-{process_count:05d}", "start": i * n // process_count,
              "stop": (i + 1) * n // process_count} for i in range(process_count)]
    for part in parts:
        if not _part_done(folder, part["name"], part["start"], part["stop"], key):
            raise CheckpointError(f"LiT cache part {os.path.join(folder, part['name'])} is missing: with several "
                                  f"processes the cache folder must be on storage they share")
    dim = max(int(np.load(os.path.join(folder, part["name"] + ".npy"), mmap_mode="r",
                          allow_pickle=False).shape[-1]) for part in parts)
    if process_index == 0:
        write_json_atomic(done, {"fingerprint": key, "records": n, "dim": dim, "parts": parts})
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lit-cache-index-{key[:16]}")
    return FeatureCache(folder), computed


def _part_done(folder: str, name: str, start: int, stop: int, key: str) -> bool:
    path = os.path.join(folder, name + ".json")
    if not os.path.isfile(path):
        return False
    meta = read_json(path, "LiT cache part")
    return meta == {"start": start, "stop": stop, "fingerprint": key}


def _encode_part(folder, name, start, stop, key, params, config, processor, source, *, batch_size, workers,
                 threads, progress):
    """Encodes records start..stop-1 a batch at a time into memory-mapped files, then marks the part done."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dualenc.datasets.pipeline import RecordReader, _grain
    from dualenc.train.step import _pooled

    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)  # splits evenly over this process's devices
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    reader = RecordReader(source, processor)
    grain = _grain()
    ds = grain.MapDataset.range(start, stop).map(_VisionRow(reader)).batch(batch_size)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=batch_size))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    rows = stop - start
    features = valid = None
    tmp = os.path.join(folder, f"{name}.tmp-{os.getpid()}")
    written = 0
    for batch in ds:
        ok = batch.pop("_ok")
        n = len(ok)
        inputs = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) if n < batch_size else v
                  for k, v in batch.items()}
        out = np.asarray(_pooled(params["vision"], config, "vision", jax.device_put(inputs, sharding)),
                         np.float32)[:n]
        if features is None:
            features = np.lib.format.open_memmap(tmp + ".npy", "w+", np.float32, (rows, out.shape[1]))
            valid = np.lib.format.open_memmap(tmp + ".valid.npy", "w+", np.bool_, (rows,))
        features[written:written + n] = np.where(ok[:, None], out, 0)
        valid[written:written + n] = ok
        written += n
        if progress is not None:
            progress(written, rows)
    if features is None:  # an empty part
        features = np.lib.format.open_memmap(tmp + ".npy", "w+", np.float32, (0, 0))
        valid = np.lib.format.open_memmap(tmp + ".valid.npy", "w+", np.bool_, (0,))
    features.flush(), valid.flush()
    del features, valid
    os.replace(tmp + ".npy", os.path.join(folder, name + ".npy"))
    os.replace(tmp + ".valid.npy", os.path.join(folder, name + ".valid.npy"))
    write_json_atomic(os.path.join(folder, name + ".json"), {"start": start, "stop": stop, "fingerprint": key})


class _VisionRow:
    """Record index -> its vision inputs and "_ok" (False, with a black stand-in image, when unusable)."""

    def __init__(self, reader):
        self.reader, self._blank = reader, None

    def __call__(self, record: int) -> dict:
        from dualenc.datasets.pipeline import Unusable

        try:
            return {**self.reader.vision(self.reader.read(record)[0]), "_ok": np.bool_(True)}
        except Unusable:
            if self._blank is None:  # the processor's output for a black image: every output has its shape
                self._blank = self.reader.vision(np.zeros((64, 64, 3), np.uint8))
            return {**self._blank, "_ok": np.bool_(False)}
