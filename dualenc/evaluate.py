"""Zero-shot classification and retrieval metrics on embeddings (the batched encoding is dualenc.encode's)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from dualenc import templates as templates_
from dualenc.config import DualEncoderConfig
from dualenc.encode import encode_images, encode_texts, length_buckets, pad_rows, stream_images  # noqa: F401
from dualenc.errors import InputError

DEFAULT_TEMPLATES = templates_.DEFAULT


def zero_shot_classifier(params, config: DualEncoderConfig, tokenizer, classnames: Sequence[str],
                         templates: str | Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 64,
                         dtype=None, devices=None, exact_batch: bool = False) -> np.ndarray:
    """Zero-shot weights, float32 (projection_dim, n_classes), as CLIP builds them.

    Each class's column is the mean of its L2-normalised template embeddings (encode_texts', with `dtype` the
    matmuls' compute dtype), renormalised.
    `templates` are format strings with one "{}" (or CLIP_benchmark's "{c}") for the class name, or the name of a
    set in dualenc.templates.TEMPLATE_SETS ("default", "openai_imagenet": the CLIP paper's 80, "openai_imagenet_7").
    exact_batch: every text batch has exactly batch_size rows (fewer prompts are not padded to a smaller power
    of two), so that classifiers of any number of classes share one compiled text tower per length bucket.
    """
    classnames, templates = list(classnames), templates_.resolve(templates)
    if not classnames:
        raise InputError("classnames is empty")
    for i, c in enumerate(classnames):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"classnames[{i}] = {c!r} must be a non-empty string")
    prompts = [templates_.fill(t, c) for c in classnames for t in templates]
    texts = iter(prompts) if exact_batch else prompts
    embeds = encode_texts(params, config, tokenizer, texts, batch_size=batch_size, dtype=dtype, devices=devices)
    return class_weights(embeds, len(classnames))


def class_weights(prompt_embeds, n_classes: int) -> np.ndarray:
    """Zero-shot weights (d, n_classes) from the normalised embeddings of each class's prompts, class by class
    (n_classes * n_templates, d): each column the mean of its class's rows, renormalised."""
    embeds = np.asarray(prompt_embeds, np.float32)
    mean = embeds.reshape(n_classes, len(embeds) // n_classes, -1).mean(axis=1)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    return np.ascontiguousarray(mean.T, np.float32)


def zero_shot_predict(image_embeds, classifier, k: int = 1, *, params=None, logit_scale: float | None = None,
                      logit_bias: float | None = None):
    """Top-k classes per image: (indices (n, min(k, n_classes)) int, probabilities (n, min(k, n_classes)) float32).

    The logits are logit_scale * image_embeds @ classifier, at the model's own scale: pass `params` (its
    exp(logit_scale), and its logit_bias when it has one), or an explicit logit_scale (CLIP's papers use 100).
    Probabilities are the softmax over all classes or, with a logit bias (SigLIP models, or any model trained
    with the sigmoid loss), each label's own sigmoid(logits + logit_bias): independent yes/no probabilities
    that need not sum to 1. A k larger than the number of classes gives every class, best first.
    """
    image_embeds, classifier = np.asarray(image_embeds, np.float32), np.asarray(classifier, np.float32)
    if image_embeds.ndim != 2 or classifier.ndim != 2 or image_embeds.shape[1] != classifier.shape[0]:
        raise InputError(f"image_embeds {image_embeds.shape} and classifier {classifier.shape} must be "
                         f"(n, d) and (d, n_classes)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if params is not None:
        if logit_scale is not None or logit_bias is not None:
            raise InputError("give params (the model's own logit scale and bias) or logit_scale / logit_bias, "
                             "not both")
        rule = zero_shot_logit_rule(params)
        logit_scale, logit_bias = rule["logit_scale"], rule.get("logit_bias")
    elif logit_scale is None:
        raise InputError("zero_shot_predict needs the model's params (its own exp(logit_scale) and logit bias) "
                         "or an explicit logit_scale")
    if isinstance(logit_scale, bool) or not np.isfinite(logit_scale) or logit_scale <= 0:
        raise InputError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    k = min(k, classifier.shape[1])
    logits = np.float32(logit_scale) * image_embeds @ classifier
    if logit_bias is not None:
        probs = 1.0 / (1.0 + np.exp(-(logits + np.float32(logit_bias))))
    else:
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(probs, top, axis=1).astype(np.float32)


def zero_shot_logit_rule(params, config: DualEncoderConfig | None = None) -> dict:
    """A model's own zero-shot rule as zero_shot_predict's keywords: {"logit_scale": exp(params["logit_scale"])},
    plus "logit_bias" when the model has one (then labels get independent sigmoids, as it was trained).
    The rule follows from params alone; config is accepted for callers of earlier versions."""
    if not isinstance(params, dict) or "logit_scale" not in params:
        raise InputError("params must be a dual encoder's params, with a logit_scale")
    rule = {"logit_scale": float(np.exp(np.asarray(params["logit_scale"], np.float64)))}
    if "logit_bias" in params:
        rule["logit_bias"] = float(np.asarray(params["logit_bias"]))
    return rule


def retrieval_metrics(image_embeds, text_embeds, text_to_image=None, ks: Sequence[int] = (1, 5, 10), *,
                      image_labels=None, text_labels=None) -> dict:
    """Image-to-text and text-to-image recall at k, mean and median rank.

    The relevance rule is the one the arguments give: text_to_image is "instance" relevance (a text describes
    its own image only), image_labels with text_labels "label" relevance (a text is relevant to every image of
    its class). A `data.PairDataset` gives either: `**dataset.relevance("label")` (or "instance", "auto").

    Args:
      image_embeds: (n_images, d); text_embeds: (n_texts, d) (normalised: scores are dot products).
      text_to_image: (n_texts,) index of each text's image; an image may have several captions.
      image_labels, text_labels: instead of text_to_image, class ids: a text is relevant to every image of
        its class (class-level captions, as in zero-shot prompts).

    A rank is 1 + the number of irrelevant candidates scoring at least as high as the best relevant one, so
    ties count against the model (a constant model does not get perfect recall). With instance relevance,
    texts of other images that embed the same (identical captions, such as one caption per class) tie with
    the relevant one and count against it: a UserWarning says so and names the label rule.

    Returns:
      {"i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_mean_rank", "i2t_median_rank", the same for "t2i_", and
      "i2t_chance_R@k" / "t2i_chance_R@k": the expected recall of a random ranking}.
    """
    images = np.asarray(image_embeds, np.float64)
    texts = np.asarray(text_embeds, np.float64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise InputError(f"image_embeds {images.shape} and text_embeds {texts.shape} must be (n, d) and (m, d)")
    relevant = _relevance(images.shape[0], texts.shape[0], text_to_image, image_labels, text_labels)
    if text_to_image is not None:
        _warn_tied_texts(texts, np.asarray(text_to_image))
    for axis, who, other in ((1, "image", "text"), (0, "text", "image")):
        lonely = np.flatnonzero(~relevant.any(axis=axis))
        if lonely.size:
            raise InputError(f"{lonely.size} {who}(s) have no relevant {other}, e.g. {who} index {lonely[0]}")
    scores = images @ texts.T  # (n_images, n_texts)
    out = {}
    for name, s, rel in (("i2t", scores, relevant), ("t2i", scores.T, relevant.T)):
        best = np.where(rel, s, -np.inf).max(axis=1, keepdims=True)
        ranks = 1 + np.sum(~rel & (s >= best), axis=1)
        n_rel, n = rel.sum(axis=1), rel.shape[1]
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
        for k in ks:
            out[f"{name}_chance_R@{k}"] = float(np.mean([chance_recall(n, r, k) for r in n_rel]))
    return out


def _warn_tied_texts(texts: np.ndarray, owner: np.ndarray) -> None:
    """Warns when texts of different images embed the same (to 1e-5), which instance relevance counts as ties
    against the model."""
    if len(texts) < 2:
        return
    _, group = np.unique(np.round(texts, 5), axis=0, return_inverse=True)
    group = group.reshape(-1)
    owners_per_group = np.unique(np.stack([group, owner]), axis=1)[0]  # one entry per (group, image)
    shared = np.isin(group, np.flatnonzero(np.bincount(owners_per_group) > 1))
    if shared.any():
        warnings.warn(f"retrieval_metrics: {int(shared.sum())} of {len(texts)} texts embed the same as a text of "
                      f"another image (identical captions?): with text_to_image (instance relevance) those ties "
                      f"count against the model; for class-level captions pass image_labels and text_labels "
                      f"(label relevance, e.g. **dataset.relevance('label'))", UserWarning, stacklevel=3)


def _relevance(n_images, n_texts, text_to_image, image_labels, text_labels) -> np.ndarray:
    """(n_images, n_texts) bool: which texts describe which images."""
    if (text_to_image is None) == (image_labels is None and text_labels is None):
        raise InputError("give text_to_image, or both image_labels and text_labels")
    if text_to_image is not None:
        owner = np.asarray(text_to_image)
        if owner.shape != (n_texts,) or not np.issubdtype(owner.dtype, np.integer):
            raise InputError(f"text_to_image must be ({n_texts},) integers, got {owner.shape} {owner.dtype}")
        if owner.size and (owner.min() < 0 or owner.max() >= n_images):
            raise InputError(f"text_to_image holds indices outside [0, {n_images})")
        return owner[None, :] == np.arange(n_images)[:, None]
    image_labels, text_labels = np.asarray(image_labels), np.asarray(text_labels)
    if image_labels.shape != (n_images,) or text_labels.shape != (n_texts,):
        raise InputError(f"image_labels {image_labels.shape} and text_labels {text_labels.shape} must be "
                         f"({n_images},) and ({n_texts},)")
    return image_labels[:, None] == text_labels[None, :]


def chance_recall(n_candidates: int, n_relevant: int, k: int) -> float:
    """Probability that a random ranking of n_candidates puts one of n_relevant in the top k."""
    k = min(k, n_candidates)
    miss = 1.0
    for i in range(k):  # all k drawn from the irrelevant ones, without replacement
        miss *= max(0, n_candidates - n_relevant - i) / (n_candidates - i)
    return 1.0 - miss
