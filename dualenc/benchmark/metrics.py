"""CLIP_benchmark's metrics on embeddings and scores: top-k accuracy, mean per-class recall, retrieval recall@k.

They follow LAION's CLIP_benchmark (clip_benchmark.metrics) to the count, with two choices of ours where its code
leaves them to torch: ties in a ranking go to the lower index (torch.topk does not promise an order), and a
fraction is the exact quotient of its counts (CLIP_benchmark's retrieval rounds it to float32 first; the two
differ by under 1e-7).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from dualenc.errors import InputError

BLOCK = 1024  # rows of a score matrix ranked at a time


def top_k(scores, k: int) -> np.ndarray:
    """(n, min(k, m)) indices of each row's k highest scores, best first; ties go to the lower index, and NaN
    ranks above every number (as torch.topk ranks it)."""
    scores = np.asarray(scores)
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        scores = np.where(np.isnan(scores), np.inf, scores)
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k].copy()
    else:
        part = np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    values = np.take_along_axis(scores, part, axis=1)
    out = np.take_along_axis(part, np.lexsort((part, -values)), axis=1)  # by score, then by index
    # where the k-th score ties with one left out, argpartition may have kept a higher index: redo those rows
    kth = values.min(axis=1, keepdims=True)
    for i in np.flatnonzero(np.sum(scores >= kth, axis=1) > k):
        row = scores[i]
        cand = np.flatnonzero(row >= kth[i])
        out[i] = cand[np.argsort(-row[cand], kind="stable")][:k]
    return out


def boundary_ties(scores, k: int) -> int:
    """How many rows have their k-th and (k+1)-th highest scores equal: rows whose top-k set depends on how ties
    are broken (CLIP_benchmark leaves that to torch.topk, whose order among equal scores is unspecified)."""
    scores = np.asarray(scores)
    if k >= scores.shape[1]:
        return 0
    part = -np.partition(-scores, (k - 1, k), axis=1)
    return int(np.sum(part[:, k - 1] == part[:, k]))


def _labels(labels, n: int, what: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what} must be ({n},) integers, got {labels.shape} {labels.dtype}")
    return labels.astype(np.int64)


def topk_accuracy(scores, labels, ks: Sequence[int] = (1, 5)) -> list[float]:
    """The share of rows whose label is among their k highest scores, for each k (CLIP_benchmark's accuracy)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or not len(scores):
        raise InputError(f"scores must be (n, n_classes) with n >= 1, got {scores.shape}")
    labels = _labels(labels, len(scores))
    top = top_k(scores, max(ks))
    hit = top == labels[:, None]
    return [float(hit[:, :k].any(axis=1).sum() / len(labels)) for k in ks]


def mean_per_class_recall(labels, predictions) -> float:
    """The mean over the classes present in `labels` of the share of their rows predicted right
    (scikit-learn's balanced_accuracy_score, which CLIP_benchmark reports as mean_per_class_recall)."""
    labels = np.asarray(labels, np.int64)
    predictions = _labels(predictions, len(labels), "predictions")
    classes = np.unique(labels)
    if not len(classes):
        raise InputError("mean_per_class_recall needs at least one row")
    if np.setdiff1d(predictions, classes).size:
        warnings.warn("mean_per_class_recall: some predicted classes have no row of their own (scikit-learn warns "
                      "alike); they lower the recall of the classes they took rows from only", UserWarning,
                      stacklevel=2)
    recalls = [np.mean(predictions[labels == c] == c) for c in classes]
    return float(np.mean(recalls))


def classification_metrics(scores, labels, n_classes: int | None = None) -> dict:
    """{"acc1", "acc5", "mean_per_class_recall"} of zero-shot scores (n, n_classes), as CLIP_benchmark reports
    them: acc5 is NaN with fewer than 5 classes; a prediction is the highest score (ties to the lower class)."""
    scores = np.asarray(scores)
    n_classes = scores.shape[1] if n_classes is None else n_classes
    labels = _labels(labels, len(scores))
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    return ranked_metrics(top_k(scores, 5), labels, n_classes)


def ranked_metrics(top, labels, n_classes: int) -> dict:
    """classification_metrics from each row's best classes, best first (top_k(scores, 5): what a streamed
    evaluation keeps of its scores)."""
    top = np.asarray(top)
    labels = _labels(labels, len(top))
    if top.ndim != 2 or top.shape[1] < min(5, n_classes):
        raise InputError(f"top must be (n, {min(5, n_classes)}) class indices, got {top.shape}")
    hit = top == labels[:, None]
    acc1 = float(hit[:, 0].sum() / len(labels))
    acc5 = float(hit[:, :5].any(axis=1).sum() / len(labels)) if n_classes >= 5 else float("nan")
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall(labels, top[:, 0])}


def retrieval_recall(image_embeds, text_embeds, text_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """CLIP_benchmark's zero-shot retrieval recall@k, for images with one or more captions each.

    image_retrieval_recall@k is the share of texts whose own image is among the k images scoring highest with it;
    text_retrieval_recall@k the share of images with at least one of their own texts among the k texts scoring
    highest with them. Scores are dot products (pass normalised embeddings); ties go to the lower index.

    Args:
      image_embeds: (n_images, d); text_embeds: (n_texts, d);
      text_image: (n_texts,) the index of each text's image.
    """
    images, texts = np.asarray(image_embeds, np.float32), np.asarray(text_embeds, np.float32)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1] or not len(images) or not len(texts):
        raise InputError(f"image_embeds {images.shape} and text_embeds {texts.shape} must be (n, d) and (m, d), "
                         f"n, m >= 1")
    owner = _labels(text_image, len(texts), "text_image")
    if owner.min() < 0 or owner.max() >= len(images):
        raise InputError(f"text_image holds indices outside [0, {len(images)})")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise InputError(f"recall k must be positive, got {ks}")
    kmax, tied = max(ks), 0
    text_hit = np.zeros((len(texts), len(ks)), bool)
    for start in range(0, len(texts), BLOCK):
        scores = texts[start:start + BLOCK] @ images.T
        top = top_k(scores, kmax)
        mine = top == owner[start:start + BLOCK, None]
        text_hit[start:start + BLOCK] = [[row[:k].any() for k in ks] for row in mine]
        tied += sum(boundary_ties(scores, k) for k in ks)
    image_hit = np.zeros((len(images), len(ks)), bool)
    for start in range(0, len(images), BLOCK):
        scores = images[start:start + BLOCK] @ texts.T
        top = top_k(scores, kmax)
        mine = owner[top] == np.arange(start, start + len(top))[:, None]
        image_hit[start:start + BLOCK] = [[row[:k].any() for k in ks] for row in mine]
        tied += sum(boundary_ties(scores, k) for k in ks)
    if tied:
        warnings.warn(f"retrieval_recall: {tied} rankings have equal scores across their top-k cut (identical "
                      f"captions or images?): dualenc ranks ties by index (the lower first); CLIP_benchmark leaves "
                      f"them to torch.topk's unspecified order, so its recall there may differ", UserWarning,
                      stacklevel=2)
    out = {}
    for j, k in enumerate(ks):
        out[f"image_retrieval_recall@{k}"] = float(text_hit[:, j].sum() / len(texts))
        out[f"text_retrieval_recall@{k}"] = float(image_hit[:, j].sum() / len(images))
    return out


def confused_pairs(labels, predictions, classnames: Sequence[str], top: int = 20) -> list[dict]:
    """The `top` most frequent mistakes: [{"true", "predicted", "count", "share"}] (share of the true class's rows),
    most frequent first (ties: by true class, then predicted class)."""
    labels = np.asarray(labels, np.int64)
    predictions = _labels(predictions, len(labels), "predictions")
    wrong = labels != predictions
    pairs, counts = np.unique(np.stack([labels[wrong], predictions[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top] if len(pairs) else []
    rows = np.bincount(labels, minlength=len(classnames))
    return [{"true": classnames[pairs[i, 0]], "predicted": classnames[pairs[i, 1]], "count": int(counts[i]),
             "share": float(counts[i] / rows[pairs[i, 0]])} for i in order]
