"""webdataset tar shards (as img2dataset writes them and open_clip reads them), read with the stdlib tarfile.

A sample is the run of consecutive members sharing a key: the member name up to the first "." of its file name,
within its directory (00000/000000001.jpg, 00000/000000001.txt, 00000/000000001.json). Damage is never fatal:
bad samples and the end of a damaged tar are skipped and counted by reason.

A tar from a stranger is read within bounds: a member's declared size is never trusted past the data there is;
an image member may hold MAX_IMAGE bytes and a text member (.txt, .json, .cls) MAX_TEXT, larger ones are skipped
unread; a member's headers (PAX records, GNU long names) may hold MAX_HEADER bytes; a compressed tar may
decompress to MAX_RATIO times its size (plus RATIO_SLACK), an xz decoder allocate XZ_MEMORY; sparse members are
skipped.
"""

from __future__ import annotations

import bz2
import collections
import glob
import gzip
import itertools
import json
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from typing import Iterable, Iterator, NamedTuple

from dualenc.data.captions import MAX_LINE
from dualenc.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXTS = ("txt", "json", "cls")
# pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS, 89,478,485 pixels, which dualenc keeps) stored raw at 3 bytes
# a pixel: 256 MiB. Any 8-bit RGB image within the limit, even uncompressed, fits.
MAX_IMAGE = 3 * 89_478_485
MAX_TEXT = MAX_LINE  # the caption files' line limit
BATCH_BYTES = 1 << 30  # encoded images one forward batch may hold (`dualenc embed` over tars)
MAX_HEADER = 64 << 10
MAX_GLOBAL_RECORDS = 64  # PAX global header records, which tarfile keeps for the rest of the tar
MAX_RATIO = 1024  # deflate's own limit is about 1032 : 1; bzip2 and xz reach a million
RATIO_SLACK = 64 << 20
XZ_MEMORY = 128 << 20  # what an xz stream's decoder may allocate (xz -9 needs 65 MiB)
MAX_SHARDS = 1_000_000
_BLOCK = 512
_CHUNK = 1 << 20
# Why a whole tar, or the rest of it, could not be read (counted as one each).
NOT_TAR, TRUNCATED, CORRUPT, BOMB = "not a tar", "truncated tar", "corrupt tar", "decompression bomb"
TAR_DAMAGE = (NOT_TAR, TRUNCATED, CORRUPT, BOMB)
# Every error tarfile and the decompressors were seen to raise on damaged data.
_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError, IndexError, OverflowError,
           RecursionError)


class Sample(NamedTuple):
    """One webdataset sample: its key, captions, encoded image bytes, the image's extension, optional label."""

    key: str
    captions: tuple[str, ...]
    image: bytes
    ext: str
    label: str | None


class _Damaged(Exception):
    """The tar stream ended in damage (a truncated or corrupt archive), in a member's data or between members."""

    def __init__(self, message: str, in_member: bool = False, reason: str = TRUNCATED):
        super().__init__(message)
        self.in_member, self.reason = in_member, reason


class _Streams:
    """The data of a bzip2 or xz file: its concatenated streams, decompressed as they are read (lzma.LZMAFile
    takes no memory limit: an xz header may ask for a dictionary of 1.5 GiB)."""

    def __init__(self, f, new):
        self.f, self.new, self.decompressor = f, new, new()

    def read(self, size: int) -> bytes:
        out, n, d = [], 0, self.decompressor
        while n < size:
            if d.eof:
                data = d.unused_data or self.f.read(64 << 10)
                if not data:
                    break
                d = self.decompressor = self.new()
            elif d.needs_input:
                data = self.f.read(64 << 10)
                if not data:
                    raise EOFError("the compressed data ends before its end-of-stream marker")
            else:
                data = b""
            out.append(d.decompress(data, size - n))
            n += len(out[-1])
        return b"".join(out)


class _Source:
    """The tar's bytes (decompressed here) as tarfile reads them, counted: while `header` is set, the headers
    of the next member may read that many bytes; a compressed tar may give `limit` bytes in all. `ended` says
    a read came back short (the data ran out)."""

    def __init__(self, f, size: int):
        magic = f.peek(6)[:6]
        self.raw, self.limit = f, None
        if magic.startswith(b"\x1f\x8b"):
            self.raw = gzip.GzipFile(fileobj=f, mode="rb")
        elif magic.startswith(b"BZh"):
            self.raw = _Streams(f, bz2.BZ2Decompressor)
        elif magic.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):
            self.raw = _Streams(f, lambda: lzma.LZMADecompressor(memlimit=XZ_MEMORY))
        if self.raw is not f:
            self.limit = MAX_RATIO * size + RATIO_SLACK
        self.count, self.header, self.ended = 0, None, False

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except EOFError as e:
            self.ended = True
            raise _Damaged(f"the compressed data ends early ({e})") from None
        except (OSError, zlib.error, lzma.LZMAError) as e:
            raise _Damaged(f"the compressed data is corrupt ({e})", reason=CORRUPT) from None
        self.ended = self.ended or len(data) < size
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise _Damaged(f"it decompresses to over {MAX_RATIO} times its size", reason=BOMB)
        if self.header is not None:
            self.header -= len(data)
            if self.header < 0:
                raise _Damaged(f"a member's headers are over {MAX_HEADER >> 10} KiB", reason=CORRUPT)
        return data

    def close(self) -> None:
        if isinstance(self.raw, gzip.GzipFile):
            self.raw.close()


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, as webdataset's base_plus_ext splits it; None for names without one."""
    name = name[2:] if name.startswith("./") else name
    folder, base = posixpath.split(name)  # tar member names use /, whatever the system
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _sample(key: str, members: dict[str, bytes | None], skipped: collections.Counter,
            captioned: bool) -> Sample | None:
    """The sample of one key's members (None: a member over its size limit, not read)."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        skipped["no image"] += 1
        return None
    if members[ext] is None:
        skipped["image too large"] += 1
        return None
    if any(e in members and members[e] is None for e in TEXT_EXTS):
        skipped["text too large"] += 1
        return None
    if not members[ext]:
        skipped["empty image"] += 1
        return None
    try:
        texts = [_text(members["txt"])] if "txt" in members else []
        meta = json.loads(_text(members["json"])) if "json" in members else {}
        cls = _text(members["cls"]).strip() if "cls" in members else None
    except UnicodeDecodeError:
        skipped["undecodable text"] += 1
        return None
    except (json.JSONDecodeError, RecursionError):
        skipped["malformed json"] += 1
        return None
    captions = [t.strip() for t in texts if t.strip()]
    if not captions and isinstance(meta, dict):
        for name in ("caption", "text", "captions"):
            value = meta.get(name)
            value = value if isinstance(value, list) else [value]
            captions += [t.strip() for t in value if isinstance(t, str) and t.strip()]
            if captions:
                break
    if not captions and captioned:
        skipped["no caption"] += 1
        return None
    label = cls or None
    if label is None and isinstance(meta, dict):
        value = meta.get("label")
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            label = str(value).strip()
    return Sample(key, tuple(captions), members[ext], ext, label)


def _damage(e: BaseException, source: _Source, in_member: bool = False) -> _Damaged:
    """An error of tarfile or of the decompressor as damage: truncated where the data ran out, else corrupt."""
    if isinstance(e, _Damaged):
        e.in_member = e.in_member or in_member
        return e
    return _Damaged(str(e) or type(e).__name__, in_member, TRUNCATED if source.ended else CORRUPT)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, source: _Source) -> bytes:
    try:
        return tar.extractfile(member).read()
    except (_Damaged,) + _ERRORS as e:
        raise _damage(e, source, in_member=True) from None


def _next(tar: tarfile.TarFile, source: _Source) -> tarfile.TarInfo | None:
    """The next member's header, reading at most MAX_HEADER bytes of headers (tarfile keeps no list of them)."""
    source.header = MAX_HEADER
    try:
        member = tar.next()
    finally:
        source.header = None
    tar.members.clear()
    if len(tar.pax_headers) > MAX_GLOBAL_RECORDS:
        raise _Damaged(f"over {MAX_GLOBAL_RECORDS} global PAX header records", reason=CORRUPT)
    if member is not None and member.size < 0:
        raise _Damaged(f"member {member.name!r} declares a negative size", reason=CORRUPT)
    return member


def _skip(tar: tarfile.TarFile, end: int | None, in_member: bool) -> None:
    """Reads past the rest of the current member's data, in chunks, to the next header. tarfile's own skip
    loops until the declared size, even past the end of the data; here a size past the end of an uncompressed
    tar ends it at once, and in a compressed one the data ends it (in_member: the member is a sample's)."""
    stream = tar.fileobj
    left = tar.offset - stream.tell()
    if end is not None and tar.offset > end:
        raise _Damaged("a member's data runs past the end of the file", in_member)
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            raise _Damaged("the data ends inside a member", in_member)
        left -= len(chunk)


def _members(tar: tarfile.TarFile, source: _Source, end: int | None,
             skipped: collections.Counter) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the members a sample may use, in tar order; raises _Damaged at damage.
    A member's data may be read (with _read) before the next one is asked for, as a stream requires."""
    try:
        member = _next(tar, source)  # tarfile read the first one when it opened the tar
        while member is not None:
            split = _split_name(member.name) if member.isfile() else None
            used = False
            if member.isfile() and member.issparse():  # webdataset writes none; tarfile reads them quadratically
                skipped["sparse member"] += 1
            elif member.isfile() and split is None:
                skipped["member without key"] += 1
            elif split is not None and split[1] in IMAGE_EXTS + TEXT_EXTS:
                used = True
                yield split[0], split[1], member
            _skip(tar, end, used)
            member = _next(tar, source)
    except (_Damaged,) + _ERRORS as e:
        raise _damage(e, source) from None
    # tarfile ends quietly at a missing or invalid header: the end is clean only after a zero block and zeros.
    stream, offset = tar.fileobj, tar.offset
    if stream.tell() - offset != _BLOCK:
        raise _Damaged("the archive ends without its end-of-archive blocks")
    try:
        while rest := stream.read(_CHUNK):
            if rest.count(0) != len(rest):
                raise _Damaged("an invalid member header", reason=CORRUPT)
    except (_Damaged,) + _ERRORS as e:
        raise _damage(e, source) from None


def _prefer(ext: str, members: dict) -> bool:
    """Whether to read an image member of `ext`: not when the sample holds an image of an earlier extension of
    IMAGE_EXTS; otherwise the images it holds (of later ones) are dropped, so a sample holds one image."""
    held = [e for e in IMAGE_EXTS if e in members]
    if held and IMAGE_EXTS.index(held[0]) < IMAGE_EXTS.index(ext):
        return False
    for e in held:
        del members[e]
    return True


def iter_tar(path: str | os.PathLike, skipped: collections.Counter, *, captioned: bool = True,
             max_image: int = MAX_IMAGE) -> Iterator[Sample]:
    """The usable samples of one webdataset tar (plain, gzip, bzip2 or xz), read as a stream.

    Samples without an image or a caption, with undecodable text, or with a member over its size limit (an
    image over `max_image` bytes, a .txt/.json/.cls over MAX_TEXT: skipped unread) are skipped and counted in
    `skipped` by reason ("no image", "no caption", "undecodable text", "image too large", "text too large",
    ...). A tar that cannot be read, or the rest of it after damage, is counted once under one of TAR_DAMAGE:
    "not a tar", "truncated tar" (the data ends early, or a member declares more than there is),
    "corrupt tar", "decompression bomb" (over MAX_RATIO times its compressed size). With captioned=False
    samples without a caption are kept (captions ()), for image-only uses such as embedding.
    Captions come from .txt, else from .json's "caption", "text" or "captions"; a label from .cls or .json's
    "label"; a sample with several images uses the first of IMAGE_EXTS. A missing file is a FileNotFoundError.
    """
    if isinstance(max_image, bool) or not isinstance(max_image, int) or not 0 < max_image <= MAX_IMAGE:
        raise DataError(f"max_image must be an int in [1, {MAX_IMAGE}], got {max_image!r}")
    return _samples(os.fspath(path), skipped, captioned, max_image)


def _samples(path: str, skipped: collections.Counter, captioned: bool, max_image: int) -> Iterator[Sample]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"tar shard not found: {path}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        source = _Source(f, size)
        end = size if source.limit is None else None  # the end of the data, where it is known before reading
        try:
            source.header = MAX_HEADER
            tar = tarfile.open(fileobj=source, mode="r|")
        except _Damaged as e:
            skipped[e.reason] += 1
            source.close()
            return
        except _ERRORS:
            skipped[NOT_TAR] += 1
            source.close()
            return
        key, members = None, {}
        try:
            for member_key, ext, member in _members(tar, source, end, skipped):
                if member_key != key:
                    if key is not None and (sample := _sample(key, members, skipped, captioned)) is not None:
                        yield sample
                    key, members = member_key, {}
                if ext in members or (ext in IMAGE_EXTS and not _prefer(ext, members)):
                    continue
                if member.size > (max_image if ext in IMAGE_EXTS else MAX_TEXT):
                    members[ext] = None
                    continue
                members[ext] = _read(tar, member, source)
        except _Damaged as e:
            skipped[e.reason] += 1
            if e.in_member:  # the sample whose member was cut is lost with the rest
                return
        finally:
            source.close()
        if key is not None and (sample := _sample(key, members, skipped, captioned)) is not None:
            yield sample


# ------------------------------------------------------------------------------------------------ shard lists

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _alternatives(body: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        a, b = match.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0") else 0
        step = 1 if int(b) >= int(a) else -1
        return [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace notation: "a-{000..002}.tar" -> a-000.tar, a-001.tar, a-002.tar (zero-padded as
    written); "{x,y}" lists alternatives; several groups multiply out in order. Nested braces are an error."""
    depth = 0
    for char in pattern:
        depth += (char == "{") - (char == "}")
        if depth > 1:
            raise DataError(f"shard pattern {pattern!r} nests braces, which is not supported")
    pieces, last = [], 0
    for match in _BRACE.finditer(pattern):
        pieces += [[pattern[last:match.start()]], _alternatives(match.group(1))]
        last = match.end()
    pieces.append([pattern[last:]])
    total = 1
    for piece in pieces:
        total *= len(piece)
    if total > MAX_SHARDS:
        raise DataError(f"shard pattern {pattern!r} expands to {total} names, over {MAX_SHARDS}")
    return ["".join(parts) for parts in itertools.product(*pieces)]


def expand_shards(patterns: str | os.PathLike | Iterable[str | os.PathLike], *, must_exist: bool = True) -> list[str]:
    """The files named by shard patterns: brace notation ("data/{00000..00009}.tar"), globs ("data/*.tar", in
    sorted order; "**" matches any depth of folders) and plain paths, given as one string or a list. A glob
    matching nothing, or (with must_exist) a named file that does not exist, is a DataError naming it."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        for name in expand_braces(pattern):
            if glob.has_magic(name):
                found = sorted(glob.glob(name, recursive=True))
                if not found:
                    raise DataError(f"pattern {pattern!r} matches no file ({name})")
                out += found
            elif os.path.isdir(name):
                raise DataError(f"input {name} is a folder: name its files, e.g. {os.path.join(name, '*.tar')}")
            elif must_exist and not os.path.isfile(name):
                raise DataError(f"input file not found: {name}" + (f" (from {pattern!r})" if name != pattern else ""))
            else:
                out.append(name)
    return out
