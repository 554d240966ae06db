"""Image-text pair datasets: caption files (JSONL/CSV) over an image folder, the embedded digits set, batching.

Bad rows (a missing or unreadable image, an empty caption, a path outside the data folder) are skipped and
counted, never silently: `PairDataset.skipped` and `Batches.skipped` hold the counts by reason.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from dualenc.data import captions as caption_files
from dualenc.errors import DataError
from dualenc.processing.processor import image_inputs

MAX_CAPTION_FILE = 1 << 30


class PairDataset(NamedTuple):
    """Images (paths or HWC uint8 arrays), captions, and which image each caption describes."""

    images: list
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) index into images
    labels: np.ndarray | None = None  # (n_images,) class ids or names, when the dataset has them
    classnames: tuple[str, ...] | None = None
    skipped: collections.Counter = collections.Counter()

    def __len__(self) -> int:
        return len(self.captions)

    def relevance(self, rule: str = "auto") -> dict:
        """`retrieval_metrics`' keywords for which captions are relevant to which images.

        rule: "instance": a caption is relevant to its own image only (captions written for each image);
        "label": to every image of its image's label (class-level captions such as "a photo of a seven", which
        repeat across the images of a class and would otherwise tie against each other); "auto": "label" when
        every image has a label, else "instance" (what `dualenc eval` does).
        """
        if rule not in ("auto", "instance", "label"):
            raise DataError(f"relevance rule must be 'auto', 'instance' or 'label', got {rule!r}")
        labelled = self.labels is not None and len(self.labels) == len(self.images) and all(
            label is not None and label != "" for label in self.labels)
        if rule == "label" and not labelled:
            raise DataError("relevance 'label' needs a label for every image; this dataset has "
                            + ("none" if self.labels is None else "some images without one"))
        if rule == "instance" or (rule == "auto" and not labelled):
            return {"text_to_image": np.asarray(self.caption_image)}
        labels = np.asarray(self.labels)
        return {"image_labels": labels, "text_labels": labels[np.asarray(self.caption_image)]}


def read_pairs(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
               allow_outside: bool = False) -> PairDataset:
    """Reads image-caption pairs from a JSONL or CSV file.

    Each row names an image (column/key image, file_name, filename, filepath or path; relative to image_root,
    default the caption file's folder) and a caption (caption or text; in JSONL, "captions" may be a list).
    Several rows may name one image. An optional "label" gives the image's class name (then `labels` holds
    one string per image, "" where none was given). Rows with a missing image, an empty caption, or a path
    escaping the image folder (unless allow_outside) are skipped and counted in `skipped`.
    """
    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    index: dict[str, int] = {}
    images, captions, owner, labels = [], [], [], {}
    skipped = collections.Counter()
    if not path.lower().endswith(caption_files.SUFFIXES):
        raise DataError(f"caption file {path} must end in .jsonl, .csv or .tsv")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file not found: {path}") from None
    if size > MAX_CAPTION_FILE:
        raise DataError(f"caption file {path} is over {MAX_CAPTION_FILE >> 20} MiB")
    for row, _ in caption_files.rows(path, strict_utf8=True):
        parsed = caption_files.parse_row(row, root, allow_outside)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        image, texts, label = parsed
        if not os.path.isfile(image):
            skipped["missing image"] += 1
            continue
        if image not in index:
            index[image] = len(images)
            images.append(image)
        if label is not None:
            labels[index[image]] = label
        captions.extend(texts)
        owner.extend([index[image]] * len(texts))
    if not captions:
        raise DataError(f"caption file {path} has no usable pairs (skipped: {dict(skipped) or 'none'})")
    image_labels = np.array([labels.get(i, "") for i in range(len(images))], dtype=object) if labels else None
    return PairDataset(images, captions, np.asarray(owner, np.int64), image_labels, skipped=skipped)


# ------------------------------------------------------------------------------------------------ digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings used for training captions; held-out prompts may use others.
DIGIT_TEMPLATES = (
    "a photo of the digit {word}",
    "a handwritten {word}",
    "the number {digit}",
    "a picture of a {word}",
    "an image of the number {word}",
    "a scanned digit {digit}",
)


def load_digits(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2,
                templates: Sequence[str] = DIGIT_TEMPLATES, image_size: int = 32) -> PairDataset:
    """scikit-learn's handwritten digits (8x8, shipped in the package) as image-caption pairs.

    Images are upscaled to image_size x image_size RGB uint8; each image gets one caption per template
    (from the label's word or numeral). The split is stratified and fixed by seed: the test split is never
    part of train.
    """
    from sklearn.datasets import load_digits as sk_digits

    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    digits = sk_digits()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(digits.target), bool)
    for label in range(10):
        members = np.flatnonzero(digits.target == label)
        test[rng.choice(members, int(round(len(members) * test_fraction)), replace=False)] = True
    chosen = np.flatnonzero(test if split == "test" else ~test)
    scale = image_size // 8
    gray = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
    gray = np.kron(gray, np.ones((1, scale, scale), np.uint8))
    images = list(np.repeat(gray[..., None], 3, axis=-1))
    labels = digits.target[chosen].astype(np.int64)
    captions = [t.format(word=DIGIT_WORDS[y], digit=y) for y in labels for t in templates]
    owner = np.repeat(np.arange(len(images)), len(templates))
    return PairDataset(images, captions, owner, labels, DIGIT_WORDS)


def write_vocab(directory: str | os.PathLike, texts: Sequence[str]) -> str:
    """Writes a BERT vocab.txt (special tokens, then every lowercased word of `texts`) for a from-scratch text
    tower; dualenc.Tokenizer.from_pretrained(directory) then builds its WordPiece tokenizer."""
    import re

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ batching

class Batches:
    """Shuffled, fixed-shape training batches with a background prefetch thread.

    Each epoch visits every image once in a seeded random order, with one of its captions chosen at random,
    so no batch holds the same image twice. The last incomplete batch of an epoch is dropped. The stream is
    a pure function of (seed, epoch, batch index): start=(epoch, batch) resumes it exactly.

    Args:
      dataset: a PairDataset.
      processor: a Processor (its image_processor and tokenizer are used; a NaFlex image processor's batches
        carry "pixel_values", "pixel_attention_mask" and "spatial_shapes").
      max_length: tokens per caption (default: the tokenizer's own max_length).
      image_features: (n_images, D) precomputed pooled outputs of a locked vision tower (LiT cache); the
        batches then carry "image_features" instead of the images' arrays, and images are never decoded.
    """

    def __init__(self, dataset: PairDataset, processor, batch_size: int, *, seed: int = 0,
                 max_length: int | None = None,
                 start: tuple[int, int] = (0, 0), prefetch: int = 2, image_features: np.ndarray | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size > len(dataset.images):
            raise DataError(f"batch_size {batch_size} is more than the {len(dataset.images)} distinct images of the "
                            f"dataset, and a batch holds each at most once: lower batch_size to "
                            f"{len(dataset.images)} or less")
        self.dataset, self.processor, self.batch_size = dataset, processor, batch_size
        self.seed, self.max_length, self.prefetch = seed, max_length, prefetch
        self.image_features = image_features
        self.position = tuple(start)
        self.skipped = collections.Counter()
        self._captions_of = collections.defaultdict(list)
        for i, image in enumerate(dataset.caption_image):
            self._captions_of[int(image)].append(i)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset.images) // self.batch_size

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        images = rng.permutation(len(self.dataset.images))
        picks = rng.integers(0, 1 << 31, len(images))
        captions = np.array([self._captions_of[int(i)][p % len(self._captions_of[int(i)])]
                             for i, p in zip(images, picks)])
        return images, captions

    def _load(self, epoch: int, index: int, skipped: collections.Counter) -> dict:
        images, captions = self._order(epoch)
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        image_ids, caption_ids = images[rows], captions[rows]
        batch = {"image_index": image_ids}
        if self.image_features is not None:
            batch["image_features"] = np.asarray(self.image_features[image_ids], np.float32)
        else:
            rows = []
            for i in image_ids:
                try:
                    rows.append(self._image_row(i))
                except (ValueError, OSError):
                    # An image that cannot be read is replaced by the next readable one, deterministically.
                    skipped["unreadable image"] += 1
                    rows.append(self._fallback_row(i))
            batch.update({k: np.stack([row[k] for row in rows]) for k in rows[0]})
            batch["pixel_values"] = batch["pixel_values"].astype(np.float32)
        texts = [self.dataset.captions[c] for c in caption_ids]
        tokens = self.processor.tokenizer(texts, max_length=self.max_length, padding="max_length")
        batch.update({k: np.asarray(v, np.int32) for k, v in tokens.items()})
        return batch

    def _image_row(self, i: int) -> dict:
        """One image's vision inputs: {"pixel_values"}, or a NaFlex processor's three arrays, without the batch axis."""
        return {k: v[0] for k, v in image_inputs(self.processor, [self.dataset.images[i]]).items()}

    def _fallback_row(self, bad: int) -> dict:
        n = len(self.dataset.images)
        for step in range(1, n):
            try:
                return self._image_row((bad + step) % n)
            except (ValueError, OSError):
                continue
        raise DataError("no image of the dataset can be read")

    def __iter__(self) -> Iterator[tuple[tuple[int, int], dict]]:
        """Yields ((epoch, batch index), batch) forever, from self.position on."""
        out: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def produce():
            epoch, index = self.position
            try:
                while not stop.is_set():
                    if index >= self.batches_per_epoch:
                        epoch, index = epoch + 1, 0
                    skipped = collections.Counter()
                    out.put(((epoch, index), self._load(epoch, index, skipped), skipped))
                    index += 1
            except BaseException as e:  # surfaced in the consumer
                out.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                (epoch, index), batch, skipped = item
                # Counted when the batch is handed out, so batches prefetched but never used do not count.
                self.skipped.update(skipped)
                self.position = (epoch, index + 1)
                yield (epoch, index), batch
        finally:
            stop.set()
            while not out.empty():
                out.get_nowait()
