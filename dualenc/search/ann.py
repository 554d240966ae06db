"""Approximate search beside an embedding index: a faiss HNSW graph (NAME.faiss, faiss' own binary format, never
pickle) and its description (NAME.faiss.json: how it was built, and its recall@10 against exact search measured
then); faiss is imported only here, and only when used (`pip install 'dualenc[search]'`).

A NAME.faiss is parsed by faiss's native reader, so dualenc reads it first itself (faiss_layout): the one layout
build writes, every declared size against the file's, the graph's structure and its id map. faiss then reads a
file whose every size adds up to the file's own, with a graph it cannot walk out of.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, NamedTuple

import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, InputError
from dualenc.search.exact import search_exact
from dualenc.search.store import (EmbeddingIndex, ann_paths as paths, chunks, clean_temporaries, embeddings_sha256,
                                  open_index, temporary_path)

SAMPLE = 1000  # rows of the index held out of the graph as queries to measure its recall@10 (a tenth at most)
TARGET_RECALL = 0.95  # build keeps the smallest efSearch of EF_SEARCH reaching it on that sample
EF_SEARCH = (16, 32, 64, 128, 256, 512)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
RECALL_K = 10


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("approximate search needs faiss: pip install 'dualenc[search]'") from None
    return faiss


def build(index: EmbeddingIndex | str, *, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
          sample: int = SAMPLE, target_recall: float = TARGET_RECALL, seed: int = 0) -> dict:
    """Builds the ANN index of an index (faiss IndexHNSWFlat, inner product, in an IndexIDMap) and writes it
    beside it (NAME.faiss, then NAME.faiss.json, each atomically).

    Its recall@10 against exact search is measured on `sample` of the index's own rows (at most a tenth of
    them) held out of the graph: queries it was not built around, as real queries are (rows in the graph, as
    queries, find their neighbours more easily). For each efSearch of EF_SEARCH, up to the first reaching
    `target_recall`; that efSearch is kept for searching. The held-out rows are added to the graph afterwards.

    The index's rows are checked against its embeddings_sha256 (an error naming it, before anything is
    written). A build killed mid-way leaves a temporary file that the next build of the same index removes.

    Returns:
      The description written to NAME.faiss.json: ef_search, recall_at_10, the recall of each efSearch tried,
      build_seconds...
    """
    faiss = _faiss()
    if not isinstance(index, EmbeddingIndex):
        index = open_index(index)
    if not index.count:
        raise InputError(f"{index.path} has no rows: nothing to index")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(index.count, min(sample, index.count // 10), replace=False))
    hnsw = faiss.IndexHNSWFlat(index.dims, m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    graph = faiss.IndexIDMap(hnsw)  # ids: the rows' positions (the held-out rows go in last)
    kept = np.ones(index.count, bool)
    kept[held] = False
    for start, stop in chunks(index.count, index.dims):
        rows = np.flatnonzero(kept[start:stop]) + start
        if len(rows):
            graph.add_with_ids(np.ascontiguousarray(index.embeddings[rows], np.float32), rows)
    held_out = len(held) > 0
    if not held_out:  # under 10 rows: they query the graph they are in
        held = np.arange(index.count)
    queries = np.ascontiguousarray(index.embeddings[held], np.float32)
    exact = search_exact(index, queries, RECALL_K, leave_out=held if held_out else None)[1]  # checks the rows
    k = exact.shape[1]
    tried = {}
    for ef in EF_SEARCH:
        found = graph.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=max(ef, k)))[1]
        tried[ef] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())]))
        if tried[ef] >= target_recall:
            break
    ef = next((e for e, r in tried.items() if r >= target_recall), max(tried, key=tried.get))
    if held_out:
        graph.add_with_ids(queries, held)
    built = time.perf_counter() - started
    path, info_path = paths(index.path)
    clean_temporaries(path)
    tmp = temporary_path(path)
    try:
        faiss.write_index(graph, tmp)
        files.fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    info = {"index": os.path.basename(index.path), "embeddings_sha256": embeddings_sha256(index),
            "count": index.count, "dims": index.dims, "faiss_index": "IndexIDMap(IndexHNSWFlat)",
            "metric": "inner_product", "hnsw_m": m, "ef_construction": ef_construction, "ef_search": ef,
            "recall_at_10": tried[ef], "recall_k": k, "sample_queries": len(held),
            "queries": "rows held out of the graph" if held_out else "rows in the graph",
            "target_recall": target_recall, "recall_by_ef_search": {str(e): r for e, r in tried.items()},
            "build_seconds": round(built, 3), "faiss_version": faiss.__version__, "file_bytes": os.path.getsize(path)}
    files.write_json_atomic(info_path, info)
    return info


class Loaded(NamedTuple):
    """An ANN index as load reads it: the faiss index, its description, and from dualenc's own reading of the
    file the place of each row in it (int64 (count,)) and the copy of the rows it holds (float32 (count, dims),
    memory-mapped)."""

    graph: Any
    info: dict
    places: np.ndarray
    stored: np.ndarray


def load(index: EmbeddingIndex) -> Loaded:
    """The ANN index beside an index, checked against it, read by faiss only once faiss_layout has checked the
    file; errors name the file."""
    faiss = _faiss()
    path, info_path = paths(index.path)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no ANN index beside {index.path} ({info_path} is missing): build it with "
                                f"`dualenc embed --ann` or `dualenc merge --ann`")
    info = files.read_json(info_path, "ANN index description")
    needed = {"embeddings_sha256": str, "count": int, "dims": int, "ef_search": int, "recall_at_10": float}
    wrong = [k for k, t in needed.items() if not isinstance(info.get(k), t) or isinstance(info.get(k), bool)]
    if not wrong and not 1 <= info["ef_search"] <= EF_SEARCH[-1]:
        wrong.append(f"ef_search (from 1 to {EF_SEARCH[-1]})")
    if not wrong and not 0 <= info["recall_at_10"] <= 1:
        wrong.append("recall_at_10 (from 0 to 1)")
    if wrong:
        raise CheckpointError(f"{info_path}: missing or mistyped {', '.join(wrong)}")
    if (info["count"], info["dims"]) != (index.count, index.dims) \
            or info["embeddings_sha256"] != embeddings_sha256(index):
        raise CheckpointError(f"{path} was built for other rows than {index.path} now holds: build it again "
                              f"(`dualenc merge {index.path} --out NEW --ann`), or search exactly")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ANN index file not found: {path} (described by {info_path})")
    places, stored = faiss_layout(path, index.count, index.dims)
    try:
        graph = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a readable faiss index: {str(e).splitlines()[0][-200:]}") from None
    inner = faiss.downcast_index(graph.index) if isinstance(graph, faiss.IndexIDMap) else None
    if not isinstance(inner, faiss.IndexHNSWFlat) or graph.ntotal != index.count or graph.d != index.dims \
            or graph.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CheckpointError(f"{path} is not an inner-product HNSW index of {index.count} x {index.dims} rows")
    return Loaded(graph, info, places, stored)


def search(index: EmbeddingIndex, loaded: Loaded, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's top k for each query (float32 (q, dims)): (scores float32 (q, k), rows int64 (q, k)), best
    first, ties by row, -1 rows (and -inf scores) where it found fewer; the scores recomputed from the stored rows,
    each row found checked against the graph's copy of it (a CheckpointError naming both files where they
    differ: one was changed since the graph was built)."""
    graph, info = loaded.graph, loaded.info
    params = _faiss().SearchParametersHNSW(efSearch=max(info["ef_search"], k))
    found = graph.search(queries, k, params=params)[1].astype(np.int64)
    present = found >= 0
    rows = np.where(present, found, 0)
    wanted = np.unique(rows[present])
    mine, copies = np.asarray(index.embeddings[wanted]), np.asarray(loaded.stored[loaded.places[wanted]])
    if not np.array_equal(mine.view(np.uint32), copies.view(np.uint32)):
        row = int(wanted[np.flatnonzero((mine.view(np.uint32) != copies.view(np.uint32)).any(1))[0]])
        raise CheckpointError(f"{index.path}: row {row} differs from its copy in {paths(index.path)[0]}: one of "
                              f"them was changed since the ANN index was built")
    stored = np.asarray(index.embeddings[rows.reshape(-1)]).reshape(*rows.shape, -1)
    scores = np.where(present, np.einsum("qkd,qd->qk", stored, queries), -np.inf).astype(np.float32)
    rows = np.where(present, rows, -1)
    order = np.lexsort((np.where(present, rows, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


# ------------------------------------------------------------------------------------------------ the file

_HEADER = struct.Struct("<4siqqqBi")  # fourcc; faiss' index header: d, ntotal, two unused, is_trained, metric
_GRAPH_TAIL = struct.Struct("<5i")  # entry point, max level, efConstruction, efSearch, a retired field
_GATHER = 1 << 22  # graph slots checked at once
_MAX_LEVELS = 64  # faiss' HNSW has about log(rows) / log(M) levels: 7 for a billion rows at M = 32


class _Reader:
    """Reads faiss' fields from a memory-mapped file in order, never past its end."""

    def __init__(self, path: str, raw: np.ndarray):
        self.path, self.raw, self.at = path, raw, 0

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not an ANN index as dualenc builds it (faiss IndexIDMap of an "
                               f"inner-product IndexHNSWFlat): {what}")

    def take(self, n: int, what: str) -> np.ndarray:
        if n > len(self.raw) - self.at:
            raise self.bad(f"its {what} ({n} bytes at byte {self.at}) runs past its end ({len(self.raw)} bytes)")
        self.at += n
        return self.raw[self.at - n:self.at]

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what).tobytes())

    def header(self, fourcc: bytes, count: int, dims: int) -> None:
        found, d, ntotal, _, _, trained, metric = self.unpack(_HEADER, f"{fourcc.decode()} header")
        if found != fourcc:
            raise self.bad(f"{found!r} at byte {self.at - _HEADER.size} where {fourcc!r} belongs")
        if (ntotal, d, trained, metric) != (count, dims, 1, 0):
            raise self.bad(f"its {fourcc.decode()} part holds {ntotal} x {d} vectors (trained {trained}, metric "
                           f"{metric}), not the index's {count} x {dims} (trained 1, metric 0: inner product)")

    def vector(self, dtype: str, what: str, length: int | None = None) -> np.ndarray:
        """A faiss vector: its length (uint64), then its items; `length` where it must be that."""
        (n,) = self.unpack(struct.Struct("<Q"), f"{what}'s length")
        if length is not None and n != length:
            raise self.bad(f"its {what} holds {n} items, not {length}")
        size = np.dtype(dtype).itemsize
        if n > (len(self.raw) - self.at) // size:
            raise self.bad(f"its {what} declares {n} items of {size} bytes, past its end ({len(self.raw)} bytes)")
        return self.take(n * size, what).view(dtype)


def faiss_layout(path: str, count: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks a NAME.faiss as build writes it (faiss' IndexIDMap of an IndexHNSWFlat, inner product)
    before faiss reads it: each part's header (count x dims vectors, inner product), every declared length
    against the bytes left (so nothing faiss allocates exceeds the file, and the parts end at its end), the
    graph (levels and offsets consistent, neighbours in range, the entry point on the top level, every
    neighbour at a level present at that level, so that a search stays inside the graph) and the id map (a
    permutation of the index's rows: build puts every row in the graph).

    Returns:
      (the place of each row in the graph int64 (count,), its stored vectors float32 (count, dims), memory-mapped);
      any problem is a CheckpointError naming the file.
    """
    size = os.path.getsize(path)
    raw = np.memmap(path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    r = _Reader(path, raw)
    r.header(b"IxMp", count, dims)
    r.header(b"IHNf", count, dims)
    r.vector("<f8", "level probabilities")
    cum = r.vector("<i4", "neighbours per level").astype(np.int64)
    levels = r.vector("<i4", "levels", count).astype(np.int64)
    offsets = r.vector("<u8", "offsets", count + 1)
    neighbours = r.vector("<i4", "neighbours")
    entry, top, *_ = r.unpack(_GRAPH_TAIL, "graph's entry point")
    r.header(b"IxFI", count, dims)
    stored = _stored(r, count, dims)
    ids = r.vector("<i8", "id map", count)
    if r.at != size:
        raise r.bad(f"{size - r.at} bytes follow its end")
    _check_graph(r, cum, levels, offsets, neighbours, entry, top, count)
    if not np.array_equal(np.sort(ids), np.arange(count)):
        raise r.bad("its id map is not a permutation of the index's rows (each row once)")
    places = np.empty(count, np.int64)
    places[ids] = np.arange(count)
    return places, stored.reshape(count, dims)


def _stored(r: _Reader, count: int, dims: int) -> np.ndarray:
    """IndexFlat's vectors: their length in units of 4 bytes (uint64), then count x dims float32."""
    (n,) = r.unpack(struct.Struct("<Q"), "stored vectors' length")
    if n != count * dims:
        raise r.bad(f"its stored vectors declare {n} floats, not {count} x {dims}")
    return r.take(4 * n, "stored vectors").view("<f4")


def _check_graph(r: _Reader, cum, levels, offsets, neighbours, entry: int, top: int, count: int) -> None:
    if not 2 <= len(cum) <= _MAX_LEVELS + 1 or cum[0] != 0 or (np.diff(cum) < 0).any():
        raise r.bad(f"its neighbours per level do not start at 0 and grow, over 1 to {_MAX_LEVELS} levels")
    if count and (levels.min() < 1 or levels.max() >= len(cum)):
        raise r.bad(f"a level is outside 1 to {len(cum) - 1}")
    expected = np.concatenate([[0], np.cumsum(cum[levels])]).astype(np.uint64)
    if not np.array_equal(offsets, expected) or int(expected[-1]) != len(neighbours):
        raise r.bad("its offsets do not match its levels and neighbours")
    for start in range(0, len(neighbours), _GATHER):
        part = neighbours[start:start + _GATHER]
        if part.min() < -1 or part.max() >= count:
            raise r.bad(f"a neighbour is outside -1 to {count - 1}")
    if count and not (0 <= entry < count and top == levels[entry] - 1 == levels.max() - 1):
        raise r.bad(f"its entry point {entry} (top level {top}) is not a node of its highest level")
    for level in range(1, top + 1):  # level 0: every node has it
        nodes = np.flatnonzero(levels > level)
        width = int(cum[level + 1] - cum[level])
        step = max(1, _GATHER // max(width, 1))
        for start in range(0, len(nodes), step):
            slots = offsets[nodes[start:start + step]].astype(np.int64)[:, None] + cum[level] + np.arange(width)
            found = np.asarray(neighbours[slots.reshape(-1)], np.int64)
            if (levels[found[found >= 0]] <= level).any():
                raise r.bad(f"a neighbour at level {level} is not on that level")
