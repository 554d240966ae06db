"""Hostile webdataset tars (issue 22, points 1, 3 and 15): declared sizes past the data, oversized members,
header chains, decompression bombs and files that are no tar end each tar at once, counted by reason and named
by `embed` and `prepare`, within bounds of time and memory."""

import bz2
import collections
import contextlib
import gzip
import io
import json
import lzma
import signal
import tarfile
import tracemalloc

import pytest
from PIL import Image

import dualenc
from dualenc import cli, data
from dualenc.search import index
from dualenc.data import iter_tar
from dualenc.data import webdataset
from dualenc.data.captions import MAX_LINE

COMPRESS = {".tar": lambda b: b, ".tar.gz": gzip.compress, ".tar.bz2": bz2.compress,
            ".tar.xz": lambda b: lzma.compress(b, preset=0)}


def header(name, size, *, fmt=tarfile.PAX_FORMAT, pax=None, type_=tarfile.REGTYPE):
    """The header block(s) of one member declaring `size` (PAX records `pax` added)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type_
    if pax:
        info.pax_headers = dict(pax)
    return info.tobuf(fmt)


def pax_record(key, value):
    """One PAX record: LENGTH KEY=VALUE and a newline, LENGTH counting the whole record."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def member(name, data, **kw):
    """Header and padded data of one member."""
    return header(name, len(data), **kw) + data + bytes(-len(data) % 512)


def archive(*members, end=True):
    """A tar's bytes: the members, then the end-of-archive blocks (padded to a record, as tar pads)."""
    body = b"".join(members)
    if end:
        body += bytes(1024)
        body += bytes(-len(body) % 10240)
    return body


def write(path, blob, suffix=".tar"):
    target = path.with_name(path.name + suffix) if suffix else path
    target.write_bytes(COMPRESS[suffix](blob))
    return str(target)


def png(size=4):
    out = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(out, "PNG")
    return out.getvalue()


class Hang(Exception):
    """Raised by bounded() in the block it bounds: no OSError, which a tar reader catches as damage."""


@contextlib.contextmanager
def bounded(seconds, megabytes):
    """Fails the block past `seconds` (a hang) or past `megabytes` of Python allocations at peak."""
    def hang(*_):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < megabytes << 20, f"{peak / 2 ** 20:.1f} MiB at peak"


def read(path, **kw):
    skipped = collections.Counter()
    keys = [s.key for s in iter_tar(path, skipped, **kw)]
    return keys, dict(skipped)


def huge_size_tars(tmp_path):
    """A sample, then a member declaring far more data than there is (a PAX size of 10**20, a GNU base-256 size
    of 200 GB), then a sample: plain and compressed."""
    first, last = member("000.png", png()) + member("000.txt", b"a red square"), member("002.png", png())
    pax = archive(first, header("001.png", 100, pax={"size": str(10 ** 20)}) + bytes(512), last)
    gnu = archive(first, header("001.png", 200 << 30, fmt=tarfile.GNU_FORMAT), last)
    return ([write(tmp_path / "pax", pax, suffix) for suffix in COMPRESS]
            + [write(tmp_path / "gnu", gnu), write(tmp_path / "gnu", gnu, ".tar.gz")])


# ------------------------------------------------------------------------------------- 1: sizes past the data

def test_a_declared_size_past_the_data_ends_the_tar_at_once(tmp_path):
    for path in huge_size_tars(tmp_path):
        with bounded(10, 8):
            assert read(path) == (["000"], {"truncated tar": 1}), path


def test_prepare_stops_at_a_huge_declared_size_and_names_the_tar(tmp_path, capsys):
    paths = huge_size_tars(tmp_path)[:2]
    with bounded(20, 64):
        code = cli.main(["prepare", *paths, "--out", str(tmp_path / "prepared")])
    assert code == 0
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["records"] == 2 and manifest["skipped"] == {"truncated tar": 2}
    err = capsys.readouterr().err
    assert all(f"{p}: truncated tar" in err for p in paths), err


# ------------------------------------------------------------------------------------ 3: oversized members

def test_oversized_members_are_skipped_unread(tmp_path):
    big = b"a" * (MAX_LINE + 1)  # the caption files' line limit
    blob = archive(member("000.png", png()), member("000.txt", big),
                   member("001.png", b"\x89PNG" + bytes(3 << 20)), member("001.txt", b"large"),
                   member("002.png", png()), member("002.json", json.dumps({"caption": "fine"}).encode()))
    path = write(tmp_path / "big", blob, ".tar.gz")
    with bounded(20, 8):  # the 3 MiB image is read (tarfile joins and slices its chunks); the 16 MiB caption not
        assert read(path) == (["001", "002"], {"text too large": 1})
    with bounded(20, 4):  # each oversized member alone is over 3 MiB; the chunks read past them are 1 MiB
        assert read(path, max_image=2 << 20) == (["002"], {"text too large": 1, "image too large": 1})


def test_the_image_limit_is_the_pixel_limit_at_three_bytes_a_pixel():
    assert webdataset.MAX_IMAGE == 3 * Image.MAX_IMAGE_PIXELS  # pillow's default, which dualenc keeps
    assert webdataset.MAX_TEXT == MAX_LINE
    with pytest.raises(dualenc.DataError, match="max_image"):
        iter_tar("x.tar", collections.Counter(), max_image=webdataset.MAX_IMAGE + 1)


def test_one_image_is_held_per_sample(tmp_path):
    """A sample with several images reads the one it uses (jpg before png, in any order)."""
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")
    path = write(tmp_path / "x", archive(member("000.png", png()), member("000.jpg", jpeg.getvalue()),
                                         member("000.txt", b"a"), member("001.jpg", jpeg.getvalue()),
                                         member("001.png", bytes(3 << 20)), member("001.txt", b"b")))
    samples = list(iter_tar(path, collections.Counter(), max_image=2 << 20))
    assert [(s.key, s.ext, s.image) for s in samples] == [("000", "jpg", jpeg.getvalue()),
                                                           ("001", "jpg", jpeg.getvalue())]


def test_header_chains_long_headers_member_lists_and_negative_sizes_are_bounded(tmp_path):
    ok = member("000.png", png()) + member("000.txt", b"a")
    chain = b"".join(header("././@LongLink", 0, fmt=tarfile.GNU_FORMAT, type_=tarfile.GNUTYPE_LONGNAME)
                     for _ in range(3000))  # a RecursionError in tarfile
    long_pax = header("001.png", 0, pax={"comment": "x" * (10 << 20)})  # a 10 MiB PAX header, read whole
    many = member("x.foo", b"") * 10_000  # tarfile kept every header it read (9.6 MiB)
    negative = header("001.png", -(10 ** 20), fmt=tarfile.GNU_FORMAT)
    cases = {"chain": (archive(ok, chain + member("001.png", png())), ".tar", {"corrupt tar": 1}),
             "long pax": (archive(ok, long_pax), ".tar.gz", {"corrupt tar": 1}),
             "many": (archive(ok, many), ".tar.gz", {}),
             "negative": (archive(ok, negative), ".tar", {"corrupt tar": 1})}
    for name, (blob, suffix, skipped) in cases.items():
        path = write(tmp_path / name, blob, suffix)
        with bounded(20, 4):
            assert read(path) == (["000"], skipped), name


def test_global_pax_records_are_bounded(tmp_path):
    records = b"".join(pax_record(f"k{i}", "v") for i in range(webdataset.MAX_GLOBAL_RECORDS + 1))
    blob = archive(member("000.png", png()), member("000.txt", b"a"),
                   member("pax_global_header", records, fmt=tarfile.USTAR_FORMAT, type_=tarfile.XGLTYPE),
                   member("001.png", png()))
    assert read(write(tmp_path / "g", blob)) == (["000"], {"corrupt tar": 1})


def test_decompression_bombs_end_the_tar(tmp_path, monkeypatch):
    ok = member("000.png", png()) + member("000.txt", b"a")
    xz = lzma.compress(archive(ok), filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}])
    (tmp_path / "dict.tar.xz").write_bytes(xz)  # 100 bytes asking for a 1 GiB dictionary
    with bounded(20, 4):
        assert read(tmp_path / "dict.tar.xz") == ([], {"corrupt tar": 1})
    monkeypatch.setattr(webdataset, "RATIO_SLACK", 1 << 20)
    bomb = write(tmp_path / "bomb", archive(ok, member("001.bin", bytes(4 << 20)), ok), ".tar.bz2")
    with bounded(20, 4):
        assert read(bomb) == (["000"], {"decompression bomb": 1})


# ----------------------------------------------------------------------------------- 15: naming every tar

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random dual encoder's directory."""
    import jax

    root = tmp_path_factory.mktemp("tars")
    data.write_vocab(root / "vocab", ["a red square"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(root / "vocab", max_length=8))
    size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**size, image_size=16, patch_size=8),
                                       dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                                          max_position_embeddings=8), projection_dim=8)
    dualenc.save_pretrained(root / "model", config, dualenc.init(jax.random.key(0), config), processor=processor)
    return root / "model"


def embed(model, out, *inputs, check=True):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["embed", "--model", str(model), "--images", *map(str, inputs), "--out", str(out),
                         "--json", *([] if check else ["--strict"])])
    if check:
        assert code == 0, stderr.getvalue()[-2000:]
        return json.loads(stdout.getvalue()), stderr.getvalue()
    return code, stderr.getvalue()


def test_embed_names_each_unreadable_tar_with_its_reason(model, tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "zip.tar", "w") as z:
        z.writestr("000.png", png())
    (tmp_path / "garbage.tar").write_bytes(b"garbage " * 300)
    pax = huge_size_tars(tmp_path)[1]
    with bounded(60, 200):
        result, err = embed(model, tmp_path / "e.safetensors", tmp_path / "zip.tar", tmp_path / "garbage.tar", pax)
    assert result["written"] == 1 and index.open_index(result["out"]).names() == ["000"]
    assert result["left_out"] == [{"image": str(tmp_path / "zip.tar"), "error": "not a tar"},
                                  {"image": str(tmp_path / "garbage.tar"), "error": "not a tar"},
                                  {"image": pax, "error": "truncated tar"}]
    assert f"{tmp_path / 'zip.tar'}: not a tar" in err
    code, err = embed(model, tmp_path / "s.safetensors", tmp_path / "garbage.tar", check=False)
    assert code == 2 and err.strip().endswith(f"{tmp_path / 'garbage.tar'}: not a tar")
    assert not (tmp_path / "s.safetensors").exists()


def test_embed_bounds_the_image_bytes_of_a_batch(tmp_path):
    """A batch of 256 may hold 4 MiB an image: three 5 MiB ones (read whole before) are skipped unread."""
    from dualenc.cli.index import image_source

    heavy = write(tmp_path / "heavy", archive(member("a.png", png()), *(member(f"b{i}.png", bytes(5 << 20))
                                                                        for i in range(3))), ".tar.gz")
    source = image_source([heavy], batch_size=256, shard=None)
    with bounded(20, 4):
        assert [name for name, _ in source.pairs] == ["a"]
    assert source.problems == [{"image": heavy, "error": "samples skipped: image too large 3 (over 4 MiB: a batch "
                                                         "of 256 images holds at most 1 GiB; a smaller --batch-size "
                                                         "admits larger ones)"}]
    source = image_source([heavy], batch_size=128, shard=None)
    assert [name for name, _ in source.pairs] == ["a", "b0", "b1", "b2"] and not source.problems
