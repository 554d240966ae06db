"""CLIP_benchmark's tasks on a dualenc model: zero-shot classification, zero-shot retrieval and the linear probe,
streamed over a dataset split (images are decoded, encoded and dropped a batch at a time: memory holds the
embeddings only), and their results in CLIP_benchmark's JSON layout.

Every image batch has exactly `batch_size` rows (the last one padded) and every prompt batch exactly
`text_batch_size`, so one model evaluated on several datasets compiles each tower once per shape, not once per
dataset.
"""

from __future__ import annotations

import math
import os
import re
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from dualenc import encode, evaluate, files
from dualenc.benchmark import metrics
from dualenc.benchmark.datasets import BenchmarkSet
from dualenc.errors import InputError

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
RECALL_K = (1, 5, 10)
# CLIP_benchmark's default name for a results file (its --output), with "/" in any field made "_".
OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
SETTINGS = ("epochs", "seed", "fewshot_k", "normalized")  # the linear probe's settings among its metrics


class Encoded(NamedTuple):
    """A split's image embeddings (n, d) float32 in the dataset's order, with each image's label (or -1) and,
    for retrieval, its captions' embeddings and owners."""

    images: np.ndarray
    labels: np.ndarray
    keys: list
    captions: list
    caption_image: np.ndarray


class Model(NamedTuple):
    """What the tasks need of a model: its config, params (placed once on this process's devices) and processor,
    and the encoding settings (batch sizes, compute dtype, devices)."""

    config: object
    params: object
    processor: object
    batch_size: int = 32
    text_batch_size: int = 64
    dtype: object = None
    devices: object = None

    @classmethod
    def load(cls, path: str, **settings) -> "Model":
        """A model directory or hub id (dualenc.load_pretrained + Processor.from_pretrained), params replicated."""
        import dualenc

        from dualenc.hub import resolve

        path = resolve(path)
        config, params = dualenc.load_pretrained(path)
        return cls(config, encode.replicate(params, settings.get("devices")), dualenc.Processor.from_pretrained(path),
                   **settings)


def _batches(model: Model, data: BenchmarkSet, progress: bool | None, labels: list, keys: list,
             captions: list | None = None, owners: list | None = None) -> Iterator[np.ndarray]:
    """The split's image embeddings a batch at a time (float32 (rows, d)), in the dataset's order; each example's
    label (or -1) and key are appended to `labels` and `keys` as it is read (and its captions and their image's
    index to `captions` and `owners`, when given)."""
    def images() -> Iterator:
        for i, example in enumerate(data.examples()):
            labels.append(-1 if example.label is None else example.label)
            keys.append(example.key)
            if captions is not None:
                captions.extend(example.captions)
                owners.extend([i] * len(example.captions))
            yield example.image

    for _, rows in encode.stream_images(model.params, model.config, model.processor, images(),
                                        batch_size=model.batch_size, dtype=model.dtype, progress=progress,
                                        devices=model.devices, total=data.size):
        yield rows


def encode_split(model: Model, data: BenchmarkSet, *, progress: bool | None = None,
                 with_captions: bool = False) -> Encoded:
    """Streams a split through the image tower: embeddings, labels and keys in the dataset's order (and with
    with_captions, every caption and its image's index; caption embeddings are the caller's). The embeddings
    are filled into one array as they come when the split's size is known (no second copy)."""
    labels, keys, captions, owners = [], [], [], []
    batches = _batches(model, data, progress, labels, keys, *((captions, owners) if with_captions else ()))
    parts, out, filled = [], None, 0
    for rows in batches:
        if data.size is not None and out is None:
            out = np.empty((data.size, rows.shape[1]), np.float32)
        if out is not None and filled + len(rows) <= len(out):
            out[filled:filled + len(rows)] = rows
        else:
            parts.append(rows)
        filled += len(rows)
    if not filled:
        raise InputError(f"{data.root}: split {data.split!r} has no examples")
    if out is not None:
        images = out[:filled] if not parts else np.concatenate([out[:filled - sum(map(len, parts))], *parts])
    else:
        images = np.concatenate(parts)
    return Encoded(images, np.asarray(labels, np.int64), keys, captions, np.asarray(owners, np.int64))


def classifier(model: Model, data: BenchmarkSet) -> np.ndarray:
    """(d, n_classes) zero-shot weights of the split's class names and templates, as CLIP_benchmark builds them."""
    if not data.classnames or not data.templates:
        raise InputError(f"{data.root}: zero-shot classification needs class names and templates")
    return evaluate.zero_shot_classifier(model.params, model.config, model.processor, data.classnames,
                                         data.templates, batch_size=model.text_batch_size, dtype=model.dtype,
                                         devices=model.devices, exact_batch=True)


def zeroshot_classification(model: Model, data: BenchmarkSet, *, progress: bool | None = None,
                            details: dict | None = None) -> dict:
    """{"acc1", "acc5", "mean_per_class_recall"}: CLIP_benchmark's zero-shot classification of the split.

    A prediction ranks the classes by cosine similarity; the model's logit scale and bias (and whether it was
    trained with softmax or sigmoid) change no ranking, so they change no metric here. Each batch is scored
    and ranked as it comes and only its 5 best classes are kept, so memory does not grow with the split (past
    its labels). `details`, when given, receives "labels", "predictions" (the best class) and "top" (n, 5)
    for figures and error analysis, and "keys".
    """
    weights = classifier(model, data)
    labels, keys, tops = [], [], []
    for rows in _batches(model, data, progress, labels, keys):
        tops.append(metrics.top_k(rows @ weights, 5))
    if not tops:
        raise InputError(f"{data.root}: split {data.split!r} has no examples")
    labels, top = np.asarray(labels, np.int64), np.concatenate(tops)
    if (labels < 0).any():
        raise InputError(f"{data.root}: split {data.split!r} has images without a class label")
    out = metrics.ranked_metrics(top, labels, len(data.classnames))
    if details is not None:
        details.update(labels=labels, predictions=top[:, 0], top=top, keys=keys)
    return out


def zeroshot_retrieval(model: Model, data: BenchmarkSet, *, recall_k: Sequence[int] = RECALL_K,
                       progress: bool | None = None, details: dict | None = None) -> dict:
    """{"image_retrieval_recall@k", "text_retrieval_recall@k"} for each k: CLIP_benchmark's zero-shot retrieval
    of the split (every image with its captions). `details` receives the embeddings and caption owners."""
    found = encode_split(model, data, progress=progress, with_captions=True)
    if not found.captions:
        raise InputError(f"{data.root}: split {data.split!r} has no captions to retrieve")
    texts = encode.encode_texts(model.params, model.config, model.processor, iter(found.captions),
                                batch_size=model.text_batch_size, dtype=model.dtype, devices=model.devices)
    out = metrics.retrieval_recall(found.images, texts, found.caption_image, recall_k)
    if details is not None:
        details.update(image_embeds=found.images, text_embeds=texts, caption_image=found.caption_image)
    return out


def linear_probe(model: Model, train: BenchmarkSet, test: BenchmarkSet, val: BenchmarkSet | None = None, *,
                 fewshot_k: int = -1, epochs: int = 10, lr: float = 0.1, batch_size: int = 64, seed: int = 0,
                 randomness: str = "numpy", progress: bool | None = None) -> dict:
    """CLIP_benchmark's linear probe: a logistic regression on the frozen, normalised image embeddings of the
    train split, its weight decay swept on `val` (when given), scored on `test`. Keys as CLIP_benchmark's:
    lp_acc1, lp_acc5, lp_mean_per_class_recall, weight_decay, epochs, seed, fewshot_k, normalized.
    See dualenc.benchmark.linear_probe.linear_probe for the protocol and `randomness`."""
    from dualenc.benchmark import linear_probe as probe

    parts = [encode_split(model, s, progress=progress) if s is not None else None for s in (train, val, test)]
    for s, found in zip((train, val, test), parts):
        if found is not None and (found.labels < 0).any():
            raise InputError(f"{s.root}: split {s.split!r} has images without a class label")
    tr, va, te = parts
    return probe.linear_probe(tr.images, tr.labels, te.images, te.labels,
                              None if va is None else va.images, None if va is None else va.labels,
                              fewshot_k=fewshot_k, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                              randomness=randomness)


def result(dataset: str, model: str, task: str, found: dict, *, pretrained: str = "", language: str = "en",
           **extra) -> dict:
    """One evaluation in CLIP_benchmark's results layout: {"dataset", "model", "pretrained", "task", "metrics",
    "language"} (and any `extra` fields, such as "classnames" or "templates" when asked)."""
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": dict(found),
            "language": language, **extra}


def output_path(folder: str, record: dict, template: str = OUTPUT) -> str:
    """Where a result goes: CLIP_benchmark's file name for it (any "/" in a field made "_"), in `folder`."""
    fields = {k: str(record[k]).replace("/", "_").replace(os.sep, "_")
              for k in ("dataset", "model", "pretrained", "task", "language")}
    return os.path.join(folder, template.format(**fields))


def write_result(folder: str, record: dict) -> str:
    """Writes a result atomically as CLIP_benchmark does (json.dump of the dict: NaN stays NaN), returns its path."""
    import json

    os.makedirs(folder, exist_ok=True)
    path = output_path(folder, record)
    files.write_text_atomic(path, json.dumps(record))
    return path


def table(records: Sequence[dict]) -> str:
    """The results as one text table: a row per (dataset, task), a column per metric (blank where absent)."""
    columns = list(dict.fromkeys(k for r in records for k, v in r["metrics"].items()
                                 if _is_number(v) and k not in SETTINGS))
    head = ["dataset", "task"] + [_short(c) for c in columns]
    rows = [[r["dataset"], r["task"]] + [_cell(r["metrics"].get(c)) for c in columns] for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _short(column: str) -> str:
    return re.sub(r"^(image|text)_retrieval_recall@", lambda m: ("i" if m[1] == "image" else "t") + "R@", column)


class Compiles:
    """Counts the programs jax lowers while open (each one compiled, or read from the compilation cache): a
    second dataset of the same model should add none. A context manager; `count` is the running total."""

    LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, seconds: float, **_) -> None:
        if event == self.LOWERED:
            self.count += 1

    def __enter__(self) -> "Compiles":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)
