"""Embedding indexes and search over them.

- store.py: the files of an index (a streaming writer, a memory-mapped reader, their checksums);
- exact.py: exact top-k search, a block of rows at a time;
- ann.py: approximate search beside an index (faiss HNSW, the `search` extra), its file parsed before faiss reads it;
- index.py: the public surface: search (exact, or approximate where built), merge, model and input fingerprints.

Imports go store <- exact <- ann <- index.
"""

from dualenc.search.index import (
    ANN_MIN_RECALL,
    ANN_MIN_ROWS,
    EmbeddingIndex,
    IndexWriter,
    SearchResult,
    check_model,
    inputs_fingerprint,
    merge,
    model_fingerprint,
    open_index,
    search,
    search_exact,
    wants_ann,
)

__all__ = ["ANN_MIN_RECALL", "ANN_MIN_ROWS", "EmbeddingIndex", "IndexWriter", "SearchResult", "check_model",
           "inputs_fingerprint", "merge", "model_fingerprint", "open_index", "search", "search_exact", "wants_ann"]
