"""The record format (one image with its captions) and random access to a prepared folder of ArrayRecord shards.

A record is b"DER1", the byte length of a UTF-8 JSON header (uint32, little-endian), the header, then the
payload: the encoded image file, or nothing when the header's "path" names the image file instead (relative to
the folder's image root). The header holds "key", "captions" (a non-empty list of strings), "size" (the payload's
byte length, so a truncated record is caught) and optionally "label", "ext" and "path".
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import struct
import threading
from typing import NamedTuple, Sequence

from dualenc.errors import DataError

MAGIC = b"DER1"
MANIFEST = "manifest.json"
FORMAT = "dualenc-records"
VERSION = 1
READER_OPTIONS = "readahead_buffer_size:0"  # random access, as grain reads it
_HEADER_KEYS = {"key", "captions", "size", "label", "ext", "path"}


def resolve_image(root: str, name: str, allow_outside: bool) -> str | None:
    """The image path for a caption-file entry; None if it escapes the data folder (unless allowed).

    The path is inside when it is, as written (".." resolved, symlinks not), or once both it and the folder
    are resolved: a caption file cannot climb out of the folder, a symlinked image folder that the data's owner
    put inside it is followed, and a data folder reached through a symlink still holds its own files.
    """
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, name))
    if allow_outside or _inside(path, root) or _inside(os.path.realpath(path), os.path.realpath(root)):
        return path
    return None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


class Record(NamedTuple):
    """One image (its encoded bytes, or a path relative to an image root) and its captions."""

    key: str
    captions: tuple[str, ...]
    image: bytes | None
    path: str | None = None
    label: str | None = None
    ext: str | None = None


def _check_path(path) -> str:
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"record path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise DataError(f"record path {path!r} holds a NUL character")
    if path.startswith(("/", "\\")) or os.path.isabs(path):
        raise DataError(f"record path {path!r} is absolute: it must be relative to the image root")
    normal = os.path.normpath(path)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep) or normal == os.curdir:
        raise DataError(f"record path {path!r} climbs out of the image root")
    return path


def _check_header(header: dict) -> None:
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise DataError(f"record header has unknown keys {sorted(unknown)}")
    key = header.get("key")
    if not isinstance(key, str) or not key:
        raise DataError(f"record key must be a non-empty string, got {key!r}")
    captions = header.get("captions")
    if not isinstance(captions, list) or not captions:
        raise DataError(f"record {key!r}: captions must be a non-empty list of strings, got {captions!r}")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise DataError(f"record {key!r}: every caption must be a non-empty string, got {captions!r}")
    size = header.get("size")
    if type(size) is not int or size < 0:
        raise DataError(f"record {key!r}: size must be a non-negative int, got {size!r}")
    for name in ("label", "ext"):
        if name in header and not isinstance(header[name], str):
            raise DataError(f"record {key!r}: {name} must be a string, got {header[name]!r}")
    if "ext" in header and ("/" in header["ext"] or "\x00" in header["ext"]):
        raise DataError(f"record {key!r}: invalid ext {header['ext']!r}")
    if "path" in header:
        _check_path(header["path"])
        if size:
            raise DataError(f"record {key!r} names an image path and also carries {size} image bytes")
    elif not size:
        raise DataError(f"record {key!r} has neither image bytes nor an image path")


def encode_record(key: str, captions: list[str], image: bytes | None = None, *, path: str | None = None,
                  label: str | None = None, ext: str | None = None) -> bytes:
    """The bytes of one record: the image's encoded file bytes, or `path` (relative to the image root) instead."""
    if (image is None) == (path is None):
        raise DataError(f"record {key!r}: give the image bytes or its path, exactly one of them")
    payload = b"" if image is None else bytes(image)
    header = {"key": key, "captions": list(captions) if isinstance(captions, (list, tuple)) else captions,
              "size": len(payload)}
    header.update({k: v for k, v in (("path", path), ("label", label), ("ext", ext)) if v is not None})
    _check_header(header)
    try:
        raw = json.dumps(header, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"record {key!r} holds text that is not valid Unicode: {e}") from None
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


def decode_record(data: bytes) -> Record:
    """Parses and checks one record; any damage is a DataError saying what is wrong."""
    data = bytes(data)
    if len(data) < 8:
        raise DataError(f"record is truncated: {len(data)} bytes, shorter than its 8-byte prefix")
    if data[:4] != MAGIC:
        raise DataError(f"not a dualenc record: starts with {data[:4]!r}, expected {MAGIC!r}")
    (n,) = struct.unpack("<I", data[4:8])
    if n > len(data) - 8:
        raise DataError(f"record is truncated: its header needs {n} bytes, {len(data) - 8} are left")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"record header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise DataError(f"record header must be a JSON object, got {type(header).__name__}")
    _check_header(header)
    payload = data[8 + n:]
    if len(payload) != header["size"]:
        what = "truncated" if len(payload) < header["size"] else "longer than its header says"
        raise DataError(f"record {header['key']!r} is {what}: {len(payload)} image bytes, header says "
                        f"{header['size']}")
    return Record(header["key"], tuple(header["captions"]), payload if "path" not in header else None,
                  header.get("path"), header.get("label"), header.get("ext"))


def record_image_path(record: Record, root: str | os.PathLike | None, *, allow_outside: bool = False) -> str | None:
    """The image file a path record names under `root`; None when it escapes the root (dualenc.data's rule:
    inside as written, or once both are resolved), unless allow_outside."""
    if record.path is None:
        raise DataError(f"record {record.key!r} carries its image bytes, it names no path")
    if root is None:
        raise DataError(f"record {record.key!r} names the image {record.path!r}, but no image root is known")
    return resolve_image(os.fspath(root), _check_path(record.path), allow_outside)


def record_image(record: Record, name: str, root: str | os.PathLike | None, *, allow_outside: bool = False):
    """A record's image as the image processors take it: its bytes as an EncodedImage called `name`, or the file
    its path names under `root` (see record_image_path; None when that path escapes the root)."""
    if record.image is None:
        return record_image_path(record, root, allow_outside=allow_outside)
    from dualenc.processing.pixels import EncodedImage

    return EncodedImage(name, record.image)


# ------------------------------------------------------------------------------------------- prepared folders

def read_manifest(folder: str) -> dict:
    """The checked manifest.json of a prepared folder; every problem is a DataError naming the file."""
    from dualenc.errors import ConfigError
    from dualenc.files import read_json

    path = os.path.join(folder, MANIFEST)
    try:
        manifest = read_json(path, "manifest")
    except (ConfigError, FileNotFoundError) as e:
        raise DataError(f"{path}: not a folder written by `dualenc prepare` ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                        f"expected {FORMAT!r} version {VERSION}")
    shards, records = manifest.get("shards"), manifest.get("records")
    if not isinstance(shards, list) or type(records) is not int:
        raise DataError(f"{path}: needs a list of shards and a record count")
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not shard["file"].isprintable() \
                or os.path.basename(shard["file"]) != shard["file"] or shard["file"] in ("", ".", "..") \
                or type(shard.get("records")) is not int or shard["records"] < 0:
            raise DataError(f"{path}: invalid shard entry {shard!r}")
    if sum(s["records"] for s in shards) != records:
        raise DataError(f"{path}: the shards hold {sum(s['records'] for s in shards)} records, the manifest says "
                        f"{records}")
    root = manifest.get("image_root")
    if root is not None and (not isinstance(root, str) or not root or "\x00" in root):
        raise DataError(f"{path}: image_root must be a non-empty string without NUL characters, or null; got "
                        f"{root!r}")
    return manifest


def open_shard(file: str):
    """An ArrayRecordReader of a shard file; a file it cannot read is a DataError naming it."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(file, READER_OPTIONS)
        ok = reader.ok()  # the reader does not raise on a missing, truncated or foreign file: it is not ok
        if not ok:
            _close(reader)
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"shard file {file} cannot be read as ArrayRecord: {e}") from None
    if not ok:
        raise DataError(f"shard file {file} cannot be read as ArrayRecord (missing, truncated or another format)")
    return reader


def _close(reader) -> None:
    try:
        reader.close()
    except (RuntimeError, ValueError, OSError):
        pass  # closing a damaged file complains about the damage, already reported by the caller


def shard_records(reader, file: str) -> int:
    """The number of records an open shard holds; a damaged file is a DataError naming it (the reader closed)."""
    try:
        return reader.num_records()
    except (RuntimeError, ValueError, OSError) as e:
        _close(reader)
        raise DataError(f"shard file {file} cannot be read as ArrayRecord: {e}") from None


class RecordSource:
    """Random access to the records of a prepared folder (a grain RandomAccessDataSource): src[i] is the raw
    bytes of record i, numbered across the shards in manifest order; decode them with decode_record.

    Records that name their image by a path (caption files) are read under `image_root`: the one given, else
    the manifest's, which must lie inside the folder (as written, or once both are resolved, as dualenc.data's
    rule) unless allow_outside; a manifest naming a root outside is a DataError saying what to pass. A record
    naming an absolute path or one climbing out with ".." is corrupt (decode_record refuses it; the pipeline
    replaces it and counts it).

    Shard readers open lazily in each process and are dropped when pickled (grain sends the source to its
    worker processes); each has a lock, so threads may share the source.

    Args:
      folder: a folder written by `dualenc prepare`.
      image_root: the folder the records' image paths are relative to, instead of the manifest's.
      allow_outside: accept the manifest's image root wherever it lies.
    """

    def __init__(self, folder: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 allow_outside: bool = False):
        self.folder = os.path.abspath(os.fspath(folder))
        self.manifest = read_manifest(self.folder)
        self.allow_outside = bool(allow_outside)
        if self.manifest.get("complete") is False:
            raise DataError(f"{os.path.join(self.folder, MANIFEST)}: the preparation did not finish; run "
                            f"`dualenc prepare` again with the same inputs to complete it")
        self._files = [os.path.join(self.folder, s["file"]) for s in self.manifest["shards"]]
        self._counts = [s["records"] for s in self.manifest["shards"]]
        for file, count in zip(self._files, self._counts):
            if not os.path.isfile(file):
                raise DataError(f"shard file not found: {file} (listed in {os.path.join(self.folder, MANIFEST)})")
            if count > os.path.getsize(file):  # every record takes bytes; more is a manifest out of bounds
                raise DataError(f"shard file {file} is {os.path.getsize(file)} bytes and cannot hold the {count} "
                                f"records {os.path.join(self.folder, MANIFEST)} says")
        self._ends, total = [], 0
        for count in self._counts:
            total += count
            self._ends.append(total)
        self.image_root = self._image_root(image_root)
        self._setup()

    def _image_root(self, given) -> str | None:
        if given is not None:
            given = os.path.abspath(os.fspath(given))
            if not os.path.isdir(given):
                raise DataError(f"image_root (--image-root) {given} is not a folder")
            return given
        root = self.manifest.get("image_root")
        if root is None:
            return None
        path = os.path.normpath(os.path.join(self.folder, root))
        if self.allow_outside or resolve_image(self.folder, root, False) is not None:
            return path
        raise DataError(f"{os.path.join(self.folder, MANIFEST)}: its image root {path} lies outside the prepared "
                        f"folder; to read the images there, pass image_root / --image-root {path}, or allow_outside="
                        f"True / --allow-outside")

    def _setup(self):
        self._readers = [None] * len(self._files)
        self._locks = [threading.Lock() for _ in self._files]
        self._open_lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_readers", "_locks", "_open_lock"):
            del state[name]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"RecordSource({self.folder!r}, records={len(self)}, shards={len(self._files)})"

    def _reader(self, shard: int):
        with self._open_lock:
            if self._readers[shard] is None:
                file = self._files[shard]
                reader = open_shard(file)
                count = shard_records(reader, file)
                if count != self._counts[shard]:
                    _close(reader)
                    raise DataError(f"shard file {file} holds {count} records, the manifest says "
                                    f"{self._counts[shard]}")
                self._readers[shard] = reader
            return self._readers[shard]

    def _locate(self, index) -> tuple[int, int]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        shard = bisect.bisect_right(self._ends, i)
        return shard, i - (self._ends[shard - 1] if shard else 0)

    def _read(self, shard: int, positions: list[int]) -> list[bytes]:
        reader = self._reader(shard)
        try:
            with self._locks[shard]:
                return reader.read(positions)
        except (RuntimeError, ValueError, OSError) as e:
            raise DataError(f"shard file {self._files[shard]}: reading records {positions[:5]} failed: {e}") from None

    def __getitem__(self, index) -> bytes:
        shard, position = self._locate(index)
        return self._read(shard, [position])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for slot, index in enumerate(indices):
            shard, position = self._locate(index)
            by_shard.setdefault(shard, []).append((position, slot))
        out: list = [None] * len(indices)
        for shard, items in by_shard.items():
            for (_, slot), data in zip(items, self._read(shard, [p for p, _ in items])):
                out[slot] = data
        return out

    def close(self) -> None:
        with self._open_lock:
            for i, reader in enumerate(self._readers):
                if reader is not None:
                    reader.close()
                    self._readers[i] = None
