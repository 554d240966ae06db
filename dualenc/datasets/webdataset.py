"""webdataset tar shards (as img2dataset writes them and open_clip reads them), read with the stdlib tarfile.

A sample is the run of consecutive members sharing a key: the member name up to the first "." of its file name,
within its directory (00000/000000001.jpg, 00000/000000001.txt, 00000/000000001.json). Damage is never fatal:
bad samples and the end of a damaged tar are skipped and counted by reason.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import posixpath
import re
import tarfile
import zlib
from typing import Iterable, Iterator, NamedTuple

from dualenc.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXTS = ("txt", "json", "cls")
MAX_MEMBER = 256 << 20
MAX_SHARDS = 1_000_000
_BLOCK = 512


class Sample(NamedTuple):
    """One webdataset sample: its key, captions, encoded image bytes, the image's extension, optional label."""

    key: str
    captions: tuple[str, ...]
    image: bytes
    ext: str
    label: str | None


class _Damaged(Exception):
    """The tar stream ended in damage (a truncated or corrupt archive), in a member's data or between members."""

    def __init__(self, message: str, in_member: bool = False, reason: str = "truncated tar"):
        super().__init__(message)
        self.in_member, self.reason = in_member, reason


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


def _sample(key: str, members: dict[str, bytes], skipped: collections.Counter, captioned: bool) -> Sample | None:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        skipped["no image"] += 1
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


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        return tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _Damaged(str(e), in_member=True) from None


def _members(tar: tarfile.TarFile, skipped: collections.Counter) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the members a sample may use, in tar order; raises _Damaged at damage.
    A member's data is read (with _read) before the next one is asked for, as a stream requires."""
    try:
        for member in tar:
            if not member.isfile():
                continue
            split = _split_name(member.name)
            if split is None:
                skipped["member without key"] += 1
                continue
            if split[1] not in IMAGE_EXTS + TEXT_EXTS:
                continue
            if member.size > MAX_MEMBER:
                skipped["member too large"] += 1
                continue
            yield split[0], split[1], member
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _Damaged(str(e)) from None
    # tarfile ends quietly at a missing or invalid header: the end is clean only after a zero block and zeros.
    stream, offset = getattr(tar, "fileobj", None), getattr(tar, "offset", None)
    if stream is None or offset is None or not hasattr(stream, "tell"):
        return
    if stream.tell() - offset != _BLOCK:
        raise _Damaged("the archive ends without its end-of-archive blocks")
    try:
        while rest := stream.read(1 << 20):
            if rest.count(0) != len(rest):
                raise _Damaged("an invalid member header", reason="corrupt tar")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _Damaged(str(e)) from None


def iter_tar(path: str | os.PathLike, skipped: collections.Counter, *, captioned: bool = True) -> Iterator[Sample]:
    """The usable samples of one webdataset tar (plain or compressed), read as a stream.

    Samples without an image or a caption, with undecodable text, and the rest of a tar after damage are skipped
    and counted in `skipped` by reason ("no image", "no caption", "undecodable text", "truncated tar",
    "corrupt tar", ...); with captioned=False samples without a caption are kept (captions ()), for image-only
    uses such as embedding.
    Captions come from .txt, else from .json's "caption", "text" or "captions"; a label from .cls or .json's
    "label". A missing file is a FileNotFoundError.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"tar shard not found: {path}") from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            skipped["unreadable tar"] += 1
            return
        key, members = None, {}
        try:
            for member_key, ext, member in _members(tar, skipped):
                if member_key != key:
                    if key is not None and (sample := _sample(key, members, skipped, captioned)) is not None:
                        yield sample
                    key, members = member_key, {}
                if ext not in members:
                    members[ext] = _read(tar, member)
        except _Damaged as e:
            skipped[e.reason] += 1
            if e.in_member:  # the sample whose member was cut is lost with the rest
                return
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
