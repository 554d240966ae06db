"""dualenc.data: webdataset tars and caption files prepared into ArrayRecord shards, read back by RecordSource."""

import collections
import io
import json
import os
import pickle
import tarfile
import threading

import pytest
from PIL import Image

import dualenc.data
from dualenc.cli import main
from dualenc.data import (
    RecordSource,
    decode_record,
    encode_record,
    expand_shards,
    iter_tar,
    prepare,
    record_image_path,
)
from dualenc.errors import DataError


def _image(fmt, color):
    out = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(out, fmt)
    return out.getvalue()


def _tar(path, members, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Three tars: one with a sample lacking a caption and one lacking an image, a gzipped one, a truncated one.
    Returns (paths, {key: (captions, image bytes, ext, label)} of the usable samples)."""
    red, blue, white = _image("JPEG", "red"), _image("PNG", "blue"), _image("JPEG", "white")
    a = _tar(tmp_path / "data-00000.tar", [
        ("000.jpg", red), ("000.txt", b"a red square\n"),
        ("001.png", blue), ("001.json", json.dumps({"caption": "a blue square", "label": 3}).encode()),
        ("002.jpg", red),  # no caption
        ("003.txt", b"a caption without its image"),
        ("004.jpg", white), ("004.txt", b"white"), ("004.cls", b"7\n"), ("004.foo", b"ignored"),
    ])
    b = _tar(tmp_path / "data-00001.tar.gz", [("x/100.png", blue), ("x/100.txt", "caf\u00e9".encode())], "w:gz")
    whole = _tar(tmp_path / "whole.tar", [(f"2{i:02d}.{ext}", blue if ext == "png" else f"sample {i}".encode())
                                          for i in range(3) for ext in ("png", "txt")])
    raw = open(whole, "rb").read()
    c = tmp_path / "data-00002.tar"
    c.write_bytes(raw[:4096 + 512 + 30])  # each sample takes 2048 bytes: the third is cut inside its image
    os.unlink(whole)
    expected = {"000": (("a red square",), red, "jpg", None), "001": (("a blue square",), blue, "png", "3"),
                "004": (("white",), white, "jpg", "7"), "x/100": (("caf\u00e9",), blue, "png", None),
                "200": (("sample 0",), blue, "png", None), "201": (("sample 1",), blue, "png", None)}
    return [a, b, str(c)], expected


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_iter_tar_skips_and_counts_damage(shards):
    (a, b, c), _ = shards
    skipped = collections.Counter()
    assert [s.key for s in iter_tar(a, skipped)] == ["000", "001", "004"]
    assert skipped == {"no caption": 1, "no image": 1}
    skipped = collections.Counter()
    assert [s.key for s in iter_tar(c, skipped)] == ["200", "201"]  # what came before the damage
    assert skipped == {"truncated tar": 1}
    garbage = os.path.join(os.path.dirname(a), "garbage.tar")
    open(garbage, "wb").write(b"not a tar" * 100)
    skipped = collections.Counter()
    assert list(iter_tar(garbage, skipped)) == [] and skipped == {"not a tar": 1}


def test_prepare_tars_round_trip_and_resume(shards, tmp_path):
    paths, expected = shards
    out = tmp_path / "prepared"
    manifest = prepare(paths, out)
    assert manifest == _manifest(out) and manifest["complete"]
    assert manifest["records"] == 6 and [s["records"] for s in manifest["shards"]] == [3, 1, 2]
    assert manifest["skipped"] == {"no caption": 1, "no image": 1, "truncated tar": 1}
    assert [s["input"] for s in manifest["shards"]] == [os.path.abspath(p) for p in paths]
    assert manifest["image_root"] is None and manifest["format"] == "dualenc-records" and manifest["version"] == 1

    src = RecordSource(out)
    assert len(src) == 6 and src.image_root is None
    for i in range(len(src)):
        record = decode_record(src[i])
        captions, image, ext, label = expected[record.key]
        assert src[i] == encode_record(record.key, list(captions), image, label=label, ext=ext)
        assert (record.captions, record.image, record.ext, record.label, record.path) == (captions, image, ext,
                                                                                          label, None)
    assert src.__getitems__([5, 0, 3]) == [src[5], src[0], src[-3]]
    with pytest.raises(IndexError):
        src[6]

    clone = pickle.loads(pickle.dumps(src))  # as grain sends it to a worker process: readers are not pickled
    assert [clone[i] for i in range(6)] == [src[i] for i in range(6)]
    results = []
    threads = [threading.Thread(target=lambda: results.append([clone[i % 6] for i in range(30)])) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r == results[0] for r in results) and len(results) == 4

    # A run killed before its last shard: the rerun keeps the finished shards and redoes the last one.
    os.unlink(out / manifest["shards"][-1]["file"])
    (out / ".shard-00002.array_record.tmp").write_bytes(b"half a shard")
    seen = []
    assert prepare(paths, out, progress=lambda entry, reused: seen.append(reused)) == manifest
    assert seen == [True, True, False] and not (out / ".shard-00002.array_record.tmp").exists()
    assert RecordSource(out)[5] == src[5]

    with pytest.raises(DataError, match="other inputs"):
        prepare(paths[:2], out)
    os.unlink(out / "shard-00001.array_record")
    with pytest.raises(DataError, match="shard file not found: .*shard-00001"):
        RecordSource(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        RecordSource(out)


def test_prepare_streams_caption_files(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(_image("PNG", "red"))
    (tmp_path / "x.png").write_bytes(_image("PNG", "blue"))
    rows = [{"image": "images/a.png", "caption": "a red square", "label": "red"},
            {"file_name": "images/b.png", "captions": ["one", "two", ""]},  # b.png is missing: not looked at
            {"image": "../x.png", "caption": "outside"},
            {"image": "images/a.png", "caption": "  "},
            {"caption": "no image"},
            {"image": "images/a.png", "text": "again"}]
    lines = [json.dumps(r) for r in rows[:3]] + ["{broken", ""] + [json.dumps(r) for r in rows[3:]]
    jsonl = data / "pairs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(dualenc.data.pairs, "MAX_CAPTION_FILE", 16)  # read_pairs refuses it now; prepare streams it
    with pytest.raises(DataError, match="over"):
        dualenc.data.read_pairs(jsonl)

    out = tmp_path / "out"
    manifest = prepare([str(jsonl)], out, records_per_shard=2)
    assert manifest["records"] == 3 and [s["records"] for s in manifest["shards"]] == [2, 1]
    assert manifest["skipped"] == {"path outside the data folder": 1, "malformed row": 1, "empty caption": 1,
                                   "no image": 1}
    src = RecordSource(out, image_root=data)  # outside the prepared folder: named by the caller
    assert src.image_root == str(data)
    records = [decode_record(src[i]) for i in range(len(src))]
    assert [(r.path, r.captions, r.label, r.image) for r in records] == [
        ("images/a.png", ("a red square",), "red", None), ("images/b.png", ("one", "two"), None, None),
        ("images/a.png", ("again",), None, None)]
    assert record_image_path(records[0], src.image_root) == str(data / "images" / "a.png")

    os.unlink(out / "shard-00001.array_record")  # resumes from the byte offset where shard 0 ended
    assert prepare([str(jsonl)], out, records_per_shard=2) == manifest

    allowed = prepare([str(jsonl)], tmp_path / "allowed", allow_outside=True)
    assert allowed["records"] == 4 and allowed["image_root"] == os.path.abspath(os.sep)
    outside = decode_record(RecordSource(tmp_path / "allowed", allow_outside=True)[2])
    assert record_image_path(outside, os.sep) == str(tmp_path / "x.png")

    csv_file = data / "pairs.csv"
    csv_file.write_text('filepath,caption\nimages/a.png,"two\nlines"\nimages/a.png,\n,orphan\nimages/a.png,"x"\n')
    manifest = prepare([str(csv_file)], tmp_path / "csv", records_per_shard=1)
    assert manifest["records"] == 2 and manifest["skipped"] == {"empty caption": 1, "no image": 1}
    assert decode_record(RecordSource(tmp_path / "csv", image_root=data)[0]).captions == ("two\nlines",)
    os.unlink(tmp_path / "csv" / "shard-00001.array_record")  # resumes after the header and the first record
    assert prepare([str(csv_file)], tmp_path / "csv", records_per_shard=1) == manifest


def test_caption_lines_that_are_too_long_or_not_utf8_are_skipped(tmp_path, monkeypatch):
    from dualenc.data import captions

    monkeypatch.setattr(captions, "MAX_LINE", 100)
    good = json.dumps({"image": "a.png", "caption": "fine"}).encode()
    long = json.dumps({"image": "a.png", "caption": "x" * 300}).encode()
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join([good, long, b'{"image": "\xff.png"}', good]) + b"\n")
    manifest = prepare([str(tmp_path / "pairs.jsonl")], tmp_path / "out")
    assert manifest["records"] == 2 and manifest["skipped"] == {"malformed row": 2}


def test_records_are_strict():
    data = encode_record("k", ["a cat"], b"\x89PNG...", label="cat", ext="png")
    assert decode_record(data) == ("k", ("a cat",), b"\x89PNG...", None, "cat", "png")
    assert decode_record(encode_record("k", ["a"], path="sub/a.png")).path == "sub/a.png"
    for bad, message in [(data[:6], "truncated"), (data[:20], "truncated"), (data[:-1], "truncated"),
                         (b"XXXX" + data[4:], "not a dualenc record"), (data[:8] + b"[" + data[9:], "JSON")]:
        with pytest.raises(DataError, match=message):
            decode_record(bad)
    for kwargs in [{"path": "/etc/passwd"}, {"path": "../x.png"}, {"path": "a/../../x"}, {"path": "a\x00b"},
                   {"path": "a.png", "image": b"x"}, {}]:
        with pytest.raises(DataError):
            encode_record("k", ["a cat"], **kwargs)
    with pytest.raises(DataError, match="caption"):
        encode_record("k", [], b"x")


def test_expand_shards(tmp_path):
    for i in range(12):
        (tmp_path / f"d-{i:03d}.tar").write_bytes(b"")
    paths = expand_shards(str(tmp_path / "d-{000..009}.tar"))
    assert paths == [str(tmp_path / f"d-{i:03d}.tar") for i in range(10)]
    assert expand_shards([str(tmp_path / "d-01*.tar"), str(tmp_path / "d-{002,000}.tar")]) == [
        str(tmp_path / n) for n in ("d-010.tar", "d-011.tar", "d-002.tar", "d-000.tar")]
    with pytest.raises(DataError, match="nothing|no file"):
        expand_shards(str(tmp_path / "e-*.tar"))
    with pytest.raises(DataError, match="d-012.tar"):
        expand_shards(str(tmp_path / "d-{010..012}.tar"))


def test_cli_prepare(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")
    paths, _ = shards
    pattern = os.path.join(os.path.dirname(paths[0]), "data-0000{0,2}.tar")
    out = tmp_path / "cli"
    assert main(["prepare", pattern, "--out", out, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["records"] == 5 and [s["records"] for s in summary["shards"]] == [3, 2]
    assert "5 records in 2 shards" in captured.err and "truncated tar 1" in captured.err
    assert main(["prepare", paths[0], "--out", out]) == 2
    assert "other inputs" in capsys.readouterr().err
