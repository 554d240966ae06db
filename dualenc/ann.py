"""Approximate search beside an embedding index: a faiss HNSW graph (NAME.faiss, faiss' own binary format, never
pickle) and its description (NAME.faiss.json: how it was built, and its recall@10 against exact search measured
then); faiss is imported only here, and only when used (`pip install 'dualenc[search]'`)."""

from __future__ import annotations

import os
import secrets
import time

import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, InputError
from dualenc.index import EmbeddingIndex, _chunks, _stem, embeddings_sha256, open_index, search_exact

SAMPLE = 1000  # rows of the index held out of the graph as queries to measure its recall@10 (a tenth at most)
TARGET_RECALL = 0.95  # build keeps the smallest efSearch of EF_SEARCH reaching it on that sample
EF_SEARCH = (16, 32, 64, 128, 256, 512)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
RECALL_K = 10


def paths(path: str) -> tuple[str, str]:
    """The ANN index of an index and its description: photos.safetensors -> (photos.faiss, photos.faiss.json)."""
    return _stem(path) + ".faiss", _stem(path) + ".faiss.json"


def drop_stale(path: str, sha: str) -> None:
    """Removes an ANN index built for other rows than those of `path` (whose bytes hash to `sha`)."""
    graph, info = paths(path)
    if not os.path.exists(info) and not os.path.exists(graph):
        return
    try:
        built_for = files.read_json(info).get("embeddings_sha256")
    except (OSError, ValueError):
        built_for = None
    if built_for != sha:
        for p in (graph, info):
            if os.path.exists(p):
                os.remove(p)


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
    for start, stop in _chunks(index.count, index.dims):
        rows = np.flatnonzero(kept[start:stop]) + start
        if len(rows):
            graph.add_with_ids(np.ascontiguousarray(index.embeddings[rows], np.float32), rows)
    held_out = len(held) > 0
    if not held_out:  # under 10 rows: they query the graph they are in
        held = np.arange(index.count)
    queries = np.ascontiguousarray(index.embeddings[held], np.float32)
    exact = search_exact(index.embeddings, queries, RECALL_K, leave_out=held if held_out else None)[1]
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
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        faiss.write_index(graph, tmp)
        files._fsync(tmp)
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


def load(index: EmbeddingIndex) -> tuple:
    """The ANN index beside an index, checked against it: (faiss index, its description); errors name the file."""
    faiss = _faiss()
    path, info_path = paths(index.path)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no ANN index beside {index.path} ({info_path} is missing): build it with "
                                f"`dualenc embed --ann` or `dualenc merge --ann`")
    info = files.read_json(info_path, "ANN index description")
    needed = {"embeddings_sha256": str, "count": int, "dims": int, "ef_search": int, "recall_at_10": float}
    wrong = [k for k, t in needed.items() if not isinstance(info.get(k), t) or isinstance(info.get(k), bool)]
    if wrong:
        raise CheckpointError(f"{info_path}: missing or mistyped {', '.join(wrong)}")
    if (info["count"], info["dims"]) != (index.count, index.dims) \
            or info["embeddings_sha256"] != embeddings_sha256(index):
        raise CheckpointError(f"{path} was built for other rows than {index.path} now holds: build it again "
                              f"(`dualenc merge {index.path} --out NEW --ann`), or search exactly")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ANN index file not found: {path} (described by {info_path})")
    try:
        graph = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a readable faiss index: {str(e).splitlines()[0][-200:]}") from None
    inner = faiss.downcast_index(graph.index) if isinstance(graph, faiss.IndexIDMap) else None
    if not isinstance(inner, faiss.IndexHNSWFlat) or graph.ntotal != index.count or graph.d != index.dims \
            or graph.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CheckpointError(f"{path} is not an inner-product HNSW index of {index.count} x {index.dims} rows")
    return graph, info


def search(index: EmbeddingIndex, loaded: tuple, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's top k for each query (float32 (q, dims)): (scores float32 (q, k), rows int64 (q, k)), best
    first, ties by row, -1 rows (and -inf scores) where it found fewer; the scores recomputed from the stored rows."""
    graph, info = loaded
    params = _faiss().SearchParametersHNSW(efSearch=max(info["ef_search"], k))
    found = graph.search(queries, k, params=params)[1].astype(np.int64)
    present = found >= 0
    rows = np.where(present, found, 0)
    stored = np.asarray(index.embeddings[rows.reshape(-1)]).reshape(*rows.shape, -1)
    scores = np.where(present, np.einsum("qkd,qd->qk", stored, queries), -np.inf).astype(np.float32)
    rows = np.where(present, rows, -1)
    order = np.lexsort((np.where(present, rows, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
