"""Hostile embedding indexes and faiss files (issue 22): a NAME.faiss whose lengths would make faiss allocate
gigabytes, whose id map or graph is wrong; rows changed after they were written (exact search, merge, ANN);
shards of other inputs; temporary files of a killed writer; names that are not text; each ends in a one-line
documented error naming the file, or in the safe behaviour."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dualenc import files
from dualenc.search import ann
from dualenc.search import index
from dualenc.search import store as index_file
from dualenc.errors import CheckpointError, InputError

COUNT, DIMS = 300, 8


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write(path, embeds, names, **metadata):
    with index.IndexWriter(path, embeds.shape[1], "image", metadata) as writer:
        writer.add(embeds, names)
    return index.open_index(path)


def peak_growth_kib(fn):
    """Runs fn; returns how far this process's peak resident memory rose over what it held when fn started
    (Linux: VmHWM, reset through /proc/self/clear_refs), and fn's error if it raised one."""
    def high_water():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, error = high_water(), None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller checks which
        error = e
    return high_water() - before, error


def faiss_fields(blob):
    """Where each field of a NAME.faiss as ann.build writes it starts (a vector: at its uint64 length); read
    here independently of dualenc.search.ann."""
    fields, at = {}, 0

    def header(name):
        nonlocal at
        fields[name] = at
        at += 37  # fourcc, d, ntotal, two unused int64, is_trained, metric

    def vector(name, itemsize):
        nonlocal at
        fields[name] = at
        at += 8 + struct.unpack_from("<Q", blob, at)[0] * itemsize

    header("IxMp")
    header("IHNf")
    for name, itemsize in (("probas", 8), ("cum", 4), ("levels", 4), ("offsets", 8), ("neighbours", 4)):
        vector(name, itemsize)
    fields["entry"], at = at, at + 20
    header("IxFI")
    vector("stored", 4)
    vector("ids", 8)
    assert at == len(blob)
    return fields


def array(blob, fields, name, dtype):
    (n,) = struct.unpack_from("<Q", blob, fields[name])
    return np.frombuffer(blob, dtype, n, fields[name] + 8).copy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 300 x 8 index with its ANN index: (the index's path, the .faiss bytes, their fields)."""
    path = tmp_path_factory.mktemp("ann") / "a.safetensors"
    ann.build(write(path, unit_rows(COUNT, DIMS), [str(i) for i in range(COUNT)]))
    blob = (path.parent / "a.faiss").read_bytes()
    return path, blob, faiss_fields(blob)


def search_with(built, tmp_path, blob, queries=None, info=None):
    """Copies the index beside a NAME.faiss holding `blob`; returns the ANN search's result."""
    path = built[0]
    for suffix in (".safetensors", ".names.jsonl", ".faiss.json"):
        (tmp_path / f"a{suffix}").write_bytes(path.with_name(f"a{suffix}").read_bytes())
    (tmp_path / "a.faiss").write_bytes(blob)
    if info is not None:
        (tmp_path / "a.faiss.json").write_text(json.dumps(info))
    ix = index.open_index(tmp_path / "a.safetensors")
    return index.search(ix, ix.embeddings[:4] if queries is None else queries, 5, ann=True)


def with_length(blob, at, n):
    return blob[:at] + struct.pack("<Q", n) + blob[at + 8:]


def test_a_faiss_file_cannot_make_faiss_allocate_past_its_size(built, tmp_path):
    """One 8-byte length changed (the offsets' here, 32M entries: 256 MB) made faiss allocate them before it
    found the file too short; a header fuzzed the same way. dualenc reads the lengths first."""
    _, blob, fields = built
    assert search_with(built, tmp_path, blob).method == "ann"  # the file as built searches
    for name in ("offsets", "ids", "probas"):
        grew, error = peak_growth_kib(lambda: search_with(built, tmp_path, with_length(blob, fields[name], 1 << 25)))
        assert isinstance(error, CheckpointError) and "a.faiss" in str(error), error
        assert "past its end" in str(error) or "holds" in str(error), error
        assert grew < 64 << 10, (name, grew)  # KiB: nothing near the 256 MB declared
    header = bytearray(blob)
    header[fields["IHNf"] + 8:fields["IHNf"] + 16] = struct.pack("<q", 1 << 40)  # ntotal
    with pytest.raises(CheckpointError, match=r"a.faiss .*holds 1099511627776 x 8 vectors"):
        search_with(built, tmp_path, bytes(header))
    with pytest.raises(CheckpointError, match="a.faiss .*bytes follow its end"):
        search_with(built, tmp_path, blob + b"\0" * 8)
    with pytest.raises(CheckpointError, match="a.faiss .*past its end"):
        search_with(built, tmp_path, blob[:-3])


def test_the_id_map_must_be_a_permutation_of_the_rows(built, tmp_path):
    """Out-of-range ids were a traceback, negative ones no result, a repeated one the same row k times."""
    _, blob, fields = built
    ids = array(blob, fields, "ids", "<i8")
    at = fields["ids"] + 8
    for bad in ({0: COUNT + 5}, {0: -1}, {1: ids[0]}):
        changed = ids.copy()
        for i, v in bad.items():
            changed[i] = v
        with pytest.raises(CheckpointError, match="a.faiss .*id map is not a permutation"):
            search_with(built, tmp_path, blob[:at] + changed.tobytes() + blob[at + changed.nbytes:])


def test_a_graph_a_search_could_walk_out_of_is_refused(built, tmp_path):
    _, blob, fields = built
    levels = array(blob, fields, "levels", "<i4")
    cum = array(blob, fields, "cum", "<i4")
    offsets = array(blob, fields, "offsets", "<u8")
    upper = np.flatnonzero(levels >= 2)  # nodes on level 1 too
    assert len(upper) and (levels == 1).any()
    slot = fields["neighbours"] + 8 + 4 * (int(offsets[upper[0]]) + int(cum[1]))  # its first level-1 neighbour
    lower = int(np.flatnonzero(levels == 1)[0])  # a node on level 0 only
    cases = {"a neighbour at level 1 is not on that level": (slot, struct.pack("<i", lower)),
             "a neighbour is outside -1 to 299": (slot, struct.pack("<i", COUNT)),
             "entry point": (fields["entry"], struct.pack("<i", lower)),
             "offsets do not match": (fields["offsets"] + 16, struct.pack("<Q", 7))}
    for message, (at, value) in cases.items():
        with pytest.raises(CheckpointError, match=f"a.faiss .*{message}"):
            search_with(built, tmp_path, blob[:at] + value + blob[at + len(value):])
    info = json.loads(built[0].with_name("a.faiss.json").read_text())
    for field, value in (("ef_search", 10 ** 12), ("ef_search", 0), ("recall_at_10", float("nan"))):
        with pytest.raises(CheckpointError, match=f"a.faiss.json: missing or mistyped {field}"):
            search_with(built, tmp_path, blob, info={**info, field: value})


def test_a_row_changed_beside_its_ann_index_is_an_error(built, tmp_path):
    _, blob, _ = built
    x = unit_rows(COUNT, DIMS)
    assert search_with(built, tmp_path, blob, queries=x[:1]).rows[0, 0] == 0
    data = bytearray((tmp_path / "a.safetensors").read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:start + 4 * DIMS] = np.full(DIMS, 0.5, np.float32).tobytes()  # row 0
    (tmp_path / "a.safetensors").write_bytes(bytes(data))
    ix = index.open_index(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="a.safetensors: row 0 differs from its copy in .*a.faiss"):
        index.search(ix, x[:1], 5, ann=True)


def test_rows_changed_after_writing_are_an_error_not_a_ranking(tmp_path, monkeypatch):
    """A row overwritten with the query ranked first; merge wrote a fresh checksum over it. Exact search (every
    block size) and merge check the rows against embeddings_sha256 as they stream; merge writes nothing."""
    x = unit_rows(COUNT, DIMS)
    path = tmp_path / "a.safetensors"
    write(path, x, [str(i) for i in range(COUNT)])
    query = unit_rows(1, DIMS, seed=9)
    data = bytearray(path.read_bytes())
    at = 8 + struct.unpack("<Q", data[:8])[0] + 4 * DIMS * 123
    data[at:at + 4 * DIMS] = query.tobytes()
    path.write_bytes(bytes(data))
    ix = index.open_index(path)
    assert index.search_exact(ix.embeddings, query, 1)[1][0, 0] == 123  # the tampered row would rank first
    for chunk in (index_file._CHUNK_BYTES, 4096):
        monkeypatch.setattr(index_file, "_CHUNK_BYTES", chunk)
        with pytest.raises(CheckpointError, match="a.safetensors: its rows do not hash to the embeddings_sha256"):
            index.search(ix, query, 5, ann=False)
    with pytest.raises(CheckpointError, match="a.safetensors: its rows do not hash"):
        index.merge([path], tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.names.jsonl", "a.safetensors"]
    with pytest.raises(CheckpointError, match="a.safetensors: its rows do not hash"):
        ann.build(ix)
    assert sorted(os.listdir(tmp_path)) == ["a.names.jsonl", "a.safetensors"]


def shard(path, i, n, inputs, rows="0:10", of="10"):
    return write(path, unit_rows(10, 4, seed=i), [f"{i}-{j}" for j in range(10)], shard=f"{i}/{n}", shard_rows=rows,
                 shard_of=of, shard_inputs_sha256=index.inputs_fingerprint(inputs))


def test_shards_of_other_inputs_or_hostile_splits_do_not_merge(tmp_path):
    a = [shard(tmp_path / "a0.safetensors", 0, 2, ["x", "y"], "0:10", "20"),
         shard(tmp_path / "a1.safetensors", 1, 2, ["x", "y"], "10:20", "20")]
    b1 = shard(tmp_path / "b1.safetensors", 1, 2, ["x", "z"], "10:20", "20")  # same count, other inputs
    assert index.merge([ix.path for ix in a], tmp_path / "m.safetensors").count == 20
    with pytest.raises(InputError, match="the shards were cut from different inputs .*a0.safetensors.*b1.safetensors"):
        index.merge([a[0].path, b1.path], tmp_path / "x.safetensors")
    for split in ("²", "9" * 5000, "999999999"):  # int('²') raised; a huge N built a list of N names
        parts = [shard(tmp_path / f"h{i}.safetensors", i, split, ["x"]) for i in range(2)]
        started = time.perf_counter()
        with pytest.raises(InputError, match="h0.safetensors") as error:
            index.merge([ix.path for ix in parts], tmp_path / "x.safetensors")
        assert time.perf_counter() - started < 1 and len(str(error.value)) < 500, str(error.value)[:500]
    assert not (tmp_path / "x.safetensors").exists()


def test_a_killed_writer_leaves_temporaries_the_next_one_removes(tmp_path):
    """A process killed mid-write (SIGKILL: no cleanup) left two hidden temporary files that nothing removed.
    They name their process; the next writer of that index removes those of dead processes, not a live
    process's, nor another file's (another host's part, on a shared folder)."""
    script = textwrap.dedent("""
        import os, signal, sys
        import numpy as np
        from dualenc.search import index
        writer = index.IndexWriter(sys.argv[1], 4, "image")
        writer.add(np.ones((3, 4), np.float32), ["a", "b", "c"])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a.safetensors")],
                              stderr=subprocess.PIPE)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read().decode()[-2000:]
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(name.startswith(".a.") and str(killed.pid) in name for name in left), left
    mark = files.TMP_MARK
    kept = [f".a.safetensors{mark}{os.getpid()}-0000", f".b.safetensors{mark}{killed.pid}-0000",
            f".a.safetensors{mark}99999999999999999999-0000"]
    for name in kept:
        (tmp_path / name).write_bytes(b"")
    write(tmp_path / "a.safetensors", unit_rows(3, 4), ["a", "b", "c"])
    assert sorted(os.listdir(tmp_path)) == sorted(["a.names.jsonl", "a.safetensors", *kept])


def test_names_that_are_not_text_and_lines_that_do_not_end(tmp_path, monkeypatch):
    x = unit_rows(3, 4)
    escaped = "caf\udce9.png"  # a tar member's non-UTF-8 name, as Python reads it: kept, printable as \xe9
    assert write(tmp_path / "a.safetensors", x, [escaped, "b", "c"]).names() == [escaped, "b", "c"]
    with pytest.raises(InputError, match="names must be text"):
        write(tmp_path / "b.safetensors", x, ["\ud800", "b", "c"])
    sidecar = tmp_path / "a.names.jsonl"
    for content, message in [('"\\ud800"\n"b"\n"c"\n', "line 1 holds a name that is not text"),
                             ('"a"\n"b"\n"c"', "holds 3 names for 3 embeddings, its last unterminated"),
                             ("[" * 100_000 + "\n" + '"b"\n"c"\n', "line 1 is not a JSON string")]:
        sidecar.write_text(content)
        # without its checksum, as files written before it was recorded: the reader checks what it reads
        monkeypatch.setattr(files, "read_safetensors_header", _without("names_sha256"))
        with pytest.raises(CheckpointError, match=message):
            index.open_index(tmp_path / "a.safetensors").names()
        monkeypatch.undo()
    monkeypatch.setattr(index_file, "MAX_NAME_BYTES", 64)
    sidecar.write_text('"a"\n"' + "x" * 100 + '"\n"c"\n')
    monkeypatch.setattr(files, "read_safetensors_header", _without("names_sha256"))
    with pytest.raises(CheckpointError, match="a.names.jsonl: line 2 is 64 bytes long or more"):
        index.open_index(tmp_path / "a.safetensors").names()


def _without(field):
    read = files.read_safetensors_header

    def reader(path):
        entries, start, metadata = read(path)
        return entries, start, {k: v for k, v in metadata.items() if k != field}
    return reader


def test_a_legacy_header_nested_deep_and_a_file_cut_while_opening_name_the_file(tmp_path, monkeypatch):
    x = unit_rows(2, 4)
    legacy = tmp_path / "old.safetensors"
    files.write_safetensors(str(legacy), {"embeddings": x}, {"names": json.dumps(["a", "b"]), "kind": "image"})
    assert index.open_index(legacy).names() == ["a", "b"]  # names in the header, as written before the sidecar
    files.write_safetensors(str(legacy), {"embeddings": x}, {"names": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="old.safetensors: its names .*are not valid JSON"):
        index.open_index(legacy)
    path = tmp_path / "a.safetensors"
    write(path, x, ["a", "b"])
    read = files.read_safetensors_header

    def read_then_cut(p):  # the file shrinks between its header's check and the mapping of its rows
        found = read(p)
        os.truncate(p, os.path.getsize(p) - 8)
        return found
    monkeypatch.setattr(files, "read_safetensors_header", read_then_cut)
    with pytest.raises(CheckpointError, match="a.safetensors: its rows cannot be mapped"):
        index.open_index(path)
