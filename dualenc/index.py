"""Embedding indexes: a streaming writer, a memory-mapped reader, exact top-k search (or approximate, through
dualenc.ann), and the merge of shard indexes into one.

An index is a safetensors file NAME.safetensors holding one float32 tensor "embeddings" (count, dims), its names
in a sidecar NAME.names.jsonl (one JSON string per line) and, optionally, an approximate-search index beside it
(NAME.faiss and NAME.faiss.json, written by dualenc.ann.build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import struct
from typing import Iterable, Iterator, Sequence

import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, InputError

TENSOR = "embeddings"
SUFFIX = ".safetensors"
# search(ann=None) uses the ANN index from this many rows on, where one was built: below it exact search is
# fast enough beside loading a model (benchmarks/README.md, "Embedding search"), and exact.
ANN_MIN_ROWS = 200_000
ANN_MIN_RECALL = 0.9  # nor below this recall@10: rows without structure (random vectors) defeat the graph
_CHUNK_BYTES = 64 << 20  # the most of an index (and of its scores) read or computed at once
_HEADER_SLACK = 64


def names_file(path: str) -> str:
    """The sidecar file of an index's names: photos.safetensors -> photos.names.jsonl."""
    return _stem(path) + ".names.jsonl"


def _stem(path: str) -> str:
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise InputError(f"an embedding index must be a {SUFFIX} file, got {path}")
    return path[:-len(SUFFIX)]


def model_fingerprint(params) -> str:
    """SHA-256 of a model's params (every leaf's path, dtype, shape and bytes): the same weights give the same
    fingerprint whatever directory or format they were loaded from."""
    import jax

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


def check_model(index: "EmbeddingIndex", params, *, name: str | None = None) -> bool:
    """Checks that `params` (a model's params, or their model_fingerprint) are the model that embedded the index:
    True when the index records that model's fingerprint (model_sha256, as `dualenc embed` writes it), False when
    it records none; another model's fingerprint is an InputError naming both models (`name`: how to call the
    one given) and the index file."""
    recorded = index.metadata.get("model_sha256")
    if recorded is None:
        return False
    given = params if isinstance(params, str) else model_fingerprint(params)
    if given != recorded:
        raise InputError(f"{index.path} was embedded by another model ({index.metadata.get('model', 'unnamed')}, "
                         f"model_sha256 {recorded[:16]}...) than {name or 'the one given'} (model_sha256 "
                         f"{given[:16]}...)")
    return True


# ------------------------------------------------------------------------------------------------ writing

class IndexWriter:
    """Writes an index batch by batch, holding one batch at a time.

    Rows go straight to a temporary file beside `path`, behind a slot kept for the safetensors header, names
    to a temporary sidecar; close() writes the header (count and checksums) into its slot and moves both files
    into place with os.replace (the names first). On an error, or abort(), both temporary files are removed and
    an existing index at `path` is left as it was. Use it as a context manager:

        with IndexWriter("photos.safetensors", dims=512, kind="image") as writer:
            for names, embeds in batches:
                writer.add(embeds, names)

    Args:
      path: the .safetensors file to write.
      dims: the embeddings' width.
      kind: what the rows embed ("image" or "text").
      metadata: more string fields for the header (the model, a shard's place...).
    """

    def __init__(self, path: str | os.PathLike, dims: int, kind: str, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self.names_path = names_file(self.path)
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise InputError(f"dims must be a positive integer, got {dims!r}")
        extra = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise InputError("metadata must map strings to strings")
        self.dims, self.count = dims, 0
        self._metadata = {"format": "pt", **extra, "kind": kind, "names_file": os.path.basename(self.names_path)}
        self._sha, self._names_sha = hashlib.sha256(), hashlib.sha256()
        self._slot = _round8(len(self._header(10 ** 15, "0" * 64, "0" * 64)) + _HEADER_SLACK)
        directory, token = os.path.dirname(os.path.abspath(self.path)), secrets.token_hex(4)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot write {self.path}: the folder {directory} does not exist")
        self._tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{token}.tmp")
        self._tmp_names = os.path.join(directory, f".{os.path.basename(self.names_path)}.{token}.tmp")
        self._data = self._names = None
        try:
            self._data = open(self._tmp, "xb")
            self._names = open(self._tmp_names, "xb")
            self._data.write(bytes(8 + self._slot))
        except BaseException:
            self.abort()
            raise

    def _header(self, count: int, sha: str, names_sha: str) -> bytes:
        metadata = {**self._metadata, "count": str(count), "embeddings_sha256": sha, "names_sha256": names_sha}
        header = {"__metadata__": metadata,
                  TENSOR: {"dtype": "F32", "shape": [count, self.dims], "data_offsets": [0, count * self.dims * 4]}}
        return json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")

    def add(self, embeds, names: Sequence[str]) -> None:
        """Appends rows: embeds (n, dims), written as float32, and their n names."""
        if self._data is None:
            raise InputError(f"{self.path}: the writer is closed")
        embeds = np.asarray(embeds)
        if embeds.ndim != 2 or embeds.shape[1] != self.dims:
            raise InputError(f"embeddings must be (n, {self.dims}), got shape {embeds.shape}")
        names = list(names)
        if len(names) != len(embeds):
            raise InputError(f"{len(names)} names for {len(embeds)} embeddings")
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise InputError(f"names must be strings, got {type(bad).__name__}")
        rows = memoryview(np.ascontiguousarray(embeds, "<f4")).cast("B")
        self._data.write(rows)
        self._sha.update(rows)
        text = "".join(json.dumps(n) + "\n" for n in names).encode("utf-8")
        self._names.write(text)
        self._names_sha.update(text)
        self.count += len(names)

    def close(self) -> "EmbeddingIndex":
        """Fills in the header, moves the index and its names into place; returns the index, opened."""
        if self._data is None:
            raise InputError(f"{self.path}: the writer is closed")
        try:
            header = self._header(self.count, self._sha.hexdigest(), self._names_sha.hexdigest())
            self._data.seek(0)
            self._data.write(struct.pack("<Q", self._slot) + header.ljust(self._slot, b" "))
            for f in (self._data, self._names):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(self._tmp_names, self.names_path)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._data = self._names = None
        files._fsync(os.path.dirname(os.path.abspath(self.path)))
        from dualenc import ann

        ann.drop_stale(self.path, self._sha.hexdigest())
        return open_index(self.path)

    def abort(self) -> None:
        """Removes the temporary files; `path` keeps what it held."""
        for f in (self._data, self._names):
            if f is not None:
                f.close()
        self._data = self._names = None
        for tmp in (self._tmp, self._tmp_names):
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


# ------------------------------------------------------------------------------------------------ reading

@dataclasses.dataclass(frozen=True)
class EmbeddingIndex:
    """An opened index: its rows memory-mapped (read-only float32 (count, dims)), its header metadata, and where
    its names are (a sidecar file, or the header in files written before the sidecar)."""

    path: str
    embeddings: np.ndarray
    metadata: dict
    names_path: str | None
    header_names: tuple | None = None

    @property
    def kind(self) -> str | None:
        return self.metadata.get("kind")

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    def names(self, rows: Iterable[int] | None = None) -> list[str]:
        """All the names, or those of `rows` (in that order; the sidecar is scanned once, only they are kept)."""
        if self.header_names is not None:
            return list(self.header_names) if rows is None else [self.header_names[int(r)] for r in rows]
        if rows is None:
            return list(_names_of(self))
        rows = [int(r) for r in rows]
        wanted, found = set(rows), {}
        with open(self.names_path, "rb") as f:
            for i, line in enumerate(f):
                if i in wanted:
                    found[i] = _name(self, line)
        return [found[r] for r in rows]


def _name(index: EmbeddingIndex, line: bytes) -> str:
    try:
        name = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{index.names_path}: a line is not a JSON string") from None
    if not isinstance(name, str):
        raise CheckpointError(f"{index.names_path}: a line holds a {type(name).__name__}, not a string")
    return name


def _names_of(index: EmbeddingIndex) -> Iterator[str]:
    if index.header_names is not None:
        yield from index.header_names
        return
    with open(index.names_path, "rb") as f:
        for line in f:
            yield _name(index, line)


def open_index(path: str | os.PathLike) -> EmbeddingIndex:
    """Opens an index: validates its header and names (their count, and checksum where recorded) and
    memory-maps its rows; every problem is an error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index file not found: {path}")
    entries, start, metadata = files.read_safetensors_header(path)
    if TENSOR not in entries or not ("names_file" in metadata or "names" in metadata):
        raise CheckpointError(f"{path} is not an embedding index (as `dualenc embed` writes): it needs a tensor "
                              f"{TENSOR!r} and names")
    dtype, shape, begin, _ = entries[TENSOR]
    if dtype != "F32" or len(shape) != 2:
        raise CheckpointError(f"{path}: {TENSOR!r} must be float32 (count, dims), got {dtype} {list(shape)}")
    if "count" in metadata and metadata["count"] != str(shape[0]):
        raise CheckpointError(f"{path}: its header counts {metadata['count']} rows, its tensor holds {shape[0]}")
    if shape[0] * shape[1]:
        embeddings = np.memmap(path, dtype="<f4", mode="r", offset=start + begin, shape=shape)
    else:
        embeddings = np.zeros(shape, np.float32)
    if "names" in metadata:
        names = _header_names(path, metadata["names"])
        if len(names) != shape[0]:
            raise CheckpointError(f"{path}: {len(names)} names for {shape[0]} embeddings")
        return EmbeddingIndex(path, embeddings, metadata, None, tuple(names))
    sidecar = metadata["names_file"]
    if os.path.basename(sidecar) != sidecar or not sidecar.endswith(".names.jsonl"):
        raise CheckpointError(f"{path}: its names_file {sidecar!r} must be a .names.jsonl file beside it")
    names_path = os.path.join(os.path.dirname(os.path.abspath(path)), sidecar)
    if not os.path.isfile(names_path):
        raise CheckpointError(f"{path}: its names file {names_path} is missing")
    lines, digest = 0, hashlib.sha256()
    with open(names_path, "rb") as f:
        while chunk := f.read(1 << 18):
            lines += chunk.count(b"\n")
            digest.update(chunk)
    if lines != shape[0]:
        raise CheckpointError(f"{path}: its names file {names_path} holds {lines} names for {shape[0]} embeddings")
    if metadata.get("names_sha256", digest.hexdigest()) != digest.hexdigest():
        raise CheckpointError(f"{path}: its names file {names_path} is not the one written with it (checksum)")
    return EmbeddingIndex(path, embeddings, metadata, names_path)


def _header_names(path: str, text: str) -> list[str]:
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its names are not valid JSON") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: its names must be a list of strings")
    return names


def embeddings_sha256(index: EmbeddingIndex) -> str:
    """SHA-256 of the rows' bytes: from the header, or computed (files written before it was recorded)."""
    if "embeddings_sha256" in index.metadata:
        return index.metadata["embeddings_sha256"]
    digest = hashlib.sha256()
    for start, stop in _chunks(index.count, index.dims):
        digest.update(np.ascontiguousarray(index.embeddings[start:stop]).data)
    return digest.hexdigest()


def _chunks(count: int, dims: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK_BYTES // max(4 * dims, 1))
    for start in range(0, count, step):
        yield start, min(start + step, count)


# ------------------------------------------------------------------------------------------------ merging

def merge(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> EmbeddingIndex:
    """Concatenates indexes in the order given into `out`, streamed (a chunk of rows at a time).

    The parts must agree on kind, dims and model. Parts written by `dualenc embed --shard i/n` must be all n of
    them, in order: the merge then equals the index one process would have written, row for row.
    """
    parts, out = [os.fspath(p) for p in parts], os.fspath(out)
    if not parts:
        raise InputError("give at least one index to merge")
    opened = [open_index(p) for p in parts]
    if any(os.path.exists(out) and os.path.samefile(p, out) for p in parts):
        raise InputError(f"{out} is one of the parts: merge into a new file")
    for what, values in (("kind", [ix.kind for ix in opened]), ("dims", [ix.dims for ix in opened]),
                         ("model", [_model(ix) for ix in opened])):
        if len(set(values)) > 1:
            listed = ", ".join(f"{p}: {v}" for p, v in zip(parts, values))
            raise InputError(f"the parts disagree on their {what} ({listed})")
    _check_shards(opened)
    keep = {k: opened[0].metadata[k] for k in ("model", "model_sha256")
            if k in opened[0].metadata and len({ix.metadata.get(k) for ix in opened}) == 1}
    with IndexWriter(out, opened[0].dims, opened[0].kind or "unknown", keep) as writer:
        for ix in opened:
            names = _names_of(ix)
            for start, stop in _chunks(ix.count, ix.dims):
                writer.add(ix.embeddings[start:stop], [next(names) for _ in range(stop - start)])
    return open_index(out)


def _model(index: EmbeddingIndex) -> str | None:
    return index.metadata.get("model_sha256") or index.metadata.get("model")


def _check_shards(opened: list[EmbeddingIndex]) -> None:
    shards = [ix.metadata.get("shard") for ix in opened]
    if not any(shards):
        return
    if not all(shards):
        raise InputError(f"{opened[shards.index(None)].path} is not a shard: merge shards only with their siblings")
    splits = {s.partition("/")[2] for s in shards}
    if len(splits) > 1 or not splits.pop().isdigit():
        raise InputError(f"the parts are shards of different splits ({', '.join(shards)})")
    expected = [f"{i}/{shards[0].partition('/')[2]}" for i in range(int(shards[0].partition("/")[2]))]
    if shards != expected:
        raise InputError(f"shards must be given all and in order ({', '.join(expected)}); got {', '.join(shards)}")
    # Slices of the inputs (shard_rows of shard_of), or of a list of webdataset tars (shard_tars of shard_of_tars).
    unit = "tars" if "shard_tars" in opened[0].metadata else "rows"
    span, of = ("shard_tars", "shard_of_tars") if unit == "tars" else ("shard_rows", "shard_of")
    ranges = [ix.metadata.get(span, "") for ix in opened]
    bounds = [r.split(":") for r in ranges]
    total = opened[0].metadata.get(of)
    contiguous = all(len(b) == 2 for b in bounds) and bounds[0][0] == "0" and bounds[-1][1] == total \
        and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) \
        and all(ix.metadata.get(of) == total for ix in opened)
    if not contiguous:
        raise InputError(f"the shards do not cover one input list contiguously ({unit} {', '.join(ranges)}): were "
                         f"they written from the same inputs and --batch-size?")


# ------------------------------------------------------------------------------------------------ searching

@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Top-k rows per query, best first: scores float32 (q, k) and rows int64 (q, k) (-1 where an approximate
    search found fewer than k); method "exact" or "ann", with the ANN's build-time recall@10; why an ANN index
    was passed over."""

    scores: np.ndarray
    rows: np.ndarray
    method: str
    recall_at_10: float | None = None
    note: str | None = None


def search_exact(embeddings, queries, k: int, *, leave_out=None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `embeddings` with the largest inner product with each query, best first, ties by position
    (the order a stable sort of every score gives), reading `embeddings` (a memmap is fine) a chunk at a time.

    Args:
      embeddings: (n, dims).
      queries: (q, dims).
      k: results per query (at most n are returned).
      leave_out: rows never returned (int array).

    Returns:
      (scores float32 (q, min(k, n)), rows int64 (q, min(k, n))), n not counting the rows left out.
    """
    n, dims = embeddings.shape
    leave_out = np.unique(np.asarray([] if leave_out is None else leave_out, np.int64))
    queries, k = _check_query(queries, k, dims, n - len(leave_out[(leave_out >= 0) & (leave_out < n)]))
    q = len(queries)
    best_scores, best_rows = np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
    step = max(1, min(_CHUNK_BYTES // (4 * dims), _CHUNK_BYTES // (12 * max(q, 1))))
    for start in range(0, n, step):
        block = np.asarray(embeddings[start:start + step], np.float32)
        scores = queries @ block.T
        scores[:, leave_out[(leave_out >= start) & (leave_out < start + len(block))] - start] = -np.inf
        rows = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64), scores.shape)
        scores, rows = _top(scores, rows, k)
        best_scores, best_rows = _top(np.concatenate([best_scores, scores], 1),
                                      np.concatenate([best_rows, rows], 1), k)
    return best_scores, best_rows


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best of scores/rows (q, m): score descending, then row ascending."""
    q, m = scores.shape
    if m > k:
        kth = np.partition(scores, m - k, axis=1)[:, m - k]  # the k-th largest score of each query
        keep = scores >= kth[:, None]
        exact = keep.sum(1) == k  # else a tie at the k-th score (or a NaN)
        picked = np.empty((q, k), np.int64)
        picked[exact] = np.nonzero(keep[exact])[1].reshape(-1, k)
        for i in np.flatnonzero(~exact):
            cols = np.flatnonzero(keep[i]) if keep[i].sum() > k else np.arange(m)
            picked[i] = cols[np.lexsort((rows[i, cols], -scores[i, cols]))[:k]]
        scores, rows = np.take_along_axis(scores, picked, 1), np.take_along_axis(rows, picked, 1)
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _check_query(queries, k, dims: int, count: int) -> tuple[np.ndarray, int]:
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != dims:
        raise InputError(f"queries must be (q, {dims}), got shape {queries.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    return np.ascontiguousarray(queries), min(int(k), count)


def wants_ann(index: EmbeddingIndex, ann: bool | None = None) -> bool:
    """Whether search(index, ..., ann=ann) reads the ANN index beside it (and so needs faiss): with ann=True, or
    with ann=None where one was built and the index holds at least ANN_MIN_ROWS rows."""
    from dualenc import ann as ann_

    return bool(ann) or (ann is None and index.count >= ANN_MIN_ROWS and os.path.exists(ann_.paths(index.path)[1]))


def search(index: EmbeddingIndex, queries, k: int, *, ann: bool | None = None) -> SearchResult:
    """Top-k rows of an index for each query.

    It takes vectors and cannot tell which model made them: check_model(index, params) says whether a model is
    the one that embedded the index (`dualenc search` checks it).

    Args:
      index: from open_index.
      queries: (q, dims).
      k: results per query (at most the index's count).
      ann: True: the ANN index beside it (an error without one); False: exact search; None: the ANN index
        when there is one, the index has at least ANN_MIN_ROWS rows and the ANN's measured recall@10 is at
        least ANN_MIN_RECALL, else exact (the result's `note` says why, when there is an ANN index).

    Returns:
      A SearchResult. An ANN search's scores are recomputed from the stored rows, as exact search computes them.
    """
    queries, k = _check_query(queries, k, index.dims, index.count)
    from dualenc import ann as ann_

    loaded, note = None, None
    if wants_ann(index, ann):
        loaded = ann_.load(index)
        if ann is None and loaded[1]["recall_at_10"] < ANN_MIN_RECALL:
            note = (f"its ANN index's recall@10, {loaded[1]['recall_at_10']:.3f}, is under {ANN_MIN_RECALL}: the "
                    f"rows have too little structure for it")
            loaded = None
    if loaded is None:
        return SearchResult(*search_exact(index.embeddings, queries, k), "exact", note=note)
    scores, rows = ann_.search(index, loaded, queries, k)
    return SearchResult(scores, rows, "ann", loaded[1]["recall_at_10"])
