"""Fuzzing embedding indexes and their faiss files (hypothesis, bounded, counted with test_fuzz's): a mutated
header, names file, rows, NAME.faiss or NAME.faiss.json, and shards' headers end in dualenc's documented errors
naming the file; never a traceback, a hang, memory past a bound, or a result from rows that are not the ones
written."""

import hashlib
import json
import os
import shutil
import struct
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st
from test_fuzz import DOCUMENTED, FUZZ, JUNK, TRIED
from test_hostile_index import faiss_fields, peak_growth_kib, unit_rows

from dualenc.search import ann
from dualenc.search import index

COUNT, DIMS = 200, 8
SECONDS = 5  # each input's bound
MEMORY_KIB = 64 << 10  # and its peak memory's growth (the files are a few hundred KB)
SUFFIXES = (".safetensors", ".names.jsonl", ".faiss", ".faiss.json")


class Files(dict):
    """{suffix: bytes} of an index and its ANN index, with a short repr for hypothesis' reports."""

    def __repr__(self):
        return f"Files({', '.join(f'{k}: <{len(v)} bytes>' for k, v in self.items())})"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An index of 200 x 8 rows with its ANN index: {suffix: bytes}."""
    folder = tmp_path_factory.mktemp("fuzz-index")
    with index.IndexWriter(folder / "a.safetensors", DIMS, "image", {"model": "m"}) as writer:
        writer.add(unit_rows(COUNT, DIMS), [f"img/{i}.jpg" for i in range(COUNT)])
    ann.build(folder / "a.safetensors")
    yield Files({s: (folder / f"a{s}").read_bytes() for s in SUFFIXES})
    shutil.rmtree(folder, ignore_errors=True)


def attempt(tmp_path, files, fn):
    """Writes `files` ({suffix: bytes}) as the index a.*, runs fn(path) under the bounds; returns its documented
    error (which must name a file of the index) or its result."""
    for suffix in SUFFIXES:
        target = tmp_path / f"a{suffix}"
        if suffix in files:
            target.write_bytes(files[suffix])
        elif target.exists():
            target.unlink()
    started, out = time.perf_counter(), []
    grew, error = peak_growth_kib(lambda: out.append(fn(tmp_path / "a.safetensors")))
    assert time.perf_counter() - started < SECONDS and grew < MEMORY_KIB, (time.perf_counter() - started, grew)
    if error is not None:
        if not isinstance(error, DOCUMENTED):
            raise error
        assert "a.safetensors" in str(error) or "a.names.jsonl" in str(error) or "a.faiss" in str(error), str(error)
        return error
    return out[0]


def exact(path):
    ix = index.open_index(path)
    result = index.search(ix, unit_rows(3, ix.dims, seed=1), 5, ann=False)
    return ix, result, ix.names(result.rows.reshape(-1).tolist())


def split(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def check_found(ix, result, names, rows_bytes):
    """A search that succeeded ranked the rows written: they hash to the checksum the header records (where it
    records one) and the result is exact search over them."""
    recorded = ix.metadata.get("embeddings_sha256")
    if recorded is not None:
        assert hashlib.sha256(rows_bytes).hexdigest() == recorded
    queries = unit_rows(3, ix.dims, seed=1)
    expected = np.argsort(-(queries @ np.asarray(ix.embeddings).T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(result.rows, expected) and len(names) == result.rows.size


@FUZZ
@given(where=st.sampled_from(["__metadata__", "embeddings"]), field=st.sampled_from(
    ["count", "kind", "names_file", "names_sha256", "embeddings_sha256", "names", "shard", "dtype", "shape",
     "data_offsets"]), value=JUNK | st.sampled_from(["0", "200", "a.names.jsonl", "../a.names.jsonl", "[]", "F32",
                                                        [200, 8], [100, 16], [0, 8], [200, 0], [0, 6400], "[[[["]),
       drop=st.booleans())
def test_fuzzed_index_header(original, tmp_path, where, field, value, drop):
    TRIED["index header"] += 1
    header, body = split(original[".safetensors"])
    target = header[where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    found = attempt(tmp_path, {**original, ".safetensors": join(header, body)}, exact)
    if not isinstance(found, Exception):
        check_found(*found, body)


@FUZZ
@given(kind=st.sampled_from(["flip", "cut", "insert", "legacy"]), at=st.floats(0, 1),
       data=st.binary(min_size=1, max_size=16) | st.sampled_from(
           [b"\n", b'"\\ud800"\n', b"[" * 5000 + b"\n", b"1\n", b"null\n", b'"\xff"\n', b"\r\n"]))
def test_fuzzed_names_file(original, tmp_path, kind, at, data):
    """A names file that changed is refused by its checksum; read without one (as files written before it was
    recorded: "legacy"), each line must still be a JSON string of text, bounded."""
    TRIED["index names file"] += 1
    blob = original[".names.jsonl"]
    i = int(at * len(blob))
    files = dict(original)
    if kind == "legacy":
        header, body = split(original[".safetensors"])
        header["__metadata__"].pop("names_sha256")
        files[".safetensors"] = join(header, body)
        lines = blob.split(b"\n")
        lines[min(int(at * COUNT), COUNT - 1)] = data.rstrip(b"\n")
        changed = b"\n".join(lines)
    elif kind == "flip":
        changed = blob[:i] + bytes([blob[min(i, len(blob) - 1)] ^ (data[0] or 1)]) + blob[i + 1:]
    elif kind == "cut":
        changed = blob[:i]
    else:
        changed = blob[:i] + data + blob[i:]
    files[".names.jsonl"] = changed
    found = attempt(tmp_path, files, lambda path: index.open_index(path).names())
    if kind != "legacy" and changed != blob:
        assert isinstance(found, Exception), "a changed names file was read"
    if not isinstance(found, Exception):
        assert len(found) == COUNT and all(isinstance(n, str) for n in found)


@FUZZ
@given(kind=st.sampled_from(["flip", "cut", "nan", "row"]), at=st.floats(0, 1), byte=st.integers(1, 255))
def test_fuzzed_index_rows(original, tmp_path, kind, at, byte):
    """Rows changed after writing are a CheckpointError from exact search, never a ranking."""
    TRIED["index rows"] += 1
    header, body = split(original[".safetensors"])
    i = int(at * (len(body) - 1))
    if kind == "flip":
        changed = body[:i] + bytes([body[i] ^ byte]) + body[i + 1:]
    elif kind == "cut":
        changed = body[:i]
    else:
        value = np.float32(np.nan) if kind == "nan" else np.float32(1e30)
        j = i // (4 * DIMS) * 4 * DIMS
        changed = body[:j] + np.full(DIMS if kind == "row" else 1, value, np.float32).tobytes() + \
            body[j + (4 * DIMS if kind == "row" else 4):]
    found = attempt(tmp_path, {**original, ".safetensors": join(header, changed)}, exact)
    assert isinstance(found, Exception) or changed == body, "rows that changed were ranked"


def ann_search(path):
    ix = index.open_index(path)
    queries = np.concatenate([np.asarray(ix.embeddings[:3]), unit_rows(3, DIMS, seed=2)])
    return ix, queries, index.search(ix, queries, 10, ann=True)


@FUZZ
@given(kind=st.sampled_from(["flip", "length", "cut", "insert", "swap ids"]), at=st.floats(0, 1),
       value=st.integers(0, 2 ** 64 - 1) | st.sampled_from([0, 1, COUNT, COUNT + 1, 2 ** 25, 2 ** 40, 2 ** 63]),
       field=st.sampled_from(["probas", "cum", "levels", "offsets", "neighbours", "stored", "ids"]))
def test_fuzzed_faiss_file(original, tmp_path, kind, at, value, field):
    """A NAME.faiss mutated anywhere: documented errors only, memory bounded whatever lengths it declares; a
    search that succeeds returns rows of the index, each once, scored from the rows written."""
    TRIED["faiss file"] += 1
    blob = original[".faiss"]
    i = int(at * (len(blob) - 1))
    if kind == "flip":
        changed = blob[:i] + bytes([blob[i] ^ (value % 255 + 1)]) + blob[i + 1:]
    elif kind == "length":
        at_ = faiss_fields(blob)[field]
        changed = blob[:at_] + struct.pack("<Q", value) + blob[at_ + 8:]
    elif kind == "cut":
        changed = blob[:i]
    elif kind == "insert":
        changed = blob[:i] + value.to_bytes(8, "little") + blob[i:]
    else:  # two rows' ids exchanged: a permutation still, of the wrong rows
        ids_at = faiss_fields(blob)["ids"] + 8
        ids = np.frombuffer(blob, "<i8", COUNT, ids_at).copy()
        a, b = i % COUNT, value % COUNT
        ids[[a, b]] = ids[[b, a]]
        changed = blob[:ids_at] + ids.tobytes() + blob[ids_at + ids.nbytes:]
    found = attempt(tmp_path, {**original, ".faiss": changed}, ann_search)
    if not isinstance(found, Exception):
        ix, queries, result = found
        rows = np.asarray(ix.embeddings)
        for q, hits, scores in zip(queries, result.rows, result.scores):
            kept = hits[hits >= 0]
            assert len(set(kept.tolist())) == len(kept) and (kept < COUNT).all()
            np.testing.assert_allclose(scores[hits >= 0], rows[kept] @ q, rtol=1e-5, atol=1e-6)


@FUZZ
@given(field=st.sampled_from(["embeddings_sha256", "count", "dims", "ef_search", "recall_at_10", "recall_k"]),
       value=JUNK, drop=st.booleans())
def test_fuzzed_faiss_description(original, tmp_path, field, value, drop):
    TRIED["faiss description"] += 1
    info = json.loads(original[".faiss.json"])
    if drop:
        info.pop(field, None)
    else:
        info[field] = value
    found = attempt(tmp_path, {**original, ".faiss.json": json.dumps(info).encode()}, ann_search)
    if not isinstance(found, Exception):
        assert found[2].method == "ann"


@FUZZ
@given(values=st.lists(st.tuples(st.sampled_from(["shard", "shard_rows", "shard_of", "shard_inputs_sha256",
                                                  "shard_tars", "shard_of_tars"]),
                                 st.text(max_size=12) | st.sampled_from(["0/2", "1/2", "0:3", "3:6", "6", "²",
                                                                         "999999999", "0/999999999", "a" * 64])),
                       min_size=1, max_size=4), part=st.integers(0, 1))
def test_fuzzed_shard_headers(tmp_path, values, part):
    """Two shards whose headers a stranger wrote: merged only when they are the two halves of one input list."""
    TRIED["index shards"] += 1
    paths = [tmp_path / f"s{i}.safetensors" for i in range(2)]
    for i, path in enumerate(paths):
        metadata = {"shard": f"{i}/2", "shard_rows": f"{3 * i}:{3 * i + 3}", "shard_of": "6",
                    "shard_inputs_sha256": "f" * 64}
        if i == part:
            metadata.update(values)
        with index.IndexWriter(path, 4, "image", metadata) as writer:
            writer.add(unit_rows(3, 4, seed=i), ["a", "b", "c"])
    out = tmp_path / "m.safetensors"
    if out.exists():
        os.remove(out)
    started = time.perf_counter()
    try:
        merged = index.merge(paths, out)
    except DOCUMENTED as e:
        assert "s0.safetensors" in str(e) or "s1.safetensors" in str(e) or "shard" in str(e), str(e)
        assert not out.exists() and len(str(e)) < 1000
    else:
        shards = [index.open_index(p).metadata for p in paths]
        assert [m["shard"] for m in shards] == ["0/2", "1/2"] and merged.count == 6
        assert shards[0]["shard_inputs_sha256"] == shards[1]["shard_inputs_sha256"]
    assert time.perf_counter() - started < SECONDS
