"""Fuzzing webdataset tars (hypothesis, bounded, counted with test_fuzz's): mutated member headers, declared sizes
(octal, GNU base-256, PAX records), extension headers (GNU long names, PAX, sparse), truncations and damaged
gzip / bzip2 / xz streams. A failure is a traceback, an input past 5 s, over 16 MiB of peak allocations, a reason
outside the documented ones, or a sample before the damage lost or changed."""

import bz2
import collections
import gzip
import io
import lzma
import tarfile

from hypothesis import given, strategies as st
from PIL import Image
from test_fuzz import FUZZ, TRIED
from test_hostile_tars import bounded, pax_record

from dualenc.data import iter_tar
from dualenc.data import webdataset

REASONS = set(webdataset.TAR_DAMAGE) | {"no image", "no caption", "empty image", "undecodable text",
                                        "malformed json", "image too large", "text too large", "member without key",
                                        "sparse member"}
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
# (start, end) of the fields of a ustar header block; "extra" is GNU's atime, ctime, offsets and sparse entries.
FIELDS = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124), "size": (124, 136),
          "mtime": (136, 148), "chksum": (148, 156), "typeflag": (156, 157), "linkname": (157, 257),
          "magic": (257, 263), "version": (263, 265), "uname": (265, 297), "gname": (297, 329),
          "devmajor": (329, 337), "devminor": (337, 345), "prefix": (345, 500), "extra": (345, 500)}
NAME_NEUTRAL = {"mode", "uid", "gid", "size", "mtime", "uname", "gname", "devmajor", "devminor"}
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lambda b: lzma.compress(b, preset=1)}


def _png(color):
    out = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(out, "PNG")
    return out.getvalue()


SAMPLES = [("000", [("png", _png("red")), ("txt", b"a red square")]),
           ("001", [("jpg", b"\xff\xd8 not decoded here"), ("json", b'{"caption": "blue", "label": 3}')]),
           ("d" * 120 + "/002", [("png", _png("blue")), ("cls", b"7"), ("txt", "caf\u00e9".encode())]),
           ("003", [("webp", b"RIFF...."), ("txt", b"last")])]


def seed_tar(fmt):
    """A tar of SAMPLES in one format: (bytes, members [(sample index, first header offset, main header offset,
    data offset, data size)])."""
    out, members = bytearray(), []
    for i, (key, parts) in enumerate(SAMPLES):
        for ext, data in parts:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            if fmt == "pax" and ext == "txt":
                info.pax_headers = {"comment": "a PAX header"}
            head = info.tobuf(FORMATS[fmt], "utf-8", "surrogateescape")
            members.append((i, len(out), len(out) + len(head) - 512, len(out) + len(head), len(data)))
            out += head + data + bytes(-len(data) % 512)
    out += bytes(1024)
    return bytes(out + bytes(-len(out) % 10240)), members


SEEDS = {fmt: seed_tar(fmt) for fmt in FORMATS}


def checksum(block: bytearray, at: int) -> None:
    """Rewrites the checksum of the header block at `at`, as tar computes it."""
    header = block[at:at + 512]
    header[148:156] = b" " * 8
    block[at + 148:at + 155] = b"%06o\x00" % sum(header)


def samples_of(path, captioned=True):
    """iter_tar's samples and skipped counts, within the bounds, with what every result must satisfy."""
    skipped = collections.Counter()
    with bounded(5, 16):
        samples = list(iter_tar(path, skipped, captioned=captioned))
    assert set(skipped) <= REASONS, skipped
    assert all(type(n) is int and n > 0 for n in skipped.values()), skipped
    assert sum(skipped[r] for r in webdataset.TAR_DAMAGE) <= 1, skipped  # a tar ends once
    for s in samples:
        assert s.image and len(s.image) <= webdataset.MAX_IMAGE and s.ext in webdataset.IMAGE_EXTS, s.key
        assert all(isinstance(c, str) and c.strip() for c in s.captions), s
        assert s.captions or not captioned, s
    return samples, skipped


def kept_before(samples, sample_index):
    """The samples that lie wholly before SAMPLES[sample_index] are read as written."""
    expected = [key for key, _ in SAMPLES[:sample_index]]
    assert [s.key for s in samples[:len(expected)]] == expected, [s.key for s in samples]
    for s, (_, parts) in zip(samples[:sample_index], SAMPLES):
        assert s.image == dict(parts)[s.ext]


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), which=st.integers(0, 100), block=st.integers(0, 3),
       field=st.sampled_from(sorted(FIELDS)), value=st.one_of(
           st.binary(max_size=24), st.integers(0, 2 ** 40).map(lambda n: b"%011o" % n),
           st.integers(-(2 ** 95), 2 ** 95).map(lambda n: (n % 2 ** 95).to_bytes(12, "big") if n >= 0 else
                                                 b"\xff" + (n % 2 ** 88).to_bytes(11, "big")),
           st.sampled_from([b"x", b"g", b"L", b"K", b"S", b"1", b"2", b"5", b"7", b"\x00", b"ustar\x00",
                            b"ustar  \x00", b"\x80" + bytes(10) + b"\x01"])),
       fix=st.booleans(), captioned=st.booleans())
def test_mutated_tar_headers(tmp_path, fmt, which, block, field, value, fix, captioned):
    TRIED["tar headers"] += 1
    blob, members = SEEDS[fmt]
    sample, first, main, _, _ = members[which % len(members)]
    at = min(first + 512 * block, main)  # an extension header block of the member, or its own
    start, end = FIELDS[field]
    data = bytearray(blob)
    data[at + start:at + end] = (value + bytes(end - start))[:end - start]
    if fix:
        checksum(data, at)
    (tmp_path / "x.tar").write_bytes(bytes(data))
    samples, _ = samples_of(tmp_path / "x.tar", captioned)
    if field in NAME_NEUTRAL and captioned:
        kept_before(samples, sample)


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), which=st.integers(0, 100),
       size=st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.integers(-600, 600),
                      st.sampled_from([10 ** 20, 200 << 30, 2 ** 63, 2 ** 64 + 1, 256 << 20, (16 << 20) + 1])),
       how=st.sampled_from(["octal", "base-256", "pax"]), cut=st.none() | st.floats(0, 1, exclude_max=True),
       suffix=st.sampled_from(["", "gz", "bz2", "xz"]))
def test_declared_sizes_and_truncations(tmp_path, fmt, which, size, how, cut, suffix):
    TRIED["tar sizes"] += 1
    blob, members = SEEDS[fmt]
    sample, first, main, _, _ = members[which % len(members)]
    data = bytearray(blob)
    if how == "pax":  # a PAX header declaring the size, in front of the member
        record = pax_record("size", str(size))
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(record)
        extra = info.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
        data[first:first] = extra
    elif how == "octal" and 0 <= size < 8 ** 11:
        data[main + 124:main + 136] = b"%011o\x00" % size
        checksum(data, main)
    else:
        data[main + 124:main + 136] = (size % 2 ** 95 | 2 ** 95).to_bytes(12, "big") if size >= 0 else \
            (size % 2 ** 96).to_bytes(12, "big")
        checksum(data, main)
    if cut is not None:
        cut = int(cut * len(data))
        del data[cut:]
    name = "x.tar" + (f".{suffix}" if suffix else "")
    (tmp_path / name).write_bytes(COMPRESS[suffix](bytes(data)) if suffix else bytes(data))
    samples, _ = samples_of(tmp_path / name)
    if cut is None or cut >= first + 512:
        kept_before(samples, sample)


PAX_KEYS = ["size", "path", "linkpath", "hdrcharset", "GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.offset",
            "GNU.sparse.numbytes", "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize",
            "mtime", "uid", "comment"]
VALUES = st.one_of(st.integers(-5, 2 ** 70).map(str), st.sampled_from(["1", "0", "0,10,20,5", "BINARY", "x.png",
                                                                       "1,2,3"]),
                   st.text(max_size=12))


@st.composite
def extension(draw):
    """One extension header: its type and its data (PAX records, a name, sparse blocks or bytes)."""
    kind = draw(st.sampled_from(["x", "g", "L", "K", "S", "0"]))
    if kind in "xg":
        data = b"".join(pax_record(draw(st.sampled_from(PAX_KEYS)), draw(VALUES)) for _ in range(draw(
            st.integers(0, 4))))
        data = draw(st.sampled_from([data, data[:-1], data + b"junk", b"99999999999999999999 size=1\n"]))
    else:
        data = draw(st.binary(max_size=700) | st.sampled_from([b"000.png", b"001.txt" * 80]))
    size = draw(st.sampled_from([len(data), 0, 10 ** 20, len(data) + 1]) | st.integers(0, 2 ** 40))
    return kind, data, size


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), which=st.integers(0, 100), headers=st.lists(extension(), max_size=4),
       repeat=st.sampled_from([1, 1, 2, 400]), gnu=st.booleans(), suffix=st.sampled_from(["", "gz"]))
def test_extension_headers(tmp_path, fmt, which, headers, repeat, gnu, suffix):
    TRIED["tar extension headers"] += 1
    blob, members = SEEDS[fmt]
    _, first, _, _, _ = members[which % len(members)]
    inserted = b""
    for kind, data, size in headers:
        info = tarfile.TarInfo("././@LongLink")
        info.type = kind.encode()
        info.size = size if size < 8 ** 11 or gnu else len(data)
        inserted += info.tobuf(tarfile.GNU_FORMAT if gnu else tarfile.USTAR_FORMAT) + data + \
            bytes(-len(data) % 512)
    data = blob[:first] + inserted * repeat + blob[first:]
    path = tmp_path / ("x.tar" + (f".{suffix}" if suffix else ""))
    path.write_bytes(COMPRESS[suffix](data) if suffix else data)
    samples_of(path)


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), suffix=st.sampled_from(sorted(COMPRESS)),
       cut=st.none() | st.floats(0, 1, exclude_max=True), flips=st.lists(
           st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
       tail=st.sampled_from([b"", b"\x00" * 64, b"garbage", gzip.compress(b"x" * 100)]))
def test_damaged_compressed_tars(tmp_path, fmt, suffix, cut, flips, tail):
    TRIED["compressed tars"] += 1
    data = bytearray(COMPRESS[suffix](SEEDS[fmt][0]))
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if cut is not None:
        del data[int(cut * len(data)):]
    path = tmp_path / f"x.tar.{suffix}"
    path.write_bytes(bytes(data) + tail)
    samples, skipped = samples_of(path)
    if not flips and cut is None and not tail:
        assert [s.key for s in samples] == [key for key, _ in SAMPLES] and not skipped
