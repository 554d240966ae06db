"""Caption files (JSONL, CSV, TSV): the one reader of their rows and the one rule for what a row means.

`rows` streams a file line by line from a byte offset (never read whole); `parse_row` turns a row into an image
path, its captions and label, or the reason it is skipped. `read_pairs` (dualenc.data.pairs) and `prepare`'s
path records (`row_record`) both read through them, so they skip the same rows for the same reasons.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterator

from dualenc.data.records import encode_record, resolve_image
from dualenc.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
IMAGE_KEYS = ("image", "file_name", "filename", "filepath", "path")
CAPTION_KEYS = ("caption", "captions", "text")
MAX_LINE = 16 << 20
OUTSIDE = "path outside the data folder"


class Lines:
    """The decoded lines of a binary file; `pos` is the byte offset after the last line handed out, and `bad`
    is set when a line was not UTF-8 or over MAX_LINE bytes (it is handed out as an empty line)."""

    def __init__(self, f, strict_utf8: bool = False, name: str = ""):
        self.f, self.pos, self.bad = f, f.tell(), False
        self.strict_utf8, self.name = strict_utf8, name

    def seek(self, offset: int) -> None:
        self.f.seek(offset)
        self.pos = offset

    def __iter__(self) -> Iterator[str]:
        while line := self.f.readline(MAX_LINE + 1):
            start, self.pos = self.pos, self.pos + len(line)
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while True:  # the rest of the line is dropped, unread
                    rest = self.f.readline(1 << 20)
                    self.pos += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                self.bad = True
                yield "\n"
                continue
            if start == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                if self.strict_utf8:
                    raise DataError(f"caption file {self.name} is not UTF-8 text (the line at byte {start}: {e})") \
                        from None
                self.bad = True
                yield "\n"


def _json_rows(lines: Lines) -> Iterator[dict | None]:
    for line in lines:
        if lines.bad:
            lines.bad = False
            yield None
        elif line.strip():
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                yield None


def _csv_rows(path: str, lines: Lines, start: int) -> Iterator[dict | None]:
    reader = csv.reader(iter(lines), delimiter="\t" if path.lower().endswith(".tsv") else ",")
    try:
        fields = next(reader, None)
    except csv.Error as e:
        raise DataError(f"caption file {path}: its header line cannot be parsed as CSV ({e})") from None
    if lines.bad or not fields or not (set(fields) & set(IMAGE_KEYS)) or not (set(fields) & set(CAPTION_KEYS)):
        raise DataError(f"caption file {path} needs a header with an image column ({', '.join(IMAGE_KEYS)}) "
                        f"and a caption column ({', '.join(CAPTION_KEYS)}), got {fields}")
    if start > lines.pos:
        lines.seek(start)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:  # e.g. a bare carriage return inside an unquoted field: this row is malformed
            lines.bad = False
            yield None
            continue
        if lines.bad:
            lines.bad = False
            yield None
        elif row:
            record = dict(zip(fields, row + [None] * (len(fields) - len(row))))
            if len(row) > len(fields):
                record[None] = row[len(fields):]
            yield record


def rows(path: str, start: int = 0, *, strict_utf8: bool = False) -> Iterator[tuple[dict | None, int]]:
    """(row, byte offset after it) of a caption file from byte offset `start` (a row boundary an earlier pass
    reported); a row that cannot be parsed is None, and so is a line that is not UTF-8, unless strict_utf8 (then
    it is a DataError naming the file)."""
    if not path.lower().endswith(SUFFIXES):
        raise DataError(f"caption file {path} must end in .jsonl, .csv or .tsv")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file not found: {path}") from None
    with f:
        lines = Lines(f, strict_utf8, path)
        if path.lower().endswith((".jsonl", ".json")):
            lines.seek(start)
            parsed = _json_rows(lines)
        else:
            parsed = _csv_rows(path, lines, start)
        for row in parsed:
            yield row, lines.pos


def _escapes(rel: str) -> bool:
    return os.path.isabs(rel) or rel == os.pardir or rel.startswith(os.pardir + os.sep) or rel == os.curdir


def parse_row(row, root: str, allow_outside: bool) -> tuple[str, list[str], str | None] | str:
    """(image path, captions, label or None) of one row, its image resolved against `root` (refused outside it
    unless allow_outside; not looked at), or the reason the row is skipped."""
    if not isinstance(row, dict):
        return "malformed row"
    name = next((row[k] for k in IMAGE_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    texts = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
    texts = texts if isinstance(texts, list) else [texts]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if name is None:
        return "no image"
    if not texts:
        return "empty caption"
    if "\x00" in name:
        return "invalid path"
    image = resolve_image(root, name.strip(), allow_outside)
    if image is None:
        return OUTSIDE
    label = row.get("label")
    label = str(label).strip() if isinstance(label, (str, int)) and not isinstance(label, bool) \
        and str(label).strip() else None
    return image, texts, label


def row_record(row, file_root: str, image_root: str, allow_outside: bool) -> bytes | str:
    """The encoded path record of one row, or the reason it is skipped (parse_row's reasons).

    The image is resolved against file_root (and refused outside it unless allow_outside), then named relative to
    image_root, which holds file_root (or is the filesystem root when outside paths are allowed).
    """
    parsed = parse_row(row, file_root, allow_outside)
    if isinstance(parsed, str):
        return parsed
    image, texts, label = parsed
    rel = os.path.relpath(image, image_root)
    if _escapes(rel):  # inside only once resolved: a data folder reached through a symlink
        rel = os.path.relpath(os.path.realpath(image), os.path.realpath(image_root))
        if _escapes(rel):
            return "invalid path" if rel == os.curdir else OUTSIDE
    try:
        return encode_record(rel, texts, path=rel, label=label)
    except DataError:  # text that is not valid Unicode (a lone surrogate from a JSON escape)
        return "malformed row"
