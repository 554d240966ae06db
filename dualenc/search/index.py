"""Embedding indexes: the files (dualenc.search.store: a streaming writer, a memory-mapped reader), exact top-k
search (or approximate, through dualenc.search.ann), the merge of shard indexes into one, and the fingerprints that tie
an index to its model and a shard to its inputs.

An index is a safetensors file NAME.safetensors holding one float32 tensor "embeddings" (count, dims), its names
in a sidecar NAME.names.jsonl (one JSON string per line) and, optionally, an approximate-search index beside it
(NAME.faiss and NAME.faiss.json, written by dualenc.search.ann.build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from dualenc.search.exact import check_query, search_exact  # noqa: F401  (dualenc.search.index.search_exact)
from dualenc.errors import InputError
from dualenc.search.store import (SUFFIX, TENSOR, EmbeddingIndex, IndexWriter, ann_paths, names_of,  # noqa: F401
                                clean_temporaries, embeddings_sha256, names_file, open_index, temporary_path,
                                verified_rows)

# search(ann=None) uses the ANN index from this many rows on, where one was built: below it exact search is
# fast enough beside loading a model (benchmarks/README.md, "Embedding search"), and exact.
ANN_MIN_ROWS = 200_000
ANN_MIN_RECALL = 0.9  # nor below this recall@10: rows without structure (random vectors) defeat the graph


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


def inputs_fingerprint(inputs: Iterable[str]) -> str:
    """SHA-256 of a list of inputs in order (each as a JSON string and a newline): `dualenc embed --shard`
    records it in each part (shard_inputs_sha256) so that merge refuses parts cut from other inputs."""
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(json.dumps(item).encode("utf-8") + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ merging

def merge(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> EmbeddingIndex:
    """Concatenates indexes in the order given into `out`, streamed (a chunk of rows at a time).

    The parts must agree on kind, dims, model and precision (float32 where none is recorded). Parts written by
    `dualenc embed --shard i/n` must be all n of them, in order, cut from the same inputs (their
    shard_inputs_sha256): the merge then equals the index one process would have written, row for row. Each
    part's rows are checked against the embeddings_sha256 its header records as they are copied; a part that
    differs is a CheckpointError naming it, and `out` is left as it was.
    """
    parts, out = [os.fspath(p) for p in parts], os.fspath(out)
    if not parts:
        raise InputError("give at least one index to merge")
    opened = [open_index(p) for p in parts]
    if any(os.path.exists(out) and os.path.samefile(p, out) for p in parts):
        raise InputError(f"{out} is one of the parts: merge into a new file")
    for what, values in (("kind", [ix.kind for ix in opened]), ("dims", [ix.dims for ix in opened]),
                         ("model", [_model(ix) for ix in opened]),
                         ("precision", [ix.metadata.get("precision", "float32") for ix in opened])):
        if len(set(values)) > 1:
            listed = ", ".join(f"{p}: {v}" for p, v in zip(parts, values))
            raise InputError(f"the parts disagree on their {what} ({listed})")
    _check_shards(opened)
    keep = {k: opened[0].metadata[k] for k in ("model", "model_sha256", "precision")
            if k in opened[0].metadata and len({ix.metadata.get(k) for ix in opened}) == 1}
    with IndexWriter(out, opened[0].dims, opened[0].kind or "unknown", keep) as writer:
        for ix in opened:
            names = names_of(ix)
            for block in verified_rows(ix):
                writer.add(block, [next(names) for _ in range(len(block))])
    return open_index(out)


def _model(index: EmbeddingIndex) -> str | None:
    return index.metadata.get("model_sha256") or index.metadata.get("model")


def _check_shards(opened: list[EmbeddingIndex]) -> None:
    shards = [ix.metadata.get("shard") for ix in opened]
    if not any(shards):
        return
    if not all(shards):
        path = next(ix.path for ix, s in zip(opened, shards) if not s)
        raise InputError(f"{path} is not a shard: merge shards only with their siblings")
    given = ", ".join(f"{ix.path}: {s[:40]}" for ix, s in zip(opened, shards))
    splits = {s.partition("/")[2] for s in shards}
    if len(splits) > 1 or not re.fullmatch("[0-9]{1,9}", splits.pop()):
        raise InputError(f"the parts are shards of different splits, or not shards I/N ({given})")
    n = int(shards[0].partition("/")[2])
    if n != len(shards) or shards != [f"{i}/{n}" for i in range(n)]:
        wanted = ", ".join(f"{i}/{n}" for i in range(n)) if n <= 16 else f"0/{n} to {n - 1}/{n}"
        raise InputError(f"shards must be given all and in order ({wanted}); got {given}")
    inputs = [ix.metadata.get("shard_inputs_sha256") for ix in opened]
    if len(set(inputs)) > 1:
        listed = ", ".join(f"{ix.path}: {(f or 'none')[:16]}" for ix, f in zip(opened, inputs))
        raise InputError(f"the shards were cut from different inputs (shard_inputs_sha256 {listed}): embed every "
                         f"shard from the same inputs, in the same order")
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


def wants_ann(index: EmbeddingIndex, ann: bool | None = None) -> bool:
    """Whether search(index, ..., ann=ann) reads the ANN index beside it (and so needs faiss): with ann=True, or
    with ann=None where one was built and the index holds at least ANN_MIN_ROWS rows."""
    return bool(ann) or (ann is None and index.count >= ANN_MIN_ROWS and os.path.exists(ann_paths(index.path)[1]))


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
    queries, k = check_query(queries, k, index.dims, index.count)
    from dualenc.search import ann as ann_

    loaded, note = None, None
    if wants_ann(index, ann):
        loaded = ann_.load(index)
        if ann is None and loaded.info["recall_at_10"] < ANN_MIN_RECALL:
            note = (f"its ANN index's recall@10, {loaded.info['recall_at_10']:.3f}, is under {ANN_MIN_RECALL}: the "
                    f"rows have too little structure for it")
            loaded = None
    if loaded is None:
        return SearchResult(*search_exact(index, queries, k), "exact", note=note)
    scores, rows = ann_.search(index, loaded, queries, k)
    return SearchResult(scores, rows, "ann", loaded.info["recall_at_10"])
