"""Hostile prepared folders, hub caches and LiT caches (issue 22): a manifest's image root, damaged ArrayRecord
shards, a hub ref pointing out of the cache, damaged LiT cache parts; each ends in a one-line documented error
naming the file, or in records skipped and counted."""

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from dualenc.data import RecordSource, decode_record, encode_record, prepare
from dualenc.train import lit_cache
from dualenc.data.pipeline import RecordReader, Unusable
from dualenc.data.prepare import _Shard
from dualenc.data.records import record_image
from dualenc.errors import CheckpointError, DataError


def _png(color):
    out = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(out, "PNG")
    return out.getvalue()


def write_folder(folder, records, image_root, shards=1):
    """A prepared folder as a stranger may hand it over: `records` (bytes) split over `shards` shards."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i in range(shards):
        part = records[i * len(records) // shards:(i + 1) * len(records) // shards]
        shard = _Shard(str(folder), i)
        for record in part:
            shard.write(record)
        shard.finish()
        entries.append({"file": shard.file, "records": len(part), "input": f"/data/{i}.jsonl", "skipped": {}})
    manifest = {"format": "dualenc-records", "version": 1, "complete": True, "records": len(records),
                "skipped": {}, "inputs": [], "records_per_shard": 10, "image_root": image_root,
                "allow_outside": False, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def secret(tmp_path):
    """A private image outside every data folder."""
    path = tmp_path / "home" / "private.png"
    path.parent.mkdir()
    path.write_bytes(_png("red"))
    return path


# ----------------------------------------------------------------------------------- 4: the manifest's image root

@pytest.mark.parametrize("root", ["/", "../..", "..", "%s"])
def test_a_manifest_cannot_move_the_image_root_out_of_its_folder(tmp_path, secret, root):
    folder = tmp_path / "a" / "prepared"
    folder.mkdir(parents=True)
    root = str(secret.parent) if root == "%s" else root
    resolved = os.path.normpath(os.path.join(folder, root))
    if os.path.commonpath([resolved, secret]) != resolved:
        secret = shutil.copy(secret, os.path.join(resolved, "private.png"))
    write_folder(folder, [encode_record("k", ["a private photo"], path=os.path.relpath(secret, resolved))], root)
    with pytest.raises(DataError) as e:
        RecordSource(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder / "manifest.json") in message and "allow_outside" in message
    from dualenc.cli.index import _record_source# what `dualenc embed --images FOLDER` opens
    from dualenc.cli.training import training_data# what `dualenc train --data FOLDER` opens

    with pytest.raises(DataError, match="image root"):
        _record_source(str(folder), 8, None, False, [])
    with pytest.raises(DataError, match="image root"):
        training_data([str(folder)], str(tmp_path / "out" / "prepared"))
    allowed = RecordSource(folder, allow_outside=True)  # the caller's word moves it
    assert allowed.image_root == resolved
    assert os.path.samefile(record_image(decode_record(allowed[0]), "k", allowed.image_root), secret)
    given = RecordSource(folder, image_root=resolved)  # as does naming the root
    assert given.image_root == resolved
    with pytest.raises(DataError, match="--image-root"):
        RecordSource(folder, image_root=tmp_path / "nowhere")


def _raw_record(key, path):
    """A record naming `path` as it is (encode_record refuses paths leaving the root)."""
    header = json.dumps({"key": key, "captions": ["x"], "size": 0, "path": path}).encode()
    return b"DER1" + len(header).to_bytes(4, "little") + header


def test_a_root_inside_the_folder_is_kept_and_records_leaving_it_are_skipped_and_counted(tmp_path, secret):
    folder = tmp_path / "prepared"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(_png("blue"))
    records = [encode_record("a", ["blue"], path="a.png"), _raw_record("b", "../../home/private.png"),
               _raw_record("c", str(secret)), encode_record("d", ["bytes"], _png("white"))]
    write_folder(folder, records, "images")
    source = RecordSource(folder)
    assert source.image_root == str(folder / "images")
    reader = RecordReader(source, processor=None)
    assert reader.read(0)[0] == str(folder / "images" / "a.png")
    for i in (1, 2):  # never resolved: the pipeline replaces them and counts them
        with pytest.raises(Unusable, match="corrupt record"):
            reader.read(i)
    assert reader.read(3)[1] == ("bytes",)


def test_prepare_then_read_names_the_root_to_pass(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(_png("red"))
    (data / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    prepare([str(data / "pairs.jsonl")], tmp_path / "prepared")
    with pytest.raises(DataError, match=f"its image root {data} lies outside .* --image-root {data},"):
        RecordSource(tmp_path / "prepared")
    source = RecordSource(tmp_path / "prepared", image_root=data)
    assert record_image(decode_record(source[0]), "a", source.image_root) == str(data / "a.png")


def test_a_manifest_cannot_count_more_records_than_its_shards_hold_bytes(tmp_path):
    folder = write_folder(tmp_path / "prepared", [encode_record("k", ["x"], b"x")], None)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["records"] = manifest["records"] = 2 ** 70  # len() of it was an OverflowError
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"shard-00000.array_record is .* bytes and cannot hold the {2 ** 70} "):
        RecordSource(folder)


def test_a_manifest_root_must_be_a_plain_string(tmp_path):
    for root in (7, ["/"], "a\x00b", ""):
        folder = write_folder(tmp_path / f"f{len(os.listdir(tmp_path))}", [encode_record("k", ["x"], b"x")], root)
        with pytest.raises(DataError, match="image_root"):
            RecordSource(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("\n", "a\x00", "../shard-00000.array_record"):  # a shard's name: a printable file name
        manifest.update(image_root=None, shards=[{**manifest["shards"][0], "file": name}])
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="manifest.json: invalid shard entry") as e:
            RecordSource(folder)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- 11: damaged ArrayRecord shards

def _damaged(blob, how):
    rng = np.random.default_rng(len(how))
    if how == "random bytes":
        return rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    if how == "under 64 KB":
        return blob[:40_000]
    if how == "truncated":
        return blob[:-10]
    if how == "empty":
        return b""
    raise ValueError(how)


@pytest.mark.parametrize("how", ["random bytes", "under 64 KB", "truncated", "empty"])
def test_a_damaged_shard_is_a_data_error_naming_it(tmp_path, how):
    folder = write_folder(tmp_path / "prepared", [encode_record(f"k{i}", ["x"], _png("red")) for i in range(6)],
                          None, shards=2)
    shard = folder / "shard-00001.array_record"
    shard.write_bytes(_damaged(shard.read_bytes(), how))
    if how == "empty":  # too small for its records: refused when the folder is opened
        with pytest.raises(DataError, match=f"{shard} is 0 bytes"):
            RecordSource(folder)
        return
    source = RecordSource(folder)
    assert decode_record(source[0]).key == "k0"  # the other shard still reads
    for read in (lambda: source[4], lambda: source.__getitems__([0, 5])):
        with pytest.raises(DataError) as e:
            read()
        assert str(shard) in str(e.value) and "\n" not in str(e.value)
    from dualenc.cli.index import _record_source

    images = _record_source(str(folder), 8, None, False, [])
    with pytest.raises(DataError, match=str(shard)):
        list(images.pairs)
    source.close()


def test_training_batches_over_a_damaged_shard_end_in_a_data_error_naming_it(tmp_path):
    import dualenc
    from dualenc import data
    from dualenc.data import Pipeline

    data.write_vocab(tmp_path / "vocab", ["a red square"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 8, "width": 8}),
                                  dualenc.Tokenizer.from_pretrained(tmp_path / "vocab", max_length=8))
    folder = write_folder(tmp_path / "prepared", [encode_record(f"k{i}", ["a red square"], _png("red"))
                                                  for i in range(8)], None, shards=2)
    shard = folder / "shard-00001.array_record"
    shard.write_bytes(_damaged(shard.read_bytes(), "under 64 KB"))
    with pytest.raises(DataError, match=f"shard file {shard} cannot be read"):
        list(Pipeline(RecordSource(folder), processor, 4, steps=4, process_index=0, process_count=1, threads=2))


def test_a_flipped_shard_byte_is_a_data_error(tmp_path):
    folder = write_folder(tmp_path / "prepared", [encode_record(f"k{i}", ["x"], _png("red")) for i in range(3)], None)
    shard = folder / "shard-00000.array_record"
    blob = bytearray(shard.read_bytes())
    blob[400] ^= 0x10  # inside the first record's chunk: riegeli's hash catches it
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=str(shard)):
        RecordSource(folder).__getitems__([0, 1, 2])


def test_prepare_redoes_a_damaged_shard_on_a_rerun(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(_png("red"))
    (data / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) + "\n"
                                              for i in range(3)))
    out = tmp_path / "prepared"
    manifest = prepare([str(data / "pairs.jsonl")], out, records_per_shard=1)
    for how in ("random bytes", "under 64 KB", "truncated", "empty"):
        shard = out / "shard-00001.array_record"
        shard.write_bytes(_damaged(shard.read_bytes(), how))
        seen = []
        assert prepare([str(data / "pairs.jsonl")], out, records_per_shard=1,
                       progress=lambda entry, kept: seen.append(kept)) == manifest
        assert seen == [True, False, False], how
        assert [decode_record(r).key for r in RecordSource(out, image_root=data).__getitems__(range(3))] == \
            ["0.png", "1.png", "2.png"]


# ------------------------------------------------------------------------------------------ 6 and 9: the LiT cache

KEY = "ab" * 32
ROWS, DIM = 10, 6


def write_cache(folder, count=2):
    """A finished LiT cache of ROWS x DIM features (row i is i + column / 10) built by `count` processes."""
    from dualenc.files import write_json_atomic

    features = np.arange(ROWS, dtype=np.float32)[:, None] + np.arange(DIM, dtype=np.float32) / 10
    valid = np.arange(ROWS) % 4 != 3
    os.makedirs(folder)
    for part in lit_cache.layout(ROWS, count):
        writer = lit_cache._PartWriter(str(folder), part, KEY)
        writer.write(features[part["start"]:part["stop"]], valid[part["start"]:part["stop"]])
        writer.finish()
    write_json_atomic(str(folder / "cache.json"), lit_cache._index(str(folder), KEY, ROWS, count))
    return np.where(valid[:, None], features, np.nan)


def open_cache(folder):
    return lit_cache.FeatureCache(str(folder), fingerprint=KEY, records=ROWS, verify=True)


def _edit_index(folder, edit):
    meta = json.loads((folder / "cache.json").read_text())
    edit(meta)
    (folder / "cache.json").write_text(json.dumps(meta))


def _rewrite(path, edit):
    """Changes the array in a .npy file (and nothing else of the cache)."""
    array = np.load(path)
    np.save(path, edit(array))


def _nan_with_its_checksum(folder):
    _rewrite(folder / "part-00001-of-00002.npy", lambda a: np.where(np.arange(len(a))[:, None] == 2, np.nan, a))
    digest = hashlib.sha256(np.load(folder / "part-00001-of-00002.npy").data).hexdigest()
    _edit_index(folder, lambda m: m["parts"][1]["sha256"].update(features=digest))


def _npy_header(descr, shape):
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def _swap(folder, suffix):
    a, b = folder / f"part-00000-of-00002{suffix}", folder / f"part-00001-of-00002{suffix}"
    os.rename(a, folder / "tmp")
    os.rename(b, a)
    os.rename(folder / "tmp", b)


DAMAGE = {
    "part name leaving the folder": (lambda f: _edit_index(f, lambda m: m["parts"][0].update(
        name="../elsewhere/part-00000-of-00002")), "cache.json"),
    "parts listed out of order": (lambda f: _edit_index(f, lambda m: m["parts"].reverse()), "cache.json"),
    "rows not contiguous": (lambda f: _edit_index(f, lambda m: m["parts"][1].update(start=6)), "cache.json"),
    "a float row index": (lambda f: _edit_index(f, lambda m: m["parts"][1].update(start=5.0)), "cache.json"),
    "no checksum": (lambda f: _edit_index(f, lambda m: m["parts"][0].pop("sha256")), "cache.json"),
    "records": (lambda f: _edit_index(f, lambda m: m.update(records=ROWS + 1)), "cache.json"),
    "swapped part files": (lambda f: _swap(f, ".npy"), "part-00000-of-00002.npy"),
    "swapped valid files": (lambda f: _swap(f, ".valid.npy"), "part-00000-of-00002.valid.npy"),
    "permuted rows": (lambda f: _rewrite(f / "part-00001-of-00002.npy", lambda a: a[::-1]),
                      "part-00001-of-00002.npy"),
    "flipped valid flag": (lambda f: _rewrite(f / "part-00000-of-00002.valid.npy", lambda a: ~a),
                           "part-00000-of-00002.valid.npy"),
    "NaN (checksum rewritten)": (_nan_with_its_checksum, "part-00001-of-00002.npy"),
    "short part": (lambda f: _rewrite(f / "part-00001-of-00002.npy", lambda a: a[:3]), "part-00001-of-00002.npy"),
    "truncated file": (lambda f: (f / "part-00001-of-00002.npy").write_bytes(
        (f / "part-00001-of-00002.npy").read_bytes()[:-8]), "part-00001-of-00002.npy"),
    "float64 part": (lambda f: _rewrite(f / "part-00000-of-00002.npy", lambda a: a.astype(np.float64)),
                     "part-00000-of-00002.npy"),
    "pickled part": (lambda f: np.save(f / "part-00000-of-00002.npy", np.array([{"x": 1}] * 5, dtype=object),
                                       allow_pickle=True), "part-00000-of-00002.npy"),
    "not npy": (lambda f: (f / "part-00000-of-00002.npy").write_bytes(b"\x80\x04K\x01." * 40),
                "part-00000-of-00002.npy"),
    "huge header": (lambda f: (f / "part-00000-of-00002.npy").write_bytes(
        b"\x93NUMPY\x02\x00" + (10 ** 6).to_bytes(4, "little") + b" " * 100), "part-00000-of-00002.npy"),
    "symlink out of the folder": (lambda f: (os.replace(f / "part-00000-of-00002.npy", f.parent / "out.npy"),
                                             os.symlink(f.parent / "out.npy", f / "part-00000-of-00002.npy")),
                                  "part-00000-of-00002.npy"),
    "missing part": (lambda f: os.unlink(f / "part-00001-of-00002.valid.npy"), "part-00001-of-00002.valid.npy"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_lit_cache_is_refused_naming_the_file(tmp_path, damage):
    folder = tmp_path / "lit"
    expected = write_cache(folder)
    cache = open_cache(folder)
    rows = [cache.row(i) for i in range(ROWS)]
    np.testing.assert_array_equal(np.stack([r if r is not None else np.full(DIM, np.nan) for r in rows]), expected)
    edit, named = DAMAGE[damage]
    edit(folder)
    with pytest.raises((CheckpointError, FileNotFoundError)) as e:
        open_cache(folder)
    message = str(e.value)
    assert str(folder / named) in message and "\n" not in message and "pickle" not in message, message


def test_non_finite_features_are_never_written(tmp_path):
    part = lit_cache.layout(4, 1)[0]
    writer = lit_cache._PartWriter(str(tmp_path), part, KEY)
    writer.write(np.ones((2, 3), np.float32), np.ones(2, bool))
    with pytest.raises(CheckpointError, match="record 3 are not finite"):
        writer.write(np.array([[1, 2, 3], [np.inf, 0, 0]], np.float32), np.ones(2, bool))
    writer.write(np.array([[np.nan, 0, 0]], np.float32), np.zeros(1, bool))  # an unreadable image: zeros kept
    assert writer.valid[2] == 0 and not writer.features[2].any()


def test_an_empty_part_is_as_written_or_of_the_cache_width(tmp_path):
    path = tmp_path / "part-00000-of-00002.npy"
    for shape in ((0, 0), (0, DIM)):
        path.write_bytes(_npy_header("<f4", shape))
        assert lit_cache._open_npy(str(path), np.dtype("<f4"), (0, DIM)).shape == shape
    for shape in ((0, -5), (0, 10 ** 30), (0,), (1, DIM)):
        path.write_bytes(_npy_header("<f4", shape))
        with pytest.raises(CheckpointError, match=f"{path} holds a float32 array of shape"):
            lit_cache._open_npy(str(path), np.dtype("<f4"), (0, DIM))


def test_embed_takes_a_prepared_folders_image_root_from_the_command_line(tmp_path, secret):
    """`dualenc embed --images PREPARED` reads a folder prepared from caption files (its image root outside it)
    when --image-root or --allow-outside says so, and refuses those flags without a prepared folder."""
    from dualenc import cli
    from dualenc.cli.support import CommandError
    from dualenc.cli.index import image_source

    folder = tmp_path / "prepared"
    folder.mkdir()
    write_folder(folder, [encode_record("k", ["a private photo"], path="private.png")], str(secret.parent))
    for flags in (["--image-root", str(secret.parent)], ["--allow-outside"]):
        args = cli.parse(["embed", "--model", "m", "--images", str(folder), "--out", "x.safetensors", *flags])
        source = image_source(args.images, batch_size=8, shard=None, image_root=args.image_root,
                              allow_outside=args.allow_outside)
        assert [name for name, _ in source.pairs] == ["k"]
    with pytest.raises(DataError, match="image root"):
        image_source([str(folder)], batch_size=8, shard=None)
    with pytest.raises(CommandError, match="apply to a folder written by `dualenc prepare`"):
        image_source([str(secret)], batch_size=8, shard=None, image_root=str(secret.parent))
