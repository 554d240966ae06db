"""CLIP_benchmark's datasets as dualenc reads them: its webdataset layout (a folder or a Hugging Face dataset id),
image folders per class, and dualenc's caption files, streamed one example at a time in CLIP_benchmark's order."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import re
import tarfile
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

from dualenc import hub
from dualenc import templates as templates_
from dualenc.benchmark import names
from dualenc.data.webdataset import MAX_HEADER, MAX_SHARDS, iter_tar
from dualenc.errors import InputError

if TYPE_CHECKING:
    import PIL.Image

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
WDS_IMAGES = ("webp", "png", "jpg", "jpeg")  # what CLIP_benchmark reads, in its order of preference
FOLDER_IMAGES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
DEFAULT_TEMPLATES = "openai_imagenet"
SPLIT_NAMES = ("train", "test", "val", "validation")  # folders an image folder's root must not hold as classes
MAX_TEXT_FILE = 16 << 20
_SPLIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_INT = re.compile(r"[+-]?[0-9]+")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")
_LAYOUTS = ("a folder in CLIP_benchmark's webdataset layout (ROOT/SPLIT/0.tar .. and nshards.txt), an image "
            "folder per class, a dualenc JSONL file, or a hub dataset id such as clip-benchmark/wds_cars")


class Example(NamedTuple):
    """One image of a benchmark split: its key ("0.tar/s0000001": the tar and the sample's key, or the image's
    path), the decoded image (PIL, loaded, in the mode stored), its class index (None in retrieval) and captions."""

    key: str
    image: PIL.Image.Image
    label: int | None
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BenchmarkSet:
    """One split of a benchmark dataset, opened and checked; `examples()` streams it.

    name: the dataset's name in CLIP_benchmark's results JSON ("wds/cars"); task: "zeroshot_classification" or
    "zeroshot_retrieval"; classnames and templates: a classification set's (None in retrieval); size: the number
    of examples when known without decoding them (None for compressed tars)."""

    name: str
    root: str
    split: str
    task: str
    classnames: tuple[str, ...] | None
    templates: tuple[str, ...] | None
    size: int | None
    _read: Callable[[], Iterator[Example]] = dataclasses.field(repr=False, compare=False)

    def examples(self) -> Iterator[Example]:
        """The split's examples in CLIP_benchmark's order (tars 0..n-1, samples in tar order; an image folder's
        classes sorted and files sorted, as torchvision's ImageFolder), one in memory at a time. Any sample
        that cannot be read is an InputError naming its file: a benchmark number is over the whole split."""
        return self._read()


def open_benchmark(dataset: str | os.PathLike, split: str = "test", *, name: str | None = None,
                   classnames: Sequence[str] | str | os.PathLike | None = None,
                   templates: Sequence[str] | str | os.PathLike | None = None,
                   revision: str | None = None) -> BenchmarkSet:
    """Opens one split of a benchmark dataset, checking its layout, class names and templates.

    `dataset` is one of:
      - a folder in CLIP_benchmark's webdataset layout: ROOT/SPLIT/{0..n-1}.tar with ROOT/SPLIT/nshards.txt;
        samples of an image (webp, png, jpg or jpeg) and a `cls` class index (classification) or a `txt` of
        newline-separated captions (retrieval, when ROOT/dataset_type.txt says "retrieval"); ROOT/classnames.txt
        and ROOT/zeroshot_classification_templates.txt. Every sample's members are checked when it is opened
        (uncompressed tars), every image when it is read.
      - an image folder per class as torchvision's ImageFolder reads it: ROOT/SPLIT/CLASS/*.jpg if ROOT/SPLIT
        exists, else ROOT/CLASS/*.jpg (then any split reads the same images); classes sorted by folder name,
        labels their index; class names from ROOT/classnames.txt (one per line, in that order), else
        `classnames`, else the folder names.
      - a dualenc JSONL (or CSV) caption file, as dualenc.data.read_pairs reads it (it is the split, whatever
        `split` says): retrieval over every image's captions, or, when every row has a "label" and `classnames`
        is given, classification (a label is a class name).
      - a Hugging Face dataset id ("clip-benchmark/wds_cars", when no such path exists) in the webdataset layout:
        the split's tars, its nshards.txt and the root's .txt files are downloaded into the hub cache, or read
        from it under HF_HUB_OFFLINE=1 (see dualenc.hub.resolve).

    The dataset's own files come first; `classnames` and `templates` are for sets without them (and ignored in
    retrieval). classnames: a list, a file (one per line), or a built-in name of names.DATASETS ("imagenet1k").
    templates: a list, a file (one per line), a built-in dataset name (names.templates), or a dualenc template set
    ("openai_imagenet"); each with one "{c}" or "{}" for the class name. Without either, templates are the OpenAI
    ImageNet 80 ("openai_imagenet"): dualenc's choice, where CLIP_benchmark refuses a webdataset without them.

    Args:
      dataset: the path or hub id.
      split: the split's folder name ("test", "train", ...).
      name: the dataset's name in the results (default "wds/" + the folder's or id's last part without "wds_",
        e.g. "wds/cars"; an image folder's or caption file's base name).
      revision: a branch, tag or commit of a hub dataset.

    Raises:
      InputError: a layout, file or sample that cannot be read as a benchmark (one line naming the file).
      FileNotFoundError: no such path, and no such hub dataset (a one-line message saying what to do).
    """
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise InputError(f"split must be a folder name (letters, digits, '_', '-', '.'), got {split!r}")
    path = os.fspath(dataset)
    if not isinstance(path, str) or not path:
        raise InputError(f"dataset must be a path or a hub dataset id, got {dataset!r}")
    found = hub.resolve(path, revision=revision, repo_type="dataset", allow_patterns=split_patterns(split))
    if found != path:
        return _open_wds(found, split, name or _wds_name(path), classnames, templates)
    if revision is not None:
        raise InputError(f"revision applies to hub dataset ids; {path} is a local path")
    if os.path.isfile(path):
        return _open_pairs(path, split, name, classnames, templates)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset not found: {path} (give {_LAYOUTS})")
    if _is_wds(path):
        return _open_wds(path, split, name or _wds_name(path), classnames, templates)
    return _open_folder(path, split, name, classnames, templates)


def split_patterns(split: str) -> list[str]:
    """The files of one split of a webdataset-layout hub dataset (huggingface_hub's allow patterns)."""
    return [f"{split}/*.tar", f"{split}/{NSHARDS_FILE}", CLASSNAMES_FILE, TEMPLATES_FILE, TYPE_FILE]


# ------------------------------------------------------------------------------------------------ names, files

def _wds_name(path: str) -> str:
    last = os.path.basename(os.path.normpath(path))
    return "wds/" + last.removeprefix("wds_")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_FILE + 1)
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_TEXT_FILE:
        raise InputError(f"{path} is over {MAX_TEXT_FILE >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _lines(path: str, what: str) -> tuple[str, ...]:
    """A file's lines, each stripped (as CLIP_benchmark reads its .txt files); an empty one is refused."""
    lines = tuple(line.strip() for line in _read_text(path).splitlines())
    if not lines:
        raise InputError(f"{path} holds no {what}")
    for i, line in enumerate(lines):
        if not line:
            raise InputError(f"{path}: line {i + 1} is empty (one {what[:-1]} a line)")
    return lines


def _template_source(value, own: str | None) -> tuple[str, ...]:
    """A classification set's templates: its own file, else `value`, else the default (DEFAULT_TEMPLATES)."""
    if own is not None and os.path.isfile(own):
        lines = _lines(own, "templates")
        for i, t in enumerate(lines):
            try:
                templates_.resolve([t])
            except InputError:
                raise InputError(f"{own}: line {i + 1} {t!r} must have exactly one '{{c}}' or '{{}}' for the "
                                 f"class name") from None
        return lines
    if value is None:
        return tuple(templates_.resolve(DEFAULT_TEMPLATES))
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.path.isfile(text):
            return _template_source(None, text)
        if text in templates_.TEMPLATE_SETS:
            return tuple(templates_.resolve(text))
        try:
            return tuple(names.templates(text))
        except InputError as e:
            raise InputError(f"templates={text!r} is neither a file, a dualenc template set "
                             f"({', '.join(templates_.TEMPLATE_SETS)}) nor a built-in dataset: {e}") from None
    try:
        return tuple(templates_.resolve(list(value)))
    except InputError as e:
        raise InputError(f"templates=: {e}") from None


def _classname_source(value, where: str) -> tuple[str, ...]:
    """classnames= as a list, a file (one per line) or a built-in dataset name."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.path.isfile(text):
            return _lines(text, "class names")
        try:
            return tuple(names.classnames(text))
        except InputError as e:
            raise InputError(f"classnames={text!r} is neither a file nor a built-in dataset: {e}") from None
    values = tuple(value)
    for i, c in enumerate(values):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"classnames[{i}] = {c!r} must be a non-empty string ({where})")
    if not values:
        raise InputError(f"classnames is empty ({where})")
    return values


def _decode(data: bytes, where: str):
    """The image of encoded bytes, loaded, in its stored mode (no EXIF rotation, as CLIP_benchmark's readers)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.UnidentifiedImageError:
        raise InputError(f"{where}: the image cannot be decoded (not an image format pillow reads)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: image refused ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; truncated data too
        raise InputError(f"{where}: the image cannot be decoded ({e})") from None
    return image


def _read_image(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"image {path} cannot be read ({e.strerror or e})") from None
    return _decode(data, f"image {path}")


# ------------------------------------------------------------------------------------------------ webdataset

def _is_wds(root: str) -> bool:
    """Whether a folder is in CLIP_benchmark's webdataset layout (its type or templates file, or a split folder
    with nshards.txt or 0.tar), rather than an image folder."""
    if any(os.path.isfile(os.path.join(root, f)) for f in (TYPE_FILE, TEMPLATES_FILE)):
        return True
    with os.scandir(root) as entries:
        return any(e.is_dir() and any(os.path.isfile(os.path.join(e.path, f)) for f in (NSHARDS_FILE, "0.tar"))
                   for e in entries)


def _task(root: str) -> str:
    """The task dataset_type.txt names, read as CLIP_benchmark reads it (no file: classification)."""
    path = os.path.join(root, TYPE_FILE)
    if not os.path.isfile(path):
        return CLASSIFICATION
    kind = _read_text(path).strip().lower()
    if kind == "retrieval":
        return RETRIEVAL
    if kind in ("", "classification"):
        return CLASSIFICATION
    if kind == "multilabel":
        raise InputError(f"{path} says multilabel: CLIP_benchmark's multilabel classification (.npy labels) is not "
                         f"supported yet")
    raise InputError(f"{path} says {kind[:40]!r}; CLIP_benchmark's types are classification (or no file), "
                     f"retrieval and multilabel")


def _open_wds(root: str, split: str, name: str, classnames, templates) -> BenchmarkSet:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        with os.scandir(root) as entries:
            splits = sorted(e.name for e in entries if os.path.isfile(os.path.join(e.path, NSHARDS_FILE)))
        raise InputError(f"split folder {folder} not found (splits there: {', '.join(splits) or 'none'})")
    count_file = os.path.join(folder, NSHARDS_FILE)
    if not os.path.isfile(count_file):
        raise InputError(f"{count_file} not found: CLIP_benchmark's webdataset layout names a split's number of "
                         f"tars there (then {split}/0.tar .. {split}/N-1.tar)")
    text = _read_text(count_file).strip()
    if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= MAX_SHARDS:
        raise InputError(f"{count_file} must hold the number of tars (1 to {MAX_SHARDS}), got {text[:40]!r}")
    shards = [os.path.join(folder, f"{i}.tar") for i in range(int(text))]
    for shard in shards:
        if not os.path.isfile(shard):
            raise InputError(f"tar {shard} not found ({count_file} says {len(shards)} tars)")
    task, names_, prompts = _task(root), None, None
    if task == CLASSIFICATION:
        own = os.path.join(root, CLASSNAMES_FILE)
        if os.path.isfile(own):
            names_ = _lines(own, "class names")
        elif classnames is not None:
            names_ = _classname_source(classnames, f"for {root}")
        else:
            raise InputError(f"{own} not found: a classification set needs its class names; pass classnames= a "
                             f"list, a file (one per line) or a built-in name from dualenc.benchmark.names.DATASETS "
                             f"(e.g. imagenet1k)")
        prompts = _template_source(templates, os.path.join(root, TEMPLATES_FILE))
    counts = [_scan(shard, task) for shard in shards]
    size = None if None in counts else sum(counts)
    if size == 0:
        raise InputError(f"split {folder} is empty: its {len(shards)} tars hold no sample")
    n_classes = len(names_) if names_ else 0
    return BenchmarkSet(name, root, split, task, names_, prompts, size,
                        lambda: _wds_examples(folder, shards, task, n_classes))


class _Headers:
    """An uncompressed tar file as tarfile reads it for its member headers: seeks over the data, and refuses a
    header read of over MAX_HEADER bytes (a PAX record or long name from a hostile tar)."""

    def __init__(self, f, path: str):
        self.f, self.path = f, path

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_HEADER:
            raise InputError(f"tar {self.path} is damaged: a member's headers are over {MAX_HEADER >> 10} KiB")
        return self.f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _scan(path: str, task: str) -> int | None:
    """The number of samples of an uncompressed tar, from its member headers alone, each sample checked to hold
    what CLIP_benchmark reads (one image of WDS_IMAGES, and a .cls or a .txt); None for a compressed tar, which
    only examples() reads (and checks)."""
    need = "cls" if task == CLASSIFICATION else "txt"

    def check(key: str, exts: set) -> None:
        where, images = f"tar {path}, sample {key}", [e for e in WDS_IMAGES if e in exts]
        if len(images) != 1:
            raise InputError(f"{where}: several images ({', '.join(images)}); keep one a sample" if images else
                             f"{where}: no {', '.join(WDS_IMAGES)} image (members: {', '.join(sorted(exts))})")
        if need not in exts:
            raise InputError(f"{where}: no .{need} member (" + ("its class index)" if need == "cls" else
                                                               "its captions, one a line)"))

    count, key, exts = 0, None, set()
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED):
            return None
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=_Headers(f, path), mode="r:")
            while (member := tar.next()) is not None:
                tar.members.clear()
                split = _member_key(member.name) if member.isreg() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        check(key, exts)
                    count, key, exts = count + 1, split[0], set()
                exts.add(split[1])
        except InputError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise InputError(f"tar {path} is damaged ({e})") from None
        # tarfile ends quietly at a missing or damaged header: a whole tar ends with a zero block there
        f.seek(tar.offset)
        if f.read(512) != bytes(512):
            raise InputError(f"tar {path} is damaged (truncated, or an invalid member header at byte {tar.offset})")
    if key is not None:
        check(key, exts)
    return count


def _member_key(name: str) -> tuple[str, str] | None:
    """(key, lowercased extension) of a tar member name as webdataset groups samples: the key is the name up to
    the first "." of its file name; None for a name without one."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _check_skipped(path: str, skipped: collections.Counter) -> None:
    if skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        raise InputError(f"tar {path} cannot be read whole ({reasons}); a benchmark is scored over every sample "
                         f"of the split: repair or rewrite the tar")


def _wds_examples(folder: str, shards: list[str], task: str, n_classes: int) -> Iterator[Example]:
    seen = 0
    for path in shards:
        skipped = collections.Counter()
        tar = os.path.basename(path)
        for sample in iter_tar(path, skipped, captioned=task == RETRIEVAL):
            _check_skipped(path, skipped)
            where = f"tar {path}, sample {sample.key}"
            if sample.ext not in WDS_IMAGES:
                raise InputError(f"{where}: a .{sample.ext} image; CLIP_benchmark reads {', '.join(WDS_IMAGES)}")
            label, captions = None, ()
            if task == CLASSIFICATION:
                label = _label(sample.label, where, n_classes)
            else:
                captions = tuple(line for text in sample.captions for line in text.splitlines())
                if not all(c.strip() for c in captions):
                    raise InputError(f"{where}: an empty line among its captions (one caption a line)")
            seen += 1
            yield Example(f"{tar}/{sample.key}", _decode(sample.image, where), label, captions)
        _check_skipped(path, skipped)
    if not seen:
        raise InputError(f"split {folder} is empty: its {len(shards)} tars hold no sample")


def _label(value: str | None, where: str, n_classes: int) -> int:
    if value is None or not _INT.fullmatch(value):
        raise InputError(f"{where}: " + ("no .cls class index" if value is None else
                                         f".cls holds {value[:40]!r}, not a class index"))
    label = int(value)
    if not 0 <= label < n_classes:
        raise InputError(f"{where}: class {label} is outside the {n_classes} class names (0 to {n_classes - 1})")
    return label


# ------------------------------------------------------------------------------------------------ image folders

def _open_folder(root: str, split: str, name: str | None, classnames, templates) -> BenchmarkSet:
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        base = root
        with os.scandir(root) as entries:
            splits = sorted(e.name for e in entries if e.is_dir() and e.name in SPLIT_NAMES)
        if splits:
            raise InputError(f"split folder {os.path.join(root, split)} not found (splits there: "
                             f"{', '.join(splits)})")
    with os.scandir(base) as entries:
        classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise InputError(f"{base} holds no class folders: give {_LAYOUTS}")
    items, empty = [], []
    for label, folder in enumerate(classes):
        found = [os.path.join(where, f) for where, _, files in sorted(os.walk(os.path.join(base, folder),
                                                                              followlinks=True))
                 for f in sorted(files) if f.lower().endswith(FOLDER_IMAGES)]
        empty += [] if found else [folder]
        items += [(p, label) for p in found]
    if empty:
        raise InputError(f"{len(empty)} class folders of {base} hold no image ({', '.join(empty[:5])}"
                         + (", ..." if len(empty) > 5 else "") + f"; images end in {', '.join(FOLDER_IMAGES)})")
    own = os.path.join(root, CLASSNAMES_FILE)
    if os.path.isfile(own):
        names_, source = _lines(own, "class names"), own
    elif classnames is not None:
        names_, source = _classname_source(classnames, f"for {base}"), "classnames="
    else:
        names_, source = tuple(classes), None
    if len(names_) != len(classes):
        raise InputError(f"{source} gives {len(names_)} class names for the {len(classes)} class folders of {base}")
    prompts = _template_source(templates, os.path.join(root, TEMPLATES_FILE))

    return BenchmarkSet(name or os.path.basename(os.path.normpath(root)), root, split, CLASSIFICATION, names_,
                        prompts, len(items), lambda: (Example(p, _read_image(p), y, ()) for p, y in items))


# ------------------------------------------------------------------------------------------------ caption files

def _open_pairs(path: str, split: str, name: str | None, classnames, templates) -> BenchmarkSet:
    from dualenc.data.pairs import read_pairs

    pairs = read_pairs(path)
    if pairs.skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(pairs.skipped.items()))
        raise InputError(f"{path}: rows skipped ({reasons}); a benchmark is scored over every row: fix them")
    captions = [[] for _ in pairs.images]
    for text, owner in zip(pairs.captions, pairs.caption_image):
        captions[int(owner)].append(text)
    unlabelled = [] if pairs.labels is None else [i for i, label in enumerate(pairs.labels) if label == ""]
    if pairs.labels is not None and unlabelled:
        raise InputError(f"{path}: {len(unlabelled)} of {len(pairs.images)} images have no label (the first: "
                         f"{pairs.images[unlabelled[0]]}): label every image, or none for retrieval")
    task, names_, prompts, labels = RETRIEVAL, None, None, [None] * len(pairs.images)
    if pairs.labels is not None and classnames is not None:
        task, names_ = CLASSIFICATION, _classname_source(classnames, f"for {path}")
        index = {c: i for i, c in reversed(list(enumerate(names_)))}
        for i, label in enumerate(pairs.labels):
            if label not in index:
                raise InputError(f"{path}: the label {label!r} of {pairs.images[i]} is not one of the "
                                 f"{len(names_)} class names")
        labels = [index[label] for label in pairs.labels]
        prompts = _template_source(templates, None)

    def read() -> Iterator[Example]:
        for image, label, texts in zip(pairs.images, labels, captions):
            yield Example(image, _read_image(image), label, tuple(texts))

    stem = os.path.splitext(os.path.basename(path))[0]
    return BenchmarkSet(name or stem, path, split, task, names_, prompts, len(pairs.images), read)
