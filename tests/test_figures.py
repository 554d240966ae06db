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
])
def test_evaluation_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        figures.evaluation_figure(**kwargs)


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
