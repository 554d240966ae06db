"""Files on disk: a strict JSON reader, a strict safetensors reader, a safetensors writer, and atomic replacement of a directory.

The reader parses and checks the header itself (bounds, overlaps, dtypes, sizes) before touching any data,
so a truncated or hostile file is a CheckpointError naming the file, never a crash inside a library.
Nothing here unpickles, evals or imports anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import secrets
import shutil
import struct
import sys
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from dualenc.errors import CheckpointError, ConfigError

MAX_HEADER_BYTES = 100 << 20
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOATING = frozenset(DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


def _bad(path, msg):
    return CheckpointError(f"{path}: {msg}")


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int, dict]:
    """Parses and validates a safetensors header.

    Returns ({name: (dtype, shape, begin, end)}, data_start, metadata) with offsets relative to data_start.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _bad(path, f"safetensors header length {n} is past the end of the file ({size} bytes) "
                                 f"or over {MAX_HEADER_BYTES} bytes: the file is truncated or not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise _bad(path, "is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad(path, "safetensors header is not a JSON object")
    data_size = size - 8 - n
    entries, metadata = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _bad(path, "safetensors __metadata__ is not a JSON object of strings")
            metadata = info
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise _bad(path, f"tensor {name!r}: invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise _bad(path, f"tensor {name!r}: data_offsets {offsets} run past the end of the data "
                             f"({data_size} bytes): the file is truncated")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                             f"data_offsets give {end - begin}")
        entries[name] = (dtype, tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {what}")
        position = end
    if position != data_size:
        raise _bad(path, f"safetensors data is {data_size} bytes but the tensors cover {position}")
    return entries, 8 + n, metadata


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads every tensor of a validated safetensors file as numpy arrays (memory-mapped, read-only).

    Returns (tensors, metadata).
    """
    entries, start, metadata = read_safetensors_header(path)
    if not entries:
        return {}, metadata
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if os.path.getsize(path) > start else None
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        buf = data[begin:end] if end > begin else np.zeros(0, np.uint8)
        out[name] = buf.view(DTYPES[dtype]).reshape(shape)
    return out, metadata


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes tensors with the safetensors library (metadata format "pt", which transformers requires)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # ascontiguousarray makes 0-d 1-d
    try:
        save_file(arrays, path, metadata={"format": "pt", **(metadata or {})})
    except SafetensorError as e:  # the library reports failed writes (a full disk, say) this way
        raise OSError(errno.EIO, f"writing {path} failed: {e}") from None
    os.chmod(path, public_mode())  # the library creates its files 0600
    fsync(path)


def umask() -> int:
    """The process's umask (read from /proc where it is there: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or directory: 0o666 or 0o777 less the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a fsynced temporary file in the same directory and os.replace."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a fsynced temporary file in the same directory and os.replace. The
    temporary file is private (0600) until it is complete; `path` gets the mode open() would give it."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), public_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync(directory)


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON as transformers does (indented, sorted keys), atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------- atomic directories

TMP_MARK = ".dualenc-tmp-"


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def exchange(a: str, b: str) -> bool:
    """Atomically swaps two existing paths (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP).

    Returns False where the system or filesystem cannot do it.
    """
    try:
        libc = _libc()
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rename_swap = 2
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str):
    """Removes the temporary directories that saves killed mid-way left beside `path` (their process is gone)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        siblings = os.listdir(parent)
    except FileNotFoundError:
        return
    for entry in siblings:
        if not entry.startswith(".") or TMP_MARK not in entry:
            continue
        try:
            pid = int(entry.rsplit(TMP_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh temporary directory beside `path`; on success it replaces `path` in one atomic step.

    Scheme (Linux and macOS): the new checkpoint is written and fsynced in `.NAME.dualenc-tmp-PID-RANDOM`
    in the same parent directory. If `path` does not exist, one rename(2) moves it into place. If it does,
    renameat2(RENAME_EXCHANGE) on Linux or renamex_np(RENAME_SWAP) on macOS swaps the two directories
    atomically, and the old one (now under the temporary name) is deleted. A process killed at any point
    leaves `path` holding the complete old or the complete new checkpoint; its leftover temporary directory
    is removed by the next save to the same path. Where the filesystem cannot swap directories, the save
    raises OSError instead of replacing `path` non-atomically. The temporary directory is private (0700) until
    it is complete; `path` then gets the mode mkdir() would give it.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OSError(errno.ENOTDIR, f"cannot save to {path}: it exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    clean_stale(path)
    tmp = os.path.join(parent, f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise type(e)(e.errno, f"cannot save to {path}: {e.strerror} (creating a temporary directory in "
                               f"{parent})") from None
    try:
        yield tmp
        os.chmod(tmp, public_mode(directory=True))
        fsync(tmp)
        if os.path.isdir(path):
            if not exchange(tmp, path):
                raise OSError(errno.ENOTSUP, f"cannot replace {path} atomically: this filesystem does not "
                                             f"support swapping directories; save to a new path instead")
        else:
            os.rename(tmp, path)
        fsync(parent)
    except OSError as e:
        if str(path) in str(e):
            raise
        raise type(e)(e.errno, f"saving {path} failed, the previous contents are untouched: "
                               f"{e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Reads a JSON object from `path`; every failure is an error naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    if len(raw) >= 64 << 20:
        raise ConfigError(f"{what} {path} is over 64 MiB; refusing to parse it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data
