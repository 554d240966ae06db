"""The files of an embedding index: the streaming writer, the memory-mapped reader and the checks both make.

An index is a safetensors file NAME.safetensors holding one float32 tensor "embeddings" (count, dims) and, in
its header, the checksums of its rows (embeddings_sha256) and names (names_sha256); its names in a sidecar
NAME.names.jsonl (one JSON string per line). dualenc.search.index re-exports what is public here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, InputError

TENSOR = "embeddings"
SUFFIX = ".safetensors"
MAX_NAME_BYTES = 1 << 20  # the longest line of a names file read (a path, a tar key, a text)
_CHUNK_BYTES = 64 << 20  # the most of an index (and of its scores) read or computed at once
_HEADER_SLACK = 64
_PID_MAX = 1 << 22  # Linux's highest process id


def names_file(path: str) -> str:
    """The sidecar file of an index's names: photos.safetensors -> photos.names.jsonl."""
    return stem(path) + ".names.jsonl"


def stem(path: str) -> str:
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise InputError(f"an embedding index must be a {SUFFIX} file, got {path}")
    return path[:-len(SUFFIX)]


def ann_paths(path: str) -> tuple[str, str]:
    """The ANN index of an index and its description: photos.safetensors -> (photos.faiss, photos.faiss.json)."""
    return stem(path) + ".faiss", stem(path) + ".faiss.json"


def drop_stale_ann(path: str, sha: str) -> None:
    """Removes an ANN index built for other rows than those of `path` (whose bytes hash to `sha`)."""
    graph, info = ann_paths(path)
    if not os.path.exists(info) and not os.path.exists(graph):
        return
    try:
        built_for = files.read_json(info).get("embeddings_sha256")
    except (OSError, ValueError):
        built_for = None
    if built_for != sha:
        for p in (graph, info):
            if os.path.exists(p):
                os.remove(p)


def temporary_path(path: str) -> str:
    """A hidden temporary file beside `path` that names this process (.NAME.dualenc-tmp-PID-RANDOM, the scheme
    of files.atomic_directory), for clean_temporaries to find once the process is gone."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{files.TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def clean_temporaries(path: str) -> None:
    """Removes the temporary files (temporary_path) of `path` that writers killed mid-way left beside it: those
    of processes no longer running on this machine. Only `path`'s own: the parts other processes (other hosts
    too, on a shared folder) write beside it under other names are never touched."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}{files.TMP_MARK}"
    try:
        entries = [e for e in os.listdir(directory) if e.startswith(prefix)]
    except FileNotFoundError:
        return
    for entry in entries:
        pid = entry[len(prefix):].partition("-")[0]
        if not re.fullmatch("[0-9]{1,7}", pid) or not 0 < int(pid) <= _PID_MAX or files.pid_alive(int(pid)):
            continue
        target = os.path.join(directory, entry)
        try:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                os.remove(target)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------------ writing

class IndexWriter:
    """Writes an index batch by batch, holding one batch at a time.

    Rows go straight to a temporary file beside `path`, behind a slot kept for the safetensors header, names
    to a temporary sidecar; close() writes the header (count and checksums) into its slot and moves both files
    into place with os.replace (the names first). On an error, or abort(), both temporary files are removed and
    an existing index at `path` is left as it was; those of a process killed mid-way are removed by the next
    writer of `path` (clean_temporaries). Use it as a context manager:

        with IndexWriter("photos.safetensors", dims=512, kind="image") as writer:
            for names, embeds in batches:
                writer.add(embeds, names)

    Args:
      path: the .safetensors file to write.
      dims: the embeddings' width.
      kind: what the rows embed ("image" or "text").
      metadata: more string fields for the header (the model, a shard's place...).
    """

    def __init__(self, path: str | os.PathLike, dims: int, kind: str, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self.names_path = names_file(self.path)
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise InputError(f"dims must be a positive integer, got {dims!r}")
        extra = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise InputError("metadata must map strings to strings")
        self.dims, self.count = dims, 0
        self._metadata = {"format": "pt", **extra, "kind": kind, "names_file": os.path.basename(self.names_path)}
        self._sha, self._names_sha = hashlib.sha256(), hashlib.sha256()
        self._slot = _round8(len(self._header(10 ** 15, "0" * 64, "0" * 64)) + _HEADER_SLACK)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot write {self.path}: the folder {directory} does not exist")
        clean_temporaries(self.path)
        clean_temporaries(self.names_path)
        self._tmp, self._tmp_names = temporary_path(self.path), temporary_path(self.names_path)
        self._data = self._names = None
        try:
            self._data = open(self._tmp, "xb")
            self._names = open(self._tmp_names, "xb")
            self._data.write(bytes(8 + self._slot))
        except BaseException:
            self.abort()
            raise

    def _header(self, count: int, sha: str, names_sha: str) -> bytes:
        metadata = {**self._metadata, "count": str(count), "embeddings_sha256": sha, "names_sha256": names_sha}
        header = {"__metadata__": metadata,
                  TENSOR: {"dtype": "F32", "shape": [count, self.dims], "data_offsets": [0, count * self.dims * 4]}}
        return json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")

    def add(self, embeds, names: Sequence[str]) -> None:
        """Appends rows: embeds (n, dims), written as float32, and their n names."""
        if self._data is None:
            raise InputError(f"{self.path}: the writer is closed")
        embeds = np.asarray(embeds)
        if embeds.ndim != 2 or embeds.shape[1] != self.dims:
            raise InputError(f"embeddings must be (n, {self.dims}), got shape {embeds.shape}")
        names = list(names)
        if len(names) != len(embeds):
            raise InputError(f"{len(names)} names for {len(embeds)} embeddings")
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise InputError(f"names must be strings, got {type(bad).__name__}")
        bad = next((n for n in names if not _is_text(n)), None)
        if bad is not None:
            raise InputError(f"names must be text (or bytes escaped as surrogates, as Python reads file names), "
                             f"got {bad!r}")
        rows = memoryview(np.ascontiguousarray(embeds, "<f4")).cast("B")
        self._data.write(rows)
        self._sha.update(rows)
        lines = [json.dumps(n).encode("ascii") for n in names]
        if lines and max(map(len, lines)) >= MAX_NAME_BYTES:
            raise InputError(f"names must be under {MAX_NAME_BYTES} bytes as JSON strings")
        text = b"".join(line + b"\n" for line in lines)
        self._names.write(text)
        self._names_sha.update(text)
        self.count += len(names)

    def close(self) -> "EmbeddingIndex":
        """Fills in the header, moves the index and its names into place; returns the index, opened."""
        if self._data is None:
            raise InputError(f"{self.path}: the writer is closed")
        try:
            header = self._header(self.count, self._sha.hexdigest(), self._names_sha.hexdigest())
            self._data.seek(0)
            self._data.write(struct.pack("<Q", self._slot) + header.ljust(self._slot, b" "))
            for f in (self._data, self._names):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(self._tmp_names, self.names_path)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._data = self._names = None
        files.fsync(os.path.dirname(os.path.abspath(self.path)))

        drop_stale_ann(self.path, self._sha.hexdigest())
        return open_index(self.path)

    def abort(self) -> None:
        """Removes the temporary files; `path` keeps what it held."""
        for f in (self._data, self._names):
            if f is not None:
                f.close()
        self._data = self._names = None
        for tmp in (self._tmp, self._tmp_names):
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


# ------------------------------------------------------------------------------------------------ reading

@dataclasses.dataclass(frozen=True)
class EmbeddingIndex:
    """An opened index: its rows memory-mapped (read-only float32 (count, dims)), its header metadata, and where
    its names are (a sidecar file, or the header in files written before the sidecar)."""

    path: str
    embeddings: np.ndarray
    metadata: dict
    names_path: str | None
    header_names: tuple | None = None
    _checked: list = dataclasses.field(default_factory=list, repr=False, compare=False)  # [True]: rows verified

    @property
    def kind(self) -> str | None:
        return self.metadata.get("kind")

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    def names(self, rows: Iterable[int] | None = None) -> list[str]:
        """All the names, or those of `rows` (in that order; the sidecar is scanned once, only they are kept)."""
        if self.header_names is not None:
            return list(self.header_names) if rows is None else [self.header_names[int(r)] for r in rows]
        if rows is None:
            return list(names_of(self))
        rows = [int(r) for r in rows]
        wanted, found = set(rows), {}
        for i, line in enumerate(_lines(self.names_path)):
            if i in wanted:
                found[i] = _name(self.names_path, f"line {i + 1}", line)
        return [found[r] for r in rows]


def _lines(path: str) -> Iterator[bytes]:
    """The lines of a names file, none held past MAX_NAME_BYTES (a longer one is a CheckpointError)."""
    with open(path, "rb") as f:
        for i, line in enumerate(iter(lambda: f.readline(MAX_NAME_BYTES), b"")):
            if len(line) == MAX_NAME_BYTES and not line.endswith(b"\n"):
                raise CheckpointError(f"{path}: line {i + 1} is {MAX_NAME_BYTES} bytes long or more: names are "
                                      f"shorter")
            yield line


def _name(path: str, where: str, name) -> str:
    """A name read from a names file's line (bytes) or from a header (where it is already parsed), checked."""
    try:
        name = json.loads(name) if isinstance(name, bytes) else name
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: {where} is not a JSON string") from None
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: {where} holds a {type(name).__name__}, not a string")
    if not _is_text(name):
        raise CheckpointError(f"{path}: {where} holds a name that is not text (a lone surrogate)")
    return name


def _is_text(name: str) -> bool:
    """Whether a str is text that can be printed: UTF-8, where bytes that were not (Python's surrogate escapes of
    a file name) print as \\xNN (cli.common.shown)."""
    try:
        name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def names_of(index: EmbeddingIndex) -> Iterator[str]:
    if index.header_names is not None:
        yield from index.header_names
        return
    for i, line in enumerate(_lines(index.names_path)):
        yield _name(index.names_path, f"line {i + 1}", line)


def open_index(path: str | os.PathLike) -> EmbeddingIndex:
    """Opens an index: validates its header and names (their count, and checksum where recorded) and
    memory-maps its rows; every problem is an error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index file not found: {path}")
    entries, start, metadata = files.read_safetensors_header(path)
    if TENSOR not in entries or not ("names_file" in metadata or "names" in metadata):
        raise CheckpointError(f"{path} is not an embedding index (as `dualenc embed` writes): it needs a tensor "
                              f"{TENSOR!r} and names")
    dtype, shape, begin, _ = entries[TENSOR]
    if dtype != "F32" or len(shape) != 2 or shape[1] < 1:
        raise CheckpointError(f"{path}: {TENSOR!r} must be float32 (count, dims), dims at least 1, got {dtype} "
                              f"{list(shape)}")
    if "count" in metadata and metadata["count"] != str(shape[0]):
        raise CheckpointError(f"{path}: its header counts {metadata['count']} rows, its tensor holds {shape[0]}")
    try:
        embeddings = np.memmap(path, dtype="<f4", mode="r", offset=start + begin, shape=shape) if shape[0] else \
            np.zeros(shape, np.float32)
    except (OSError, ValueError) as e:  # the file changed since its header was read
        raise CheckpointError(f"{path}: its rows cannot be mapped: {e}") from None
    if "names" in metadata:
        names = _header_names(path, metadata["names"])
        if len(names) != shape[0]:
            raise CheckpointError(f"{path}: {len(names)} names for {shape[0]} embeddings")
        return EmbeddingIndex(path, embeddings, metadata, None, tuple(names))
    sidecar = metadata["names_file"]
    if os.path.basename(sidecar) != sidecar or not sidecar.endswith(".names.jsonl"):
        raise CheckpointError(f"{path}: its names_file {sidecar!r} must be a .names.jsonl file beside it")
    names_path = os.path.join(os.path.dirname(os.path.abspath(path)), sidecar)
    if not os.path.isfile(names_path):
        raise CheckpointError(f"{path}: its names file {names_path} is missing")
    lines, digest, last = 0, hashlib.sha256(), b"\n"
    with open(names_path, "rb") as f:
        while chunk := f.read(1 << 18):
            lines += chunk.count(b"\n")
            digest.update(chunk)
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    if lines != shape[0] or last != b"\n":
        raise CheckpointError(f"{path}: its names file {names_path} holds {lines} names for {shape[0]} embeddings"
                              + ("" if last == b"\n" else ", its last unterminated"))
    if metadata.get("names_sha256", digest.hexdigest()) != digest.hexdigest():
        raise CheckpointError(f"{path}: its names file {names_path} is not the one written with it (checksum)")
    return EmbeddingIndex(path, embeddings, metadata, names_path)


def _header_names(path: str, text: str) -> list[str]:
    try:
        names = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: its names (in its header) are not valid JSON") from None
    if not isinstance(names, list):
        raise CheckpointError(f"{path}: its names (in its header) must be a list of strings")
    return [_name(path, f"name {i} in its header", n) for i, n in enumerate(names)]


def embeddings_sha256(index: EmbeddingIndex) -> str:
    """SHA-256 of the rows' bytes: from the header, or computed (files written before it was recorded)."""
    if "embeddings_sha256" in index.metadata:
        return index.metadata["embeddings_sha256"]
    digest = hashlib.sha256()
    for start, stop in chunks(index.count, index.dims):
        digest.update(np.ascontiguousarray(index.embeddings[start:stop]).data)
    return digest.hexdigest()


def chunks(count: int, dims: int) -> Iterator[tuple[int, int]]:
    step = block_rows(dims)
    for start in range(0, count, step):
        yield start, min(start + step, count)


def verified_rows(index: EmbeddingIndex, step: int | None = None) -> Iterator[np.ndarray]:
    """The index's rows in order, `step` at a time (default: 64 MiB of them), read-only views of its
    file; once the last has been handed out, a CheckpointError naming the file if they do not hash to the
    embeddings_sha256 its header records (an index that records none is not checked). Each block is hashed in
    a thread while the caller works on it. Once every row of an opened index has been checked, later calls
    on it trust that check (open the file again to check it again)."""
    step = step or block_rows(index.dims)
    expected = None if index._checked else index.metadata.get("embeddings_sha256")
    digest, hashing = hashlib.sha256(), None
    try:
        for start in range(0, index.count, step):
            block = index.embeddings[start:start + step]
            if expected is not None:
                if hashing is not None:
                    hashing.join()  # blocks are hashed in order
                hashing = threading.Thread(target=digest.update, args=(memoryview(block).cast("B"),), daemon=True)
                hashing.start()
            yield block
    finally:
        if hashing is not None:
            hashing.join()
    if expected is not None and digest.hexdigest() != expected:
        raise CheckpointError(f"{index.path}: its rows do not hash to the embeddings_sha256 its header records: "
                              f"the file was changed or damaged after it was written")
    if expected is not None:
        index._checked.append(True)


def block_rows(dims: int, queries: int = 1) -> int:
    """Rows read at once: a block of `dims`-wide float32 rows, and its scores against `queries` queries, each
    stay under 64 MiB."""
    return max(1, min(_CHUNK_BYTES // (4 * max(dims, 1)), _CHUNK_BYTES // (12 * max(queries, 1))))
