"""What the subcommands share: their error type, model loading, image folders, text files and printed names."""

from __future__ import annotations

import glob
import json
import os
import sys

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
COMPILE_NOTICE_DELAY = 2.0  # seconds a compile runs before CompileNotice says so


class CommandError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


def plural(count: int, one: str, many: str | None = None) -> str:
    """"1 index", "2 indexes": the count and the noun that agrees with it (`many` defaults to one + "s")."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


def at_least(value: int, flag: str, minimum: int = 1) -> None:
    """A CommandError naming `flag` unless value >= minimum."""
    if value < minimum:
        raise CommandError(f"{flag} must be at least {minimum}, got {value}")


def _faiss():
    import faiss  # noqa: F401


def _array_record():
    import array_record.python.array_record_module  # noqa: F401


def _matplotlib():
    import matplotlib.backends.backend_agg  # noqa: F401


def _tensorboardx():
    import tensorboardX  # noqa: F401


# The optional modules commands check for before they start work, each imported by a plain import statement
# (dualenc never imports a module by a name held in a string).
OPTIONAL = {"faiss": _faiss, "array_record": _array_record, "matplotlib": _matplotlib, "tensorboardX": _tensorboardx}


def require(module: str, extra: str, what: str, otherwise: str | None = None) -> None:
    """Imports the optional `module` (a key of OPTIONAL) now, before the command starts work: without it, a
    CommandError saying that `what` needs it, which extra to install and (`otherwise`) what else to do."""
    try:
        OPTIONAL[module]()
    except ImportError:
        raise CommandError(f"{what} needs {module}: pip install 'dualenc[{extra}]'"
                           + (f", or {otherwise}" if otherwise else "")) from None


def batch_rows(total: int | None, batch_size: int) -> int:
    """Rows per forward batch: batch_size, or for fewer inputs the power of two that holds them."""
    from dualenc import encode

    return encode.batch_rows(total, batch_size)


def shown(name: str) -> str:
    """A file name as every output prints it, text and JSON alike: bytes of a name that is not UTF-8 (which
    Python holds as surrogate escapes) as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=True))


def note(command: str, message: str) -> None:
    print(f"dualenc {command}: {message}", file=sys.stderr, flush=True)


def load_model(path: str):
    """(config, params, processor) of a model directory or Hugging Face Hub model id; the demo's output folder
    points at its model/."""
    import dualenc
    from dualenc.hub import resolve

    path = resolve(path)
    if not os.path.isdir(path):
        raise CommandError(f"model directory not found: {path}")
    inner = os.path.join(path, "model")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "open_clip_config.json")) \
            and os.path.isfile(os.path.join(inner, "config.json")):
        raise CommandError(f"{path} holds a model in its model/ folder (as `dualenc demo` writes it): "
                           f"use --model {os.path.join(path, 'model')}")
    config, params = dualenc.load_pretrained(path)
    return config, params, dualenc.Processor.from_pretrained(path)


def read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise CommandError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise CommandError(f"{what} file {path} is not UTF-8 text") from None
    lines = [line for line in lines if line]
    if not lines:
        raise CommandError(f"{what} file {path} is empty")
    return lines


def image_files(items: list[str]) -> list[str]:
    """The image files named: files as given, folders walked recursively (img2dataset's 00000/000000001.jpg),
    each folder's images in sorted path order, hidden files and folders left out; and patterns expanded as tar
    shards are (dualenc.data.expand_shards: globs, '**' recursive, and braces), their matches in sorted
    order, folders among them walked, files kept when they have an image suffix. A name that is not there, or
    a pattern that matches no image, is an error naming it."""
    found = []
    for item in items:
        if os.path.isdir(item):
            found += _walk(item)
        elif os.path.isfile(item):
            found.append(item)
        elif glob.has_magic(item) or "{" in item:
            found += _matches(item)
        else:
            raise CommandError(f"image not found: {shown(item)}")
    if not found:
        raise CommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(map(shown, items))} or its "
                           f"subfolders")
    return found


def _matches(pattern: str) -> list[str]:
    from dualenc.data import expand_shards
    from dualenc.errors import DataError

    try:
        names = expand_shards(pattern, must_exist=False)
    except DataError as e:
        raise CommandError(str(e)) from None
    found = []
    for name in names:
        if os.path.isdir(name):
            found += _walk(name)
        elif os.path.isfile(name):
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(name)
        else:
            raise CommandError(f"image not found: {shown(name)} (from {shown(pattern)!r})")
    if not found:
        raise CommandError(f"pattern {shown(pattern)!r} matches no image ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _walk(folder: str) -> list[str]:
    out, visited = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink loop
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return sorted(out, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def encode_readable(params, config, processor, images: list[str], *, batch_size: int, strict: bool, command: str,
                    dtype=None):
    """Embeddings of the readable images (dtype: the matmuls' compute dtype), skipping and listing the others
    (all of them on stderr, with their paths); with strict, the first unreadable image is an error. Returns
    (embeds, kept paths, skipped), skipped being [{"image": path, "error": message}]."""
    import dualenc

    failures = None if strict else []
    embeds = dualenc.encode_images(params, config, processor, images, batch_size=batch_size, skipped=failures,
                                   dtype=dtype)
    if not failures:
        return embeds, list(images), []
    bad = {i for i, _ in failures}
    skipped = [{"image": shown(images[i]), "error": shown(message)} for i, message in failures]
    note(command, f"skipped {plural(len(skipped), 'unreadable image')} of {len(images)} (--strict stops at the "
                  f"first):")
    for item in skipped:
        print(f"  {item['image']}: {item['error']}", file=sys.stderr)
    return embeds, [p for i, p in enumerate(images) if i not in bad], skipped


def warn_unknown_words(processor, texts: list[str], what: tuple[str, str], command: str) -> None:
    """One warning naming the labels or queries (`what`: the noun, singular and plural) with words the tokenizer
    maps to its unknown token."""
    unknown = processor.tokenizer.unknown_words(texts)
    if unknown:
        listed = "; ".join(f"{text!r} ({', '.join(words)})" for text, words in list(unknown.items())[:10])
        note(command, f"warning: {plural(len(unknown), *what)} {'holds' if len(unknown) == 1 else 'hold'} words "
                      f"the tokenizer does not know (read as its unknown token): {listed}")


OUTSIDE = "path outside the data folder"  # data.read_pairs' reason for such rows


def outside_hint(dataset, data_path: str, image_root: str | None) -> str | None:
    """What to do about rows naming images outside the data folder, when there are any."""
    if not dataset.skipped.get(OUTSIDE):
        return None
    root = image_root or os.path.dirname(os.path.abspath(data_path))
    count = dataset.skipped[OUTSIDE]
    return (f"{plural(count, 'row')} of {data_path} {'names an image' if count == 1 else 'name images'} outside "
            f"{root} (the data folder) and {'was' if count == 1 else 'were'} skipped: pass --image-root DIR to read "
            f"the paths relative to another folder, or --allow-outside to accept them")


class CompileNotice:
    """Says when XLA compiles for long: "compiling WHAT..." once a compile has run `delay` seconds (default
    COMPILE_NOTICE_DELAY; 0 says it at every compile), and "compiled in N s" when it ends; compiles shorter than
    that (or served by the compilation cache) say nothing.

    A context manager; `what` may be changed while it is open (the batch shape it is about to compile). It follows
    jax.monitoring's events: a lowering's end starts the clock, the backend compile's end stops it."""

    LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
    COMPILED = "/jax/core/compile/backend_compile_duration"

    def __init__(self, command: str, what: str = "the model", *, delay: float | None = None):
        import threading

        self.command, self.what = command, what
        self.delay = COMPILE_NOTICE_DELAY if delay is None else delay
        self._lock = threading.Lock()
        self._timer = None
        self._said = False

    def _listen(self, event: str, seconds: float, **_) -> None:
        import threading

        with self._lock:
            if event == self.LOWERED:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._said = self.delay <= 0  # a timer of 0 s could fire after the compile ended
                if self._said:
                    self._announce()
                else:
                    self._timer = threading.Timer(self.delay, self._say)
                    self._timer.daemon = True
                    self._timer.start()
            elif event == self.COMPILED:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._said:
                    note(self.command, f"compiled in {seconds:.1f} s")
                self._said = False

    def _say(self) -> None:
        import threading

        with self._lock:
            if self._timer is not threading.current_thread():  # cancelled, or the timer of an earlier compile
                return
            self._said = True
            self._announce()  # under the lock: before the "compiled" line

    def _announce(self) -> None:
        note(self.command, f"compiling {self.what}... (once per shape; the compilation cache keeps it for the "
                           f"next run)")

    def __enter__(self):
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
