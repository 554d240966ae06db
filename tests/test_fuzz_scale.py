"""Fuzzing the formats of data at scale (hypothesis, bounded, counted with test_fuzz's): prepared folders (their
manifest and ArrayRecord shards), LiT caches (cache.json and part files) and hub cache refs end in dualenc's
documented errors naming the file, or read what was written; never a traceback, never a file outside."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, strategies as st
from test_fuzz import DOCUMENTED, FUZZ, JUNK, TRIED
from test_hostile_records import DIM, KEY, ROWS, _png, open_cache, write_cache, write_folder

from dualenc.data import RecordSource, encode_record
from dualenc.data.pipeline import RecordReader, Unusable
from dualenc.errors import DataError

MANIFEST_FIELDS = ["format", "version", "complete", "records", "image_root", "shards", "skipped"]
SHARD_FIELDS = ["file", "records", "input", "skipped"]
ROOTS = ["/", "..", "../..", "images/..", "images/../..", ".", "images", "images/../../prepared/images", "//",
         "images/\x00", "../prepared/images"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A prepared folder: 4 records carrying their image bytes, 4 naming images under the folder's images/."""
    folder = tmp_path_factory.mktemp("fuzz-scale") / "prepared"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(_png("red"))
    records = [encode_record(f"b{i}", [f"bytes {i}"], _png("blue")) for i in range(4)]
    records += [encode_record(f"p{i}", [f"path {i}"], path="a.png") for i in range(4)]
    return write_folder(folder, records, "images", shards=2)


def _copy(template, tmp_path):
    folder = tmp_path / "prepared"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(template, folder, symlinks=True)
    return folder


def _read_everything(folder):
    """Opens the folder as `embed` and `train` do and reads every record and image path; checks that nothing
    outside the folder is named, and that every documented error names a file of the folder."""
    try:
        source = RecordSource(folder)
        reader = RecordReader(source, processor=None)
        for i in range(len(source)):
            try:
                image, _ = reader.read(i)
            except Unusable:  # replaced and counted by the pipeline
                continue
            except DataError as e:
                if "no image root" in str(e):  # a path record in a folder whose manifest names no image root
                    continue
                raise
            if isinstance(image, str):
                real = os.path.realpath(image)
                assert real.startswith(os.path.realpath(folder) + os.sep), image
        source.__getitems__(list(range(len(source))))
    except DOCUMENTED as e:
        assert str(folder) in str(e) and "\n" not in str(e), str(e)


@FUZZ
@given(field=st.sampled_from(MANIFEST_FIELDS + SHARD_FIELDS), value=JUNK | st.sampled_from(ROOTS),
       shard=st.integers(0, 1), drop=st.booleans(), recount=st.booleans())
def test_fuzzed_manifest(template, tmp_path, field, value, shard, drop, recount):
    TRIED["prepared manifest"] += 1
    folder = _copy(template, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    target = manifest["shards"][shard] if field in SHARD_FIELDS else manifest
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    counts = [s.get("records") if isinstance(s, dict) else None for s in shards]
    if recount and all(type(c) is int for c in counts):  # the total agreeing with the shards' counts
        manifest["records"] = sum(counts)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _read_everything(folder)


@FUZZ
@given(shard=st.integers(0, 1), kind=st.sampled_from(["truncate", "overwrite", "random", "append"]),
       where=st.floats(0, 1), noise=st.binary(min_size=1, max_size=256), size=st.integers(0, 70_000))
def test_fuzzed_shard(template, tmp_path, shard, kind, where, noise, size):
    TRIED["prepared shard"] += 1
    folder = _copy(template, tmp_path)
    path = folder / f"shard-{shard:05d}.array_record"
    blob = path.read_bytes()
    at = int(where * len(blob))
    if kind == "truncate":
        blob = blob[:at]
    elif kind == "overwrite":
        blob = blob[:at] + noise + blob[at + len(noise):]
    elif kind == "random":
        blob = (noise * (size // len(noise) + 1))[:size]
    else:
        blob = blob + noise
    path.write_bytes(blob)
    _read_everything(folder)


# --------------------------------------------------------------------------------------------------- LiT caches

@pytest.fixture(scope="module")
def lit_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-lit") / "lit"
    return folder, write_cache(folder)


def _open_or_refuse(folder, expected):
    """A cache opens (verified) to exactly what was written, or is refused by an error naming its folder."""
    try:
        cache = open_cache(folder)
    except DOCUMENTED as e:
        assert str(folder) in str(e) and "\n" not in str(e) and "pickle" not in str(e), str(e)
        return
    rows = [cache.row(i) for i in range(ROWS)]
    np.testing.assert_array_equal(np.stack([r if r is not None else np.full(DIM, np.nan) for r in rows]), expected)


@FUZZ
@given(field=st.sampled_from(["fingerprint", "records", "dim", "parts", "name", "start", "stop", "sha256",
                              "features", "valid"]),
       value=JUNK | st.sampled_from(["../lit/part-00000-of-00002", "part-00001-of-00002", "0" * 64, 5, 0, 10]),
       part=st.integers(0, 1), drop=st.booleans())
def test_fuzzed_lit_index(lit_template, tmp_path, field, value, part, drop):
    TRIED["LiT cache.json"] += 1
    template, expected = lit_template
    folder = tmp_path / "lit"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(template, folder)
    meta = json.loads((folder / "cache.json").read_text())
    entry = meta["parts"][part]
    target = {"name": entry, "start": entry, "stop": entry, "sha256": entry, "features": entry["sha256"],
              "valid": entry["sha256"]}.get(field, meta)
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (folder / "cache.json").write_text(json.dumps(meta))
    _open_or_refuse(folder, expected)


@FUZZ
@given(file=st.sampled_from(["part-00000-of-00002.npy", "part-00001-of-00002.valid.npy",
                             "part-00001-of-00002.npy"]),
       kind=st.sampled_from(["truncate", "overwrite", "header", "append"]), where=st.floats(0, 1),
       noise=st.binary(min_size=1, max_size=64))
def test_fuzzed_lit_part(lit_template, tmp_path, file, kind, where, noise):
    TRIED["LiT cache part"] += 1
    template, expected = lit_template
    folder = tmp_path / "lit"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(template, folder)
    path = folder / file
    blob = path.read_bytes()
    at = int(where * (128 if kind == "header" else len(blob)))  # numpy's header is the first 128 bytes
    if kind == "truncate":
        blob = blob[:at]
    elif kind in ("overwrite", "header"):
        blob = blob[:at] + noise + blob[at + len(noise):]
    else:
        blob = blob + noise
    path.write_bytes(blob)
    _open_or_refuse(folder, expected)


# ------------------------------------------------------------------------------------------------ hub cache refs

@FUZZ
@given(ref=st.binary(max_size=80) | st.sampled_from([b"../../..", b"/", b"0" * 40, b"1" * 40 + b"/..",
                                                      b"../snapshots/" + b"1" * 40]))
def test_fuzzed_hub_ref(tmp_path, monkeypatch, ref):
    TRIED["hub cache ref"] += 1
    from huggingface_hub import constants

    from dualenc import hub

    commit = "1" * 40
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_bytes(ref)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        path = hub.resolve("org/name")
    except DOCUMENTED as e:
        assert "\n" not in str(e) and ("refs/main" in str(e) or "org/name" in str(e)), str(e)
        return
    assert path == str(repo / "snapshots" / commit) and ref == commit.encode()
