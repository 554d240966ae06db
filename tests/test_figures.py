"""dualenc.plots: each figure's panels, its PNG (decodable, at the figure's size, written atomically), bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dualenc import demo, plots as figures

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def colour_bars(fig) -> int:
    return sum(len(ax.child_axes) for ax in fig.axes)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def pixels(inches) -> tuple[int, int]:
    return tuple(round(v * figures.DPI) for v in inches)


def run_records(steps=200, eval_every=50, with_rank=False):
    rng = np.random.default_rng(0)
    out = []
    for step in range(10, steps + 1, 10):
        out.append({"kind": "train", "step": step, "epoch": step / 100, "loss": 4.0 / (1 + step / 50),
                    "accuracy": min(1.0, step / steps + 0.05 * rng.random()), "learning_rate": 1e-3 * (1 - step / steps),
                    "grad_norm": 1.0, "logit_scale": 2.7, "steps_per_second": 30.0})
        if eval_every and step % eval_every == 0:
            out.append({"kind": "eval", "step": step, "loss": 3.0 / (1 + step / 80), "i2t_R@1": step / steps,
                        "t2i_R@1": 0.9 * step / steps, "zero_shot_accuracy": 0.8 * step / steps,
                        **({"i2t_mean_rank": 10.0 - 8 * step / steps} if with_rank else {})})
    return out


def test_training_figure_panels_and_png(tmp_path):
    fig = figures.training_figure(run_records())
    assert len(fig.axes) == 4 and colour_bars(fig) == 0
    assert fig.axes[3].get_title() == "held-out evaluation"
    assert len(figures.training_figure(run_records(with_rank=True)).axes) == 5  # a mean rank gets a twin y axis
    quiet = figures.training_figure(run_records(eval_every=0))
    assert "--eval-data" in quiet.axes[3].texts[0].get_text()
    path = str(tmp_path / "training.png")
    assert figures.training(path, run_records()) == path
    assert png_size(path) == pixels(figures.TRAINING_SIZE)
    assert os.listdir(tmp_path) == ["training.png"]  # no temporary file left behind


def test_training_figure_draws_benchmark_metrics_and_skips_nan(tmp_path):
    """Training-time benchmark metrics (CLIP_benchmark names, in [0, 1]; acc5 NaN with under 5 classes) draw on the
    fraction axis with short legend labels; NaN points are left out and an all-NaN metric gets no line."""
    records = run_records(steps=100, eval_every=20)
    for n, record in enumerate(r for r in records if r["kind"] == "eval"):
        record.update({"zeroshot/acc1": 0.2 * n, "zeroshot/acc5": float("nan") if n == 0 else 0.25 * n,
                       "zeroshot/mean_per_class_recall": 0.15 * n, "cifar10/zeroshot/acc1": 0.1 * n,
                       "mnist/zeroshot/acc5": float("nan"),
                       **{f"retrieval/{side}_retrieval_recall@{k}": min(1.0, 0.1 * n * k)
                          for side in ("image", "text") for k in (1, 5)}})
    fig = figures.training_figure(records)
    assert len(fig.axes) == 4  # every metric within [0, 1] once NaN is left out: no twin axis
    ax = fig.axes[3]
    lines = {line.get_label(): line for line in ax.lines}
    assert {"zs acc1", "zs acc5", "zs mean class recall", "cifar10 zs acc1", "ret iR@1", "ret iR@5", "ret tR@1",
            "ret tR@5"} <= set(lines) and "mnist zs acc5" not in lines
    assert list(lines["zs acc5"].get_xdata()) == [40, 60, 80, 100]
    assert all(np.isfinite(line.get_ydata()).all() for line in ax.lines)
    assert len(ax.get_legend().get_texts()) == len(ax.lines) == 11
    figures.training(str(tmp_path / "training.png"), records)
    assert png_size(str(tmp_path / "training.png")) == pixels(figures.TRAINING_SIZE)


def test_training_takes_gaps_repeats_and_other_kinds():
    records = run_records(steps=100, eval_every=0)
    resumed = records + records[3:]  # a run resumed from an earlier checkpoint logs some steps again
    resumed[5] = {"kind": "train", "step": 60}  # no values
    resumed.append({"kind": "checkpoint", "step": 100, "path": "step_00000100"})
    resumed.append({"kind": "train", "loss": 1.0})  # no step: left out
    fig = figures.training_figure(resumed)
    steps = fig.axes[0].lines[0].get_xdata()
    assert len(steps) == len(records) * 2 - 3 - 1 and list(steps[:3]) == [10, 20, 30]


@pytest.mark.parametrize("records, match", [
    ([], "records is empty"),
    ("metrics.jsonl", "records must be a list"),
    ({"kind": "train"}, "records must be a list"),
    ([{"kind": "train", "step": 1, "loss": 1.0}, 3], r"records\[1\] must be a dict"),
])
def test_training_refuses_bad_records(tmp_path, records, match):
    with pytest.raises(ValueError, match=match):
        figures.training(str(tmp_path / "t.png"), records)
    assert not os.listdir(tmp_path)


RETRIEVAL = {"i2t_R@1": 0.6, "i2t_R@5": 0.9, "i2t_R@10": 0.97, "t2i_R@1": 0.5, "t2i_R@5": 0.85, "t2i_R@10": 0.95,
             "i2t_mean_rank": 2.1, "i2t_chance_R@1": 0.1, "i2t_chance_R@5": 0.5, "i2t_chance_R@10": 1.0,
             "t2i_chance_R@1": 0.01, "t2i_chance_R@5": 0.05, "t2i_chance_R@10": 0.1}


def test_evaluation_figure_panels_and_png(tmp_path):
    fig = figures.evaluation_figure(retrieval=RETRIEVAL)
    assert len(fig.axes) == 1 and colour_bars(fig) == 0
    recall = fig.axes[0]
    assert [list(line.get_xdata()) for line in recall.lines] == [[1, 5, 10]] * 4
    assert [line.get_linestyle() for line in recall.lines] == ["-", "--", "-", "--"]  # chance dashed
    per_class = {name: i / 10 for i, name in enumerate(CLASSES)}
    confusion = (np.eye(10, dtype=np.int64) * 30 + 1, CLASSES)
    assert len(figures.evaluation_figure(retrieval=RETRIEVAL, per_class=per_class).axes) == 2
    fig = figures.evaluation_figure(retrieval=RETRIEVAL, confusion=confusion)
    assert len(fig.axes) == 2 and colour_bars(fig) == 1
    fig = figures.evaluation_figure(retrieval=RETRIEVAL, per_class=per_class, confusion=confusion, title="digits")
    assert len(fig.axes) == 3 and colour_bars(fig) == 1
    assert fig.axes[1].get_yticklabels()[-1].get_text() == "nine"  # the best class on top
    many = {f"class {i}": i / 100 for i in range(100)}
    assert len(figures.evaluation_figure(retrieval=RETRIEVAL, per_class=many).axes[1].patches) == figures.MAX_BARS
    path = str(tmp_path / "eval.png")
    assert figures.evaluation(path, retrieval=RETRIEVAL, per_class=per_class, confusion=confusion) == path
    width, height = png_size(path)
    assert width > 3 * height > 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(retrieval={}), "retrieval must be"),
    (dict(retrieval={"i2t_mean_rank": 3.0}), "retrieval must be"),
    (dict(retrieval=RETRIEVAL, per_class={}), "per_class must be"),
    (dict(retrieval=RETRIEVAL, per_class={"cat": "high"}), "per_class must be"),
    (dict(retrieval=RETRIEVAL, confusion=np.eye(3)), "confusion must be"),
    (dict(retrieval=RETRIEVAL, confusion=(np.eye(3), ["a", "b"])), "confusion's matrix"),
    (dict(), "needs something to draw"),
    (dict(retrieval=None, per_class=None), "needs something to draw"),
    (dict(confusion=(-np.eye(3), ["a", "b", "c"])), "finite counts >= 0"),
    (dict(confusion=(np.full((2, 2), "x"), ["a", "b"])), "finite counts >= 0"),
])
def test_evaluation_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        figures.evaluation_figure(**kwargs)


def many_classes(n=1000):
    """A confusion matrix of n classes with random mistakes (0 to 2 per pair) and three planted: 417 -> 3 the most
    common, then two equal ones (ties go by the true class)."""
    matrix = np.random.default_rng(2).poisson(0.02, (n, n)).clip(0, 2)
    np.fill_diagonal(matrix, 40)
    matrix[417, 3], matrix[5, 9], matrix[2, 7] = 9, 8, 8
    return matrix, [f"c{i}" for i in range(n)]


def test_confusion_of_many_classes_draws_the_most_confused_pairs(tmp_path):
    matrix, names = many_classes()
    pairs = figures.confused_pairs(matrix)
    assert len(pairs) == figures.TOP_PAIRS
    assert pairs[:3] == [(417, 3, 9, 9 / matrix[417].sum()), (2, 7, 8, 8 / matrix[2].sum()),
                         (5, 9, 8, 8 / matrix[5].sum())]
    rest = [(-count, i, j) for i, j, count, _ in pairs[3:]]
    assert rest == sorted(rest) and all(i != j for i, j, _, _ in pairs)  # deterministic: count, true, predicted
    fig = figures.evaluation_figure(confusion=(matrix, names))
    assert len(fig.axes) == 1 and colour_bars(fig) == 0 and not fig.axes[0].images
    ax = fig.axes[0]
    assert ax.get_title().startswith(f"most confused pairs (top {figures.TOP_PAIRS}, 1000 classes)")
    widths = [bar.get_width() for bar in ax.patches]
    assert widths[:3] == [9, 8, 8] and len(widths) == figures.TOP_PAIRS and widths == sorted(widths, reverse=True)
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels[:3] == ["c417 \u2192 c3", "c2 \u2192 c7", "c5 \u2192 c9"]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first pair on top
    assert ax.texts[0].get_text().strip() == f"9 ({100 * 9 / matrix[417].sum():.2g}%)"
    at_most = figures.CONFUSION_MAX
    small = figures.evaluation_figure(confusion=(matrix[:at_most, :at_most], names[:at_most]))
    assert len(small.axes[0].images) == 1  # up to CONFUSION_MAX classes: still the matrix
    path = str(tmp_path / "eval.png")
    assert figures.evaluation(path, per_class=dict(zip(names, matrix.diagonal() / matrix.sum(1))),
                              confusion=(matrix, names), title="imagenet") == path
    width, height = png_size(path)
    assert width > height > 500


def test_confused_pairs_without_mistakes_say_so():
    matrix = np.eye(40, dtype=np.int64) * 3
    assert figures.confused_pairs(matrix) == []
    with pytest.raises(ValueError, match="square"):
        figures.confused_pairs(matrix[:3])
    ax = figures.evaluation_figure(confusion=(matrix, [str(i) for i in range(40)])).axes[0]
    assert not ax.patches and "no mistakes" in ax.texts[0].get_text()


def test_classification_only_evaluation_has_no_recall_panel():
    per_class = {name: i / 10 for i, name in enumerate(CLASSES)}
    fig = figures.evaluation_figure(per_class=per_class, confusion=(np.eye(10, dtype=np.int64) * 5 + 1, CLASSES))
    assert len(fig.axes) == 2 and colour_bars(fig) == 1
    assert fig.axes[0].get_title() == "per-class accuracy"
    assert not [ax for ax in fig.axes if ax.get_title().startswith("retrieval")]
    assert len(figures.evaluation_figure(per_class=per_class).axes) == 1


def demo_inputs(n=40, shown=20):
    rng = np.random.default_rng(1)
    labels = np.arange(n) % 10
    predictions = np.where(rng.random(n) < 0.7, labels, (labels + 3) % 10)
    return dict(
        headline={"zero_shot_accuracy": 0.7, "zero_shot_chance": 0.1, "i2t_R@1": 0.72, "i2t_R@5": 0.98,
                  "t2i_R@1": 0.9, "t2i_R@5": 1.0, "i2t_chance_R@1": 0.1, "i2t_chance_R@5": 0.5,
                  "t2i_chance_R@1": 0.1, "t2i_chance_R@5": 0.41, "held_out_images": n},
        images=[rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)], labels=labels,
        predictions=predictions, probabilities=rng.uniform(0.2, 1.0, n).astype(np.float32), classnames=CLASSES,
        similarity=rng.uniform(-0.2, 0.6, (shown, 10)), history=run_records(eval_every=0))


def test_demo_figure_panels_and_png(tmp_path):
    inputs = demo_inputs()
    fig = figures.demo_figure(**inputs)
    assert len(fig.axes) == 6 and colour_bars(fig) == 2
    gallery = next(ax for ax in fig.axes if len(ax.images) > 1)
    assert len(gallery.images) == 20
    wrong = int(np.sum(inputs["predictions"][:20] != inputs["labels"][:20]))
    assert len(gallery.patches) == wrong and len(gallery.texts) == 20 + wrong  # frames and "true: ..." when wrong
    confusion = next(ax for ax in fig.axes if ax.get_xlabel() == "predicted class")
    assert confusion.images[0].get_array().sum() == 40  # every held-out image, not only the ones shown
    assert len(figures.demo_figure(**{**inputs, "similarity": inputs["similarity"][:7]}).axes[3].images) == 7
    path = str(tmp_path / "demo.png")
    assert figures.demo(path, **inputs) == path
    assert png_size(path) == pixels(figures.DEMO_SIZE)


def test_demo_accuracy_panel_says_why_it_is_capped():
    """The demo's in-batch accuracy sits near 0.16 by construction: the panel draws that ceiling and says why."""
    why = "Why so low: a caption names only the digit"
    fig = figures.demo_figure(**demo_inputs(), accuracy_ceiling=(0.156, why))
    panel = next(ax for ax in fig.axes if ax.get_title() == "in-batch accuracy")
    dashed = [line for line in panel.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [0.156, 0.156]
    assert "0.16" in dashed[0].get_label() and any(why in text.get_text().replace("\n", " ") for text in panel.texts)
    plain = figures.demo_figure(**demo_inputs())
    assert not [t for ax in plain.axes for t in ax.texts if "Why" in t.get_text()]


def test_in_batch_limits_match_the_demo_batches():
    """demo.in_batch_limits against the batches the demo trains on (the pipeline's global order over the digits'
    training images): the classes in a batch / its size (the accuracy ceiling), and sum n_c ln n_c / its size
    (the loss floor)."""
    from dualenc import data
    from dualenc.data.pipeline import GlobalOrder

    labels = np.asarray(data.load_digits("train", seed=0, image_size=8).labels)
    order = GlobalOrder(len(labels), demo.BATCH_SIZE, seed=0)
    accuracy, loss = [], []
    for step in range(100):
        counts = np.bincount(labels[order.batch(step)])
        counts = counts[counts > 0]
        accuracy.append(len(counts) / demo.BATCH_SIZE)
        loss.append(float(np.sum(counts * np.log(counts))) / demo.BATCH_SIZE)
    limits = demo.in_batch_limits(labels, demo.BATCH_SIZE)
    assert limits["accuracy"] == pytest.approx(np.mean(accuracy), abs=0.002) and 0.15 < limits["accuracy"] < 0.16
    assert limits["loss"] == pytest.approx(np.mean(loss), abs=0.02)


@pytest.mark.parametrize("change, match", [
    (dict(accuracy_ceiling=(1.5, "why")), "accuracy_ceiling must be"),
    (dict(accuracy_ceiling=0.15), "accuracy_ceiling must be"),
    (dict(history=[]), "history is empty"),
    (dict(headline={"i2t_R@1": 0.5}), "headline must be"),
    (dict(labels=np.arange(39) % 10), r"labels must be \(40,\)"),
    (dict(labels=np.full(40, 0.5)), "labels must be"),
    (dict(predictions=np.full(40, 10)), "predictions holds class ids outside"),
    (dict(probabilities=np.ones((40, 10))), "probabilities must be"),
    (dict(similarity=np.zeros((21, 10))), "similarity must be"),
    (dict(similarity=np.zeros((20, 9))), "similarity must be"),
])
def test_demo_refuses_bad_input(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        figures.demo(str(tmp_path / "demo.png"), **{**demo_inputs(), **change})
    assert not os.listdir(tmp_path)


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it fails, as when not installed
    with pytest.raises(ImportError, match=r"pip install 'dualenc\[demo\]'"):
        figures.training_figure(run_records())
    with pytest.raises(ImportError, match=r"pip install 'dualenc\[demo\]'"):  # before any training
        demo.run(str(tmp_path / "demo"), steps=1, seed=0, quiet=True)
    assert not os.listdir(tmp_path)


def test_importing_dualenc_does_not_import_matplotlib():
    code = "import sys, dualenc, dualenc.plots, dualenc.demo; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "XLA_FLAGS": ""})
