"""`prepare`: webdataset tars and caption files converted to a folder of ArrayRecord shards and a manifest.

Each tar becomes one shard whose records carry the image bytes (not decoded here); each caption file becomes
shards of records_per_shard records naming their image by a path relative to the image root. The manifest is
rewritten atomically after every finished shard, so a rerun with the same inputs and settings keeps the shards
already written and redoes the rest.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Iterable, Iterator

from dualenc.data import captions as caption_files
from dualenc.data.records import FORMAT, MANIFEST, VERSION, encode_record, open_shard, read_manifest, shard_records
from dualenc.data.webdataset import expand_shards, iter_tar
from dualenc.errors import DataError
from dualenc.files import fsync, write_json_atomic

RECORDS_PER_SHARD = 50_000
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads only the record asked for


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(caption_files.SUFFIXES):
        return "captions"
    raise DataError(f"input {path}: not a webdataset tar ({', '.join(TAR_SUFFIXES)}) or a caption file "
                    f"({', '.join(caption_files.SUFFIXES)})")


class _Shard:
    """One shard being written under a temporary name, renamed into place by finish()."""

    def __init__(self, out: str, index: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.file = shard_name(index)
        self.path = os.path.join(out, self.file)
        self.tmp = os.path.join(out, f".{self.file}.tmp")
        try:
            self.writer = ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
        except (RuntimeError, ValueError) as e:
            raise OSError(f"cannot write shard {self.tmp}: {e}") from None
        self.records = 0

    def write(self, record: bytes) -> None:
        try:
            self.writer.write(record)
        except (RuntimeError, ValueError) as e:
            raise OSError(f"writing shard {self.tmp} failed: {e}") from None
        self.records += 1

    def finish(self) -> None:
        try:
            self.writer.close()
        except (RuntimeError, ValueError) as e:
            raise OSError(f"writing shard {self.tmp} failed: {e}") from None
        fsync(self.tmp)
        os.replace(self.tmp, self.path)


def _settings(inputs: list[str], records_per_shard: int, image_root: str | None, allow_outside: bool) -> dict:
    return {"inputs": inputs, "records_per_shard": records_per_shard, "image_root": image_root,
            "allow_outside": allow_outside}


def _reusable(out: str, settings: dict) -> list[dict]:
    """The shards an earlier run with the same settings finished: the manifest's leading shards whose file is
    there with the records counted. An earlier run of other inputs or settings is a DataError."""
    entries = [e for e in os.listdir(out) if not (e.startswith(".shard-") and e.endswith(".tmp"))]
    if not entries:
        return []
    if MANIFEST not in entries:
        raise DataError(f"--out {out} is not empty and holds no {MANIFEST}: give an empty or new folder")
    manifest = read_manifest(out)
    different = [k for k, v in settings.items() if manifest.get(k) != v]
    if different:
        raise DataError(f"--out {out} holds a preparation of other {' and '.join(different)} ({MANIFEST}): give "
                        f"another folder, or empty it")
    kept = []
    for index, shard in enumerate(manifest["shards"]):
        path = os.path.join(out, shard["file"])
        if shard["file"] != shard_name(index) or not os.path.isfile(path):
            break
        offsets = shard.get("bytes")
        if _kind(shard["input"]) == "captions" and not (isinstance(offsets, list) and len(offsets) == 2
                                                         and all(type(o) is int and o >= 0 for o in offsets)):
            break
        try:
            reader = open_shard(path)
            count = shard_records(reader, path)
        except DataError:  # damaged: redone
            break
        reader.close()
        if count != shard["records"]:
            break
        kept.append(shard)
    return kept


def _tar_shard(out: str, index: int, path: str) -> dict:
    skipped = collections.Counter()
    shard = _Shard(out, index)
    for sample in iter_tar(path, skipped):
        try:
            record = encode_record(sample.key, list(sample.captions), sample.image, label=sample.label,
                                   ext=sample.ext)
        except DataError:  # a member name or text that is not valid Unicode
            skipped["unencodable sample"] += 1
            continue
        shard.write(record)
    shard.finish()
    return {"file": shard.file, "records": shard.records, "input": path, "skipped": dict(skipped)}


def _caption_shards(out: str, first_index: int, path: str, start: int, first: bool, records_per_shard: int,
                    file_root: str, image_root: str, allow_outside: bool) -> Iterator[dict]:
    """The shards of a caption file from byte offset `start`, each written when it is full or the file ends."""
    shard, skipped, index, begin, end = None, collections.Counter(), first_index, start, start

    def done() -> dict:
        nonlocal shard
        shard = shard or _Shard(out, index)
        shard.finish()
        entry = {"file": shard.file, "records": shard.records, "input": path, "skipped": dict(skipped),
                 "bytes": [begin, end]}
        shard = None
        skipped.clear()
        return entry

    for row, end in caption_files.rows(path, start):
        item = caption_files.row_record(row, file_root, image_root, allow_outside)
        if isinstance(item, str):
            skipped[item] += 1
            continue
        shard = shard or _Shard(out, index)
        shard.write(item)
        if shard.records == records_per_shard:
            yield done()
            index, begin, first = index + 1, end, False
    if shard is not None or skipped or first:
        yield done()


def image_root_for(files: list[str], image_root: str | os.PathLike | None = None,
                   allow_outside: bool = False) -> str | None:
    """The folder prepare() names the images of caption files relative to (its manifest's image_root), for the
    same arguments (`files` expanded): None without caption files, the filesystem root with allow_outside,
    else image_root or the caption files' common folder. A RecordSource reading a folder outside its image root
    takes it as its image_root."""
    texts = [os.path.abspath(p) for p in files if _kind(p) == "captions"]
    if not texts:
        return None
    if allow_outside:
        return os.path.abspath(os.sep)
    if image_root is not None:
        return os.path.abspath(os.fspath(image_root))
    return os.path.commonpath([os.path.dirname(p) for p in texts])


def prepare(inputs: str | Iterable[str], out: str | os.PathLike, *, records_per_shard: int = RECORDS_PER_SHARD,
            image_root: str | os.PathLike | None = None, allow_outside: bool = False,
            progress: Callable[[dict, bool], None] | None = None) -> dict:
    """Converts webdataset tars and caption files to a prepared folder (ArrayRecord shards and manifest.json).

    Args:
      inputs: files or shard patterns ("data/{00000..00009}.tar", "data/*.tar"): tars and JSONL/CSV/TSV files.
      out: the folder to write; empty, new, or holding an unfinished run of the same inputs and settings.
      records_per_shard: records in each shard of a caption file (a tar is always one shard).
      image_root: the folder caption files' image paths are relative to (default: each file's own folder).
      allow_outside: accept image paths outside that folder (the records then name paths from the filesystem
        root, which becomes the manifest's image_root).
      progress: called with each shard's manifest entry and whether it was kept from an earlier run.

    Returns:
      The manifest: records, skipped (counts by reason), image_root, shards [{file, records, input, skipped}].
    """
    if type(records_per_shard) is not int or records_per_shard < 1:
        raise DataError(f"records_per_shard must be an int of 1 or more, got {records_per_shard!r}")
    files = [os.path.abspath(p) for p in expand_shards(inputs)]
    if not files:
        raise DataError("no inputs given")
    repeated = sorted(p for p, n in collections.Counter(files).items() if n > 1)
    if repeated:
        raise DataError(f"input {repeated[0]} is given more than once")
    kinds = [_kind(p) for p in files]
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"--image-root {os.fspath(image_root)} is not a folder")
    given_root = None if image_root is None else os.path.abspath(os.fspath(image_root))
    root = image_root_for(files, image_root, allow_outside)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    settings = _settings(files, records_per_shard, root, bool(allow_outside))
    kept = _reusable(out, settings)
    for entry in os.listdir(out):
        if entry.startswith(".shard-") and entry.endswith(".tmp"):
            os.unlink(os.path.join(out, entry))
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "records": 0, "skipped": {},
                **settings, "shards": []}

    def add(entry: dict, reused: bool) -> None:
        manifest["shards"].append(entry)
        manifest["records"] += entry["records"]
        total = collections.Counter(manifest["skipped"])
        total.update(entry["skipped"])
        manifest["skipped"] = dict(sorted(total.items()))
        write_json_atomic(os.path.join(out, MANIFEST), manifest)
        if progress is not None:
            progress(entry, reused)

    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    for path, kind in zip(files, kinds):
        if kind == "tar":
            if kept and kept[0]["input"] == path:
                add(kept.pop(0), True)
            else:
                kept.clear()  # shards after a redone one are redone too
                add(_tar_shard(out, len(manifest["shards"]), path), False)
            continue
        start, first = 0, True
        while kept and kept[0]["input"] == path:
            entry = kept.pop(0)
            start, first = entry["bytes"][1], False
            add(entry, True)
        for entry in _caption_shards(out, len(manifest["shards"]), path, start, first, records_per_shard,
                                     given_root or os.path.dirname(path), root, bool(allow_outside)):
            kept.clear()
            add(entry, False)
    manifest["complete"] = True
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest
