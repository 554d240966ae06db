"""Exact top-k search: the rows with the largest inner product with each query, a block of rows at a time, ties
by position; over an EmbeddingIndex the rows are verified against its checksum as they stream."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dualenc.errors import InputError
from dualenc.search.store import EmbeddingIndex, block_rows, verified_rows


def search_exact(embeddings, queries, k: int, *, leave_out=None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `embeddings` with the largest inner product with each query, best first, ties by position
    (the order a stable sort of every score gives), reading the rows a chunk at a time.

    Args:
      embeddings: (n, dims) (a memmap is fine), or an EmbeddingIndex: its rows are then checked, as they
        stream, against the embeddings_sha256 its header records; rows that differ are a CheckpointError
        naming the file, and nothing is returned.
      queries: (q, dims).
      k: results per query (at most n are returned).
      leave_out: rows never returned (int array).

    Returns:
      (scores float32 (q, min(k, n)), rows int64 (q, min(k, n))), n not counting the rows left out.
    """
    verify = isinstance(embeddings, EmbeddingIndex)
    rows = embeddings.embeddings if verify else embeddings
    n, dims = rows.shape
    out = np.unique(np.asarray([] if leave_out is None else leave_out, np.int64))
    queries, k = check_query(queries, k, dims, n - len(out[(out >= 0) & (out < n)]))
    step = block_rows(dims, len(queries))
    blocks = verified_rows(embeddings, step) if verify else (rows[i:i + step] for i in range(0, n, step))
    return top_k(blocks, queries, k, out)


def top_k(blocks: Iterable[np.ndarray], queries: np.ndarray, k: int, leave_out: np.ndarray) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """search_exact's loop: `blocks` are the rows in order, a block at a time; `queries` and `k` as _check_query
    returns them; `leave_out` sorted row numbers."""
    q = len(queries)
    best_scores, best_rows = np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
    start = 0
    for block in blocks:
        block = np.asarray(block, np.float32)
        scores = queries @ block.T
        scores[:, leave_out[(leave_out >= start) & (leave_out < start + len(block))] - start] = -np.inf
        rows = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64), scores.shape)
        scores, rows = _top(scores, rows, k)
        best_scores, best_rows = _top(np.concatenate([best_scores, scores], 1),
                                      np.concatenate([best_rows, rows], 1), k)
        start += len(block)
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


def check_query(queries, k, dims: int, count: int) -> tuple[np.ndarray, int]:
    """Queries as contiguous float32 (q, dims) and k as at most `count`; an InputError naming the argument."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != dims:
        raise InputError(f"queries must be (q, {dims}), got shape {queries.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    return np.ascontiguousarray(queries), min(int(k), count)
