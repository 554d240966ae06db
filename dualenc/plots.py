"""PNG figures of a training run, an evaluation and the demo, drawn with matplotlib (the `demo` extra)."""

from __future__ import annotations

import io
import math
import re
import textwrap
from typing import Mapping, Sequence

import numpy as np

from dualenc.errors import InputError
from dualenc.files import write_bytes_atomic

DPI = 100
TRAINING_SIZE, DEMO_SIZE = (12, 8), (19, 11.5)  # inches; the PNGs are DPI times these in pixels
MAX_IMAGES = 20  # the demo's grid of held-out images
MAX_BARS = 40  # per-class bars; with more classes the worst and the best half of this are drawn
MAX_TICKS = 30  # class names written along a confusion matrix's axes
CONFUSION_MAX = 30  # classes drawn as a confusion matrix; with more, the most confused pairs are drawn instead
TOP_PAIRS = 25  # the most confused (true, predicted) pairs drawn
CEILING_WRAP = 62  # characters per line of the demo's note on its in-batch accuracy ceiling
RECALL = re.compile(r"^(i2t|t2i)_R@(\d+)$")
DIRECTIONS = {"i2t": ("image -> text", "tab:blue"), "t2i": ("text -> image", "tab:orange")}
# Held-out metric names shortened for the legend, e.g. "zeroshot/acc1" -> "zs acc1",
# "retrieval/image_retrieval_recall@5" -> "ret iR@5"
SHORT_NAMES = [(re.compile(p), r) for p, r in (
    (r"(^|/)zeroshot/", r"\1zs "), (r"(^|/)zero_shot_", r"\1zs "), (r"(^|/)retrieval/", r"\1ret "),
    (r"(^|/)linear_probe/", r"\1lp "), (r"image_retrieval_recall@", "iR@"), (r"text_retrieval_recall@", "tR@"),
    (r"mean_per_class_recall", "mean class recall"), (r"/", " "))]


def require_matplotlib():
    """(Figure, FigureCanvasAgg) from matplotlib, imported here only; an ImportError saying what to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("dualenc.plots needs matplotlib: pip install 'dualenc[demo]'") from e
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float):
    figure, canvas = require_matplotlib()
    fig = figure(figsize=(width, height), dpi=DPI, layout="constrained")
    canvas(fig)
    return fig


def _save(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_records(records, name: str) -> list:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise InputError(f"{name} must be a list of metric records (dicts), got {type(records).__name__}")
    if not records:
        raise InputError(f"{name} is empty: nothing to draw")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise InputError(f"{name}[{i}] must be a dict, got {type(record).__name__}")
    return list(records)


def _series(records, kind: str, key: str) -> tuple[list, list]:
    """(steps, values) of one metric in the records of a kind, in the order given; records lacking either skipped."""
    pairs = [(r["step"], float(r[key])) for r in records
             if r.get("kind") == kind and _is_number(r.get("step")) and _is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smoothed(values: list[float]) -> np.ndarray:
    """An exponential moving average over ~5% of the points; non-finite values are stepped over."""
    alpha, out, level = min(1.0, 20.0 / len(values)), [], None
    for v in values:
        if math.isfinite(v):
            level = v if level is None else level + alpha * (v - level)
        out.append(np.nan if level is None else level)
    return np.asarray(out)


def _curve(ax, steps, values, label: str, color: str):
    if len(values) > 20:
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, _smoothed(values), color=color, linewidth=2, label=f"{label} (smoothed)")
    else:
        ax.plot(steps, values, color=color, marker=".", label=label)


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.35")
    ax.set(xticks=[], yticks=[])


def _colorbar(fig, ax, image, label: str, integer: bool = False):
    """A colour bar as tall as the axes' drawn box (a square image's too, unlike a gridspec colour bar)."""
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(image, cax=ax.inset_axes([1.04, 0, 0.05, 1]), label=label,
                 ticks=MaxNLocator(integer=True) if integer else None)


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def _draw_history(ax_loss, ax_accuracy, records, eval_loss: bool = True, ceiling=None):
    """Training loss (and held-out loss when logged) and in-batch accuracy over steps; `ceiling` (value, why)
    draws the best in-batch accuracy expected as a dashed line, with why in the panel."""
    steps, loss = _series(records, "train", "loss")
    held = _series(records, "eval", "loss") if eval_loss else ([], [])
    if loss:
        _curve(ax_loss, steps, loss, "training", "tab:blue")
    if held[1]:
        ax_loss.plot(*held, color="tab:red", marker="o", label="held-out")
    if loss or held[1]:
        ax_loss.set(xlabel="step", ylabel="contrastive loss", title="loss")
        ax_loss.legend(fontsize=9)
    else:
        _note(ax_loss, "no loss logged")
    steps, accuracy = _series(records, "train", "accuracy")
    if accuracy:
        _curve(ax_accuracy, steps, accuracy, "training batch", "tab:green")
        ax_accuracy.set(xlabel="step", ylabel="fraction of the batch", title="in-batch accuracy", ylim=(0, 1.02))
        if ceiling is not None:
            value, why = ceiling
            ax_accuracy.axhline(value, color="tab:red", linestyle="--", linewidth=1.5,
                                label=f"expected ceiling {value:.2f}")
            ax_accuracy.text(0.03, 0.97, textwrap.fill(why, CEILING_WRAP), transform=ax_accuracy.transAxes,
                             ha="left", va="top", fontsize=9, color="0.2", in_layout=False,
                             bbox=dict(facecolor="white", edgecolor="0.8", alpha=0.9))
            ax_accuracy.legend(fontsize=9, loc="center right")
        else:
            ax_accuracy.legend(fontsize=9)
    else:
        _note(ax_accuracy, "no accuracy logged")
    for ax in (ax_loss, ax_accuracy):
        ax.grid(alpha=0.3)


def _metric_label(name: str) -> str:
    """A held-out metric's name as the training figure's legend writes it: "zeroshot/acc1" -> "zs acc1",
    "retrieval/text_retrieval_recall@1" -> "ret tR@1"; other names as they are."""
    for pattern, replacement in SHORT_NAMES:
        name = pattern.sub(replacement, name)
    return name


def _held_out_series(records) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} of the eval records' metrics (not their loss), non-finite values left out (acc5
    of a benchmark with under 5 classes is NaN); a metric with no finite value is left out."""
    names = dict.fromkeys(k for r in records if r.get("kind") == "eval" for k, v in r.items()
                          if k not in ("kind", "step", "epoch", "loss", "time") and _is_number(v))
    out = {}
    for name in names:
        points = [(s, v) for s, v in zip(*_series(records, "eval", name)) if math.isfinite(v)]
        if points:
            out[name] = ([p[0] for p in points], [p[1] for p in points])
    return out


def training_figure(records):
    """The Figure `training` saves: four panels, and a twin y axis when held-out metrics outside [0, 1] are logged."""
    records = _check_records(records, "records")
    fig = _new_figure(*TRAINING_SIZE)
    (ax_loss, ax_accuracy), (ax_rate, ax_eval) = fig.subplots(2, 2)
    _draw_history(ax_loss, ax_accuracy, records)
    steps, rate = _series(records, "train", "learning_rate")
    if rate:
        ax_rate.plot(steps, rate, color="tab:purple")
        ax_rate.set(xlabel="step", ylabel="learning rate", title="learning rate schedule")
        ax_rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_rate.grid(alpha=0.3)
    else:
        _note(ax_rate, "no learning rate logged")
    held = _held_out_series(records)
    if held:
        other = [n for n, (_, values) in held.items() if not all(0 <= v <= 1 for v in values)]
        twin = ax_eval.twinx() if other else None
        lines = []
        for i, (name, (steps, values)) in enumerate(held.items()):
            ax, style = (twin, "--") if name in other else (ax_eval, "-")
            lines += ax.plot(steps, values, style, marker="osD^v"[i // 10 % 5], color=f"C{i % 10}",
                             label=_short(_metric_label(name), 28))
        ax_eval.set(xlabel="step", ylabel="fraction", title="held-out evaluation")
        if twin is not None:
            twin.set_ylabel("other metrics (dashed)")
        ax_eval.grid(alpha=0.3)
        ax_eval.legend(handles=lines, fontsize=9 if len(lines) <= 6 else 8, loc="upper center",
                       bbox_to_anchor=(0.5, -0.13), ncol=3 if len(lines) <= 6 else 4)
    else:
        _note(ax_eval, "no held-out evaluation\n(train with --eval-data)")
    last = [r for r in records if r.get("kind") == "train" and _is_number(r.get("step"))]
    if last:
        epoch, loss = last[-1].get("epoch"), last[-1].get("loss")
        fig.suptitle(f"training run: last step {last[-1]['step']}" + (f", epoch {epoch:.2f}" if _is_number(epoch)
                     else "") + (f", loss {loss:.3f}" if _is_number(loss) else ""), fontsize=13)
    return fig


def training(path: str, records) -> str:
    """Draws a run's training curves into a PNG at `path`; returns `path`.

    Args:
      records: metric records as the trainer logs them to metrics.jsonl: {"kind": "train", "step", "loss",
        "accuracy", "learning_rate", ...} and {"kind": "eval", "step", <metric>: float, ...}. Records of other
        kinds and missing values are left out; steps are drawn in the order given (a resumed run may repeat
        some). Panels: loss (training, and held-out when evaluated), in-batch accuracy, learning rate, and every
        other held-out metric.
    """
    return _save(training_figure(records), path)


def _recall_ks(retrieval: Mapping, direction: str | None = None) -> list[int]:
    found = (RECALL.match(str(key)) for key in retrieval)
    return sorted({int(m.group(2)) for m in found if m and direction in (None, m.group(1))})


def _draw_recall(ax, retrieval: Mapping):
    for direction, (name, color) in DIRECTIONS.items():
        ks = _recall_ks(retrieval, direction)
        if not ks:
            continue
        ax.plot(ks, [retrieval[f"{direction}_R@{k}"] for k in ks], marker="o", color=color, label=name)
        chance = [(k, retrieval[f"{direction}_chance_R@{k}"]) for k in ks
                  if _is_number(retrieval.get(f"{direction}_chance_R@{k}"))]
        if chance:
            ax.plot(*zip(*chance), "--", color=color, alpha=0.7, label=f"{name}, chance")
    ks = _recall_ks(retrieval)
    if len(ks) > 1 and ks[-1] / ks[0] >= 10:
        ax.set_xscale("log")  # K from 1 to 100: evenly spread
        ax.minorticks_off()
    ax.set(xlabel="K", ylabel="recall@K", title="retrieval: recall@K", ylim=(0, 1.02), xticks=ks, xticklabels=ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)


def _draw_per_class(ax, per_class: Mapping):
    ranked = sorted(per_class.items(), key=lambda item: (item[1], str(item[0])))
    shown = ranked if len(ranked) <= MAX_BARS else ranked[:MAX_BARS // 2] + ranked[-MAX_BARS // 2:]
    ax.barh(range(len(shown)), [v for _, v in shown], color="tab:blue")
    ax.set_yticks(range(len(shown)), [_short(str(c), 24) for c, _ in shown], fontsize=9)
    ax.axvline(1 / len(ranked), color="tab:red", linestyle="--", label=f"chance (1/{len(ranked)})")
    title = "per-class accuracy"
    if len(shown) < len(ranked):
        title += f"\n(the worst and the best {MAX_BARS // 2} of {len(ranked)} classes)"
        ax.axhline(MAX_BARS // 2 - 0.5, color="0.3", linestyle=":", linewidth=1.5)
    ax.set(xlabel="accuracy", xlim=(0, 1), ylim=(-0.6, len(shown) - 0.4), title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")


def _draw_confusion(fig, ax, matrix: np.ndarray, names: Sequence[str], title: str, annotate_below: int = 13):
    n = len(names)
    _colorbar(fig, ax, ax.imshow(matrix, cmap="Blues", interpolation="nearest"), "images",
              integer=np.issubdtype(matrix.dtype, np.integer))
    ticks = list(range(0, n, max(1, math.ceil(n / MAX_TICKS))))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=9)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n < annotate_below:
        top = matrix.max() or 1
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, f"{count:.3g}", ha="center", va="center", fontsize=8, in_layout=False,
                        color="white" if count > 0.6 * top else "black")


def confused_pairs(matrix, top: int = TOP_PAIRS) -> list[tuple[int, int, float, float]]:
    """The `top` most confused (true, predicted) class pairs of a confusion matrix, as (true, predicted, count,
    share of the true class's images), the largest count first, ties by true then predicted class; pairs with no
    mistake are left out (an empty list when every image is in its own class).

    Args:
      matrix: (n, n) counts >= 0, rows the true and columns the predicted classes.
    """
    off = np.array(matrix)
    if off.ndim != 2 or off.shape[0] != off.shape[1]:
        raise InputError(f"confused_pairs needs a square (n, n) matrix, got {off.shape}")
    np.fill_diagonal(off, 0)
    true, predicted = np.nonzero(off)  # row-major: already ordered by true, then predicted class
    counts = off[true, predicted]
    order = np.argsort(-counts, kind="stable")[:top]
    totals = np.sum(matrix, axis=1)
    return [(int(true[k]), int(predicted[k]), counts[k].item(), float(counts[k] / totals[true[k]])) for k in order]


def _draw_confused_pairs(ax, matrix: np.ndarray, names: Sequence[str]):
    pairs = confused_pairs(matrix)
    if not pairs:
        ax.set_title(f"most confused pairs ({len(names)} classes)")
        _note(ax, f"no mistakes: every image of the {len(names)} classes\nis predicted as its own class")
        return
    ax.set_title(f"most confused pairs (top {len(pairs)}, {len(names)} classes)\ntrue \u2192 predicted")
    counts = [count for _, _, count, _ in pairs]
    ax.barh(range(len(pairs)), counts, color="tab:red")
    ax.set_yticks(range(len(pairs)), [f"{_short(names[i], 20)} \u2192 {_short(names[j], 20)}"
                                      for i, j, _, _ in pairs], fontsize=9)
    for y, (_, _, count, share) in enumerate(pairs):
        ax.text(count, y, f" {count:.3g} ({100 * share:.2g}%)", va="center", fontsize=8, in_layout=False)
    ax.set(xlabel="images (share of the true class's images)", xlim=(0, 1.2 * max(counts)),
           ylim=(len(pairs) - 0.4, -0.6))  # the most confused pair on top
    ax.grid(axis="x", alpha=0.3)


def evaluation_figure(*, retrieval=None, per_class=None, confusion=None, title: str = ""):
    """The Figure `evaluation` saves: the recall panel with retrieval, one with per_class, one with confusion (up to
    CONFUSION_MAX classes a matrix, its colour bar an inset in that panel's child_axes; with more, the TOP_PAIRS
    most confused class pairs as bars)."""
    if retrieval is None and per_class is None and confusion is None:
        raise InputError("evaluation needs something to draw: retrieval, per_class or confusion")
    if retrieval is not None and (not isinstance(retrieval, Mapping) or not _recall_ks(retrieval)):
        raise InputError("retrieval must be the dict of retrieval_metrics, with keys such as 'i2t_R@1'")
    if per_class is not None and (not isinstance(per_class, Mapping) or not per_class
                                  or not all(_is_number(v) for v in per_class.values())):
        raise InputError("per_class must be a non-empty dict {class name: accuracy}")
    if confusion is not None:
        if not isinstance(confusion, (tuple, list)) or len(confusion) != 2:
            raise InputError("confusion must be (matrix (n, n) of counts, n class names)")
        matrix, names = np.asarray(confusion[0]), [_short(str(c), 24) for c in confusion[1]]
        if not names or matrix.shape != (len(names), len(names)):
            raise InputError(f"confusion's matrix {matrix.shape} must be (n, n) for its {len(names)} class names")
        if not np.issubdtype(matrix.dtype, np.number) or not np.all(np.isfinite(matrix)) or matrix.min() < 0:
            raise InputError("confusion's matrix must hold finite counts >= 0")
    pairs = confusion is not None and len(names) > CONFUSION_MAX
    panels = [p for p in (retrieval is not None and "recall", per_class is not None and "per_class",
                          confusion is not None and "confusion") if p]
    bars = max(min(len(per_class), MAX_BARS) if per_class is not None else 0, TOP_PAIRS if pairs else 0)
    fig = _new_figure(5.5 * len(panels) + (confusion is not None) + pairs, max(5.0, 1.5 + 0.22 * bars))
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))
    if retrieval is not None:
        _draw_recall(axes["recall"], retrieval)
    if per_class is not None:
        _draw_per_class(axes["per_class"], per_class)
    if pairs:
        _draw_confused_pairs(axes["confusion"], matrix, names)
    elif confusion is not None:
        _draw_confusion(fig, axes["confusion"], matrix, names, "confusion matrix")
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def evaluation(path: str, *, retrieval=None, per_class=None, confusion=None, title: str = "") -> str:
    """Draws an evaluation into a PNG at `path`; returns `path`. At least one of retrieval, per_class and
    confusion is given (a classification-only benchmark has no recall curve).

    Args:
      retrieval: retrieval_metrics' dict; recall@K of both directions against K, each with its chance dashed.
      per_class: {class name: accuracy}, drawn as bars (best on top) with the chance level, 1 / number of classes;
        with more than MAX_BARS classes, the worst and the best MAX_BARS / 2.
      confusion: (matrix (n, n) of counts, rows the true and columns the predicted classes; the n class names),
        drawn as a matrix up to CONFUSION_MAX classes; with more, as the TOP_PAIRS most confused (true ->
        predicted) pairs (see confused_pairs), each with its count and share of the true class's images.
      title: written above the panels.
    """
    return _save(evaluation_figure(retrieval=retrieval, per_class=per_class, confusion=confusion, title=title), path)


def _draw_headline(ax, headline: Mapping):
    rows = [("zero-shot accuracy", headline["zero_shot_accuracy"], headline["zero_shot_chance"])]
    rows += [(f"{name} R@{k}", headline[f"{direction}_R@{k}"], headline.get(f"{direction}_chance_R@{k}"))
             for direction, (name, _) in DIRECTIONS.items() for k in _recall_ks(headline, direction)]
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r[1] for r in rows], height=0.4, color="tab:blue")
    ax.barh(y - 0.2, [r[2] if _is_number(r[2]) else 0 for r in rows], height=0.4, color="0.75")
    for yi, (_, value, chance) in zip(y, rows):
        ax.text(value + 0.01, yi + 0.2, f"{value:.2f}", va="center", fontsize=9, in_layout=False)
        if _is_number(chance):
            ax.text(chance + 0.01, yi - 0.2, f"chance {chance:.2f}", va="center", fontsize=8, color="0.35",
                    in_layout=False)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=9)
    held = headline.get("held_out_images")
    ax.set(xlim=(0, 1.12), title="held-out accuracy (blue) vs chance (grey)" + (f", {held} images" if held else ""))
    ax.grid(axis="x", alpha=0.3)


def _draw_gallery(ax, images, labels, predictions, probabilities, names, cols: int = 5):
    """Images tiled in one axes (far cheaper to lay out than an axes each), each titled with its prediction."""
    from matplotlib.patches import Rectangle

    height = 1.32  # a cell: the title, the image inside a 0.9 square, the true class when wrong
    for i, image in enumerate(images):
        image = np.asarray(image)
        image = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        x, y = i % cols + 0.5, (i // cols) * height + 0.7  # the image's centre
        w, h = (0.9 * side / max(image.shape[:2]) for side in (image.shape[1], image.shape[0]))
        ax.imshow(image, extent=(x - w / 2, x + w / 2, y + h / 2, y - h / 2), interpolation="nearest",
                  cmap="gray", vmin=0, vmax=255)
        color = "black" if predictions[i] == labels[i] else "tab:red"
        title = f"{i + 1}. {_short(names[predictions[i]], 12)} {probabilities[i]:.2f}"
        ax.text(x, y - 0.47, title, ha="center", va="bottom", fontsize=10, color=color, in_layout=False)
        if predictions[i] != labels[i]:
            ax.add_patch(Rectangle((x - w / 2, y - h / 2), w, h, fill=False, edgecolor=color, linewidth=2))
            ax.text(x, y + 0.47, f"true: {_short(names[labels[i]], 14)}", ha="center", va="top", fontsize=10,
                    color=color, in_layout=False)
    ax.set(xlim=(0, cols), ylim=(math.ceil(len(images) / cols) * height, 0), aspect="equal")
    ax.axis("off")


def demo_figure(*, headline, images, labels, predictions, probabilities, classnames, similarity, history,
                accuracy_ceiling=None):
    """The Figure `demo` saves: six panels; the similarity and confusion panels' colour bars are insets (child_axes)."""
    if not isinstance(headline, Mapping) or not all(_is_number(headline.get(k))
                                                    for k in ("zero_shot_accuracy", "zero_shot_chance")):
        raise InputError("headline must be a dict with numbers zero_shot_accuracy and zero_shot_chance at least")
    history, names, n = _check_records(history, "history"), [_short(str(c), 24) for c in classnames], len(images)
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    probabilities, similarity = np.asarray(probabilities, np.float64), np.asarray(similarity, np.float64)
    for name, ids in (("labels", labels), ("predictions", predictions)):
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{name} must be ({n},) integers, one per image, got {ids.shape} {ids.dtype}")
        if n and (ids.min() < 0 or ids.max() >= len(names)):
            raise InputError(f"{name} holds class ids outside [0, {len(names)}) ({len(names)} classnames)")
    if probabilities.shape != (n,):
        raise InputError(f"probabilities must be ({n},), each prediction's probability, got {probabilities.shape}")
    shown = len(similarity) if similarity.ndim == 2 else 0
    if similarity.ndim != 2 or similarity.shape[1] != len(names) or not 1 <= shown <= min(n, MAX_IMAGES):
        raise InputError(f"similarity must be (images shown: 1 to {min(n, MAX_IMAGES)}, {len(names)} classes), "
                         f"got {similarity.shape}")
    if accuracy_ceiling is not None and not (
            isinstance(accuracy_ceiling, (tuple, list)) and len(accuracy_ceiling) == 2
            and _is_number(accuracy_ceiling[0]) and 0 <= accuracy_ceiling[0] <= 1
            and isinstance(accuracy_ceiling[1], str)):
        raise InputError(f"accuracy_ceiling must be (a fraction in [0, 1], why: a string), got {accuracy_ceiling!r}")

    fig = _new_figure(*DEMO_SIZE)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 2.1))
    ax_headline, ax_loss, ax_accuracy = top.subplots(1, 3, width_ratios=(1.35, 0.8, 1))
    _draw_headline(ax_headline, headline)
    _draw_history(ax_loss, ax_accuracy, history, eval_loss=False, ceiling=accuracy_ceiling)
    gallery, heat, confused = bottom.subfigures(1, 3, width_ratios=(1.25, 0.85, 1))
    _draw_gallery(gallery.subplots(), images[:shown], labels, predictions, probabilities, names)
    gallery.suptitle("held-out images: predicted class and its probability\n(red: wrong, with the true class)",
                     fontsize=11)
    ax = heat.subplots()
    _colorbar(heat, ax, ax.imshow(similarity, cmap="viridis", aspect="auto", interpolation="nearest"),
              "cosine similarity")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(shown), [f"{i + 1}. {names[labels[i]]}" for i in range(shown)], fontsize=9)
    ax.set(xlabel="class prompt", ylabel="image (true class)", title="image x class-prompt similarity")
    matrix = np.zeros((len(names), len(names)), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    _draw_confusion(confused, confused.subplots(), matrix, names, f"zero-shot confusion ({n} held-out images)")
    return fig


def demo(path: str, *, headline, images, labels, predictions, probabilities, classnames, similarity,
         history, accuracy_ceiling=None) -> str:
    """Draws the demo's overview into a PNG at `path`; returns `path`.

    Args:
      headline: {"zero_shot_accuracy", "zero_shot_chance", "i2t_R@1", "i2t_chance_R@1", ..., "held_out_images"},
        drawn as bars against chance.
      images: the n held-out images, HWC uint8; labels, predictions: (n,) class ids (all n make the confusion
        matrix); probabilities: (n,) each prediction's probability.
      classnames: the class names, in class-id order.
      similarity: (m, n_classes) cosine similarity of the first m <= 20 images to each class's prompts; those
        m images are drawn in a grid titled with their predictions.
      history: training records as for `training`; its loss and in-batch accuracy are drawn.
      accuracy_ceiling: (the best in-batch accuracy to expect, why), drawn as a dashed line in the accuracy
        panel with the explanation written in it.
    """
    fig = demo_figure(headline=headline, images=images, labels=labels, predictions=predictions,
                      probabilities=probabilities, classnames=classnames, similarity=similarity, history=history,
                      accuracy_ceiling=accuracy_ceiling)
    return _save(fig, path)
