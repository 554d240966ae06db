"""dualenc's evaluation against the clip-benchmark package itself: the same numbers on the same data and model
(a tiny open_clip model that CLIP_benchmark loads natively and dualenc loads from open_clip's layout), its JSON
layout, `dualenc eval --benchmark`, compiled programs reused across datasets, and metrics during training."""

import json
import math
import os

import numpy as np
import pytest

import benchmark_data
from dualenc.benchmark import datasets, metrics, run
from test_cli import dualenc_run

TOL = 1e-6


# One worker runs this module and test_clip_benchmark_plugin.py: they share the session's datasets, model and
# CLIP_benchmark runs (conftest: clip_benchmark_folders, clip_benchmark_native).
pytestmark = pytest.mark.xdist_group("clip_benchmark")


@pytest.fixture(scope="module")
def files(clip_benchmark_folders):
    f = clip_benchmark_folders
    return {"cls": f["cls"], "ret": f["ret"], "oc": f["model"], "root": f["root"]}


@pytest.fixture(scope="module")
def reference(clip_benchmark_native):
    """CLIP_benchmark's own results on both datasets, with the open_clip model it loads natively."""
    return clip_benchmark_native


@pytest.fixture(scope="module")
def model(files):
    return run.Model.load(files["oc"], batch_size=8)


def test_zero_shot_classification_equals_clip_benchmark(files, reference, model):
    details = {}
    found = run.zeroshot_classification(model, datasets.open_benchmark(files["cls"], "test"), details=details)
    expected = reference["cls"]["metrics"]
    assert set(found) == set(expected) == {"acc1", "acc5", "mean_per_class_recall"}
    for key in expected:
        assert abs(found[key] - expected[key]) <= TOL, (key, found[key], expected[key])
    # the numbers are not degenerate: some images right, some wrong, several classes predicted, no near-ties
    assert 0 < expected["acc1"] < 1 and len(set(details["predictions"].tolist())) >= 3
    data = datasets.open_benchmark(files["cls"], "test")
    scores = run.encode_split(model, data).images @ run.classifier(model, data)
    assert (metrics.top_k(scores, 5) == details["top"]).all()
    ranked = np.sort(scores, axis=1)[:, ::-1]
    assert np.min(ranked[:, 0] - ranked[:, 1]) > 1e-4 and np.min(ranked[:, 4] - ranked[:, 5]) > 1e-5


def test_retrieval_equals_clip_benchmark(files, reference, model):
    found = run.zeroshot_retrieval(model, datasets.open_benchmark(files["ret"], "test"), recall_k=(1, 5, 10))
    expected = reference["ret"]["metrics"]
    assert set(found) == set(expected) and len(found) == 6
    for key in expected:
        assert abs(found[key] - expected[key]) <= TOL, (key, found[key], expected[key])
    assert 0 < expected["image_retrieval_recall@1"] < expected["image_retrieval_recall@10"] <= 1


def test_metrics_against_clip_benchmark_functions():
    """The metric functions on random scores with planted ties, against CLIP_benchmark's own functions."""
    import torch
    from clip_benchmark.metrics import zeroshot_retrieval
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 9)).astype(np.float32)
    labels = rng.integers(0, 9, 60)
    acc1, acc5 = benchmark_data.accuracy(torch.from_numpy(scores), torch.from_numpy(labels), (1, 5))
    found = metrics.classification_metrics(scores, labels)
    assert found["acc1"] == acc1 and found["acc5"] == acc5
    assert abs(found["mean_per_class_recall"] - balanced_accuracy_score(labels, scores.argmax(1))) < 1e-12
    assert math.isnan(metrics.classification_metrics(scores[:, :4], labels % 4)["acc5"])  # < 5 classes
    images = rng.normal(size=(12, 8)).astype(np.float32)
    texts = rng.normal(size=(30, 8)).astype(np.float32)
    owner = np.concatenate([np.arange(12), rng.integers(0, 12, 18)])
    found = metrics.retrieval_recall(images, texts, owner, (1, 3, 5))
    scores_t = torch.from_numpy(texts @ images.T)
    positive = torch.zeros_like(scores_t, dtype=bool)
    positive[torch.arange(len(texts)), torch.from_numpy(owner)] = True
    for k in (1, 3, 5):
        image_r = (zeroshot_retrieval.recall_at_k(scores_t, positive, k) > 0).float().mean().item()
        text_r = (zeroshot_retrieval.recall_at_k(scores_t.T, positive.T, k) > 0).float().mean().item()
        assert abs(found[f"image_retrieval_recall@{k}"] - image_r) < TOL
        assert abs(found[f"text_retrieval_recall@{k}"] - text_r) < TOL


def test_ties_go_to_the_lower_index():
    scores = np.asarray([[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2]], np.float32)
    assert metrics.top_k(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert metrics.classification_metrics(scores, [2, 3], 4)["acc1"] == 0.0
    assert metrics.boundary_ties(scores, 1) == 2 and metrics.boundary_ties(scores, 2) == 1
    assert metrics.top_k(np.asarray([[0.1, np.nan, 0.3]]), 2).tolist() == [[1, 2]]  # NaN first, as torch.topk
    images = np.eye(3, dtype=np.float32)
    with pytest.warns(UserWarning, match="equal scores across their top-k cut"):  # one caption for two images
        found = metrics.retrieval_recall(images, images[[0, 1, 1]], [0, 1, 2], (1,))
    assert found["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # the third text's image ties and loses


def test_one_model_on_several_datasets_compiles_once(files, model):
    """A second and a third dataset (other sizes, other class counts) compile nothing new."""
    first = datasets.open_benchmark(files["cls"], "test")
    run.zeroshot_classification(model, datasets.open_benchmark(files["cls"], "train"))  # compiles, if not done yet
    with run.Compiles() as compiles:
        run.zeroshot_classification(model, first)
        run.zeroshot_classification(model, datasets.open_benchmark(files["cls"], "val"))
    assert compiles.count == 0


def test_cli_benchmark_writes_clip_benchmarks_json_and_one_table(files, reference, tmp_path):
    out = tmp_path / "results"
    proc = dualenc_run("eval", "--model", files["oc"], "--benchmark", files["cls"], files["ret"], "--batch-size", 8,
                       "--out", out)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["dataset", "task"] and "acc1" in lines[0] and "iR@5" in lines[0]
    assert [line.split()[0] for line in lines[2:4]] == ["wds/cls", "wds/ret"]
    written = sorted(p for p in os.listdir(out) if p.endswith(".json"))
    assert len(written) == 2 and sorted(p for p in os.listdir(out) if p.endswith(".png")) == \
        [p[:-5] + ".png" for p in written]
    for name in ("cls", "ret"):
        record = json.loads((out / next(p for p in written if p.startswith(f"wds_{name}_"))).read_text())
        assert set(record) == set(reference[name]) and record["task"] == reference[name]["task"]
        assert record["dataset"] == reference[name]["dataset"] and record["language"] == "en"
        for key, value in reference[name]["metrics"].items():
            assert abs(record["metrics"][key] - value) <= TOL
    assert "wds/ret zeroshot_retrieval: 14 images" in proc.stderr and "programs compiled" in proc.stderr


def test_cli_benchmark_refusals(files, tmp_path):
    bad = dualenc_run("eval", "--model", files["oc"], "--benchmark", tmp_path / "missing", check=False)
    assert bad.returncode == 2 and "--benchmark" in bad.stderr and str(tmp_path / "missing") in bad.stderr
    both = dualenc_run("eval", "--model", files["oc"], "--benchmark", files["cls"], "--data", "x.jsonl", check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    stray = dualenc_run("eval", "--model", files["oc"], "--data", "x.jsonl", "--recall-k", "3", check=False)
    assert stray.returncode == 2 and "--recall-k applies to --benchmark only" in stray.stderr


def test_training_refuses_a_dataset_of_the_other_task(files):
    """`dualenc train --eval-zeroshot` takes a classification set, --eval-retrieval a captioned one, checked before
    training (the metrics during training: tests/test_cli.py's training run)."""
    import argparse

    from dualenc.cli import benchmark as cli_benchmark
    from dualenc.cli.support import CommandError

    args = argparse.Namespace(eval_zeroshot=files["ret"], eval_retrieval=None, eval_split="test")
    with pytest.raises(CommandError, match="--eval-zeroshot .*a retrieval dataset; --eval-zeroshot needs a "
                                           "classification one"):
        cli_benchmark.training_sets(args)
    args = argparse.Namespace(eval_zeroshot=files["cls"], eval_retrieval=files["ret"], eval_split="test")
    sets = cli_benchmark.training_sets(args)
    assert sets["zeroshot"].task == "zeroshot_classification" and sets["retrieval"].task == "zeroshot_retrieval"


def test_cli_linear_probe_is_the_library_protocol(files, model, tmp_path):
    """`dualenc eval --benchmark ROOT --task linear_probe --val-split val`: CLIP_benchmark's keys, the weight decay
    swept on val (one of its 97), the same figures as dualenc.benchmark.linear_probe on the same embeddings."""
    from dualenc.benchmark import linear_probe

    record = json.loads(dualenc_run("eval", "--model", files["oc"], "--benchmark", files["cls"], "--task",
                                    "linear_probe", "--val-split", "val", "--batch-size", 8, "--json",
                                    "--no-figure", "--out", tmp_path).stdout)["results"][0]
    assert record["task"] == "linear_probe" and set(record["metrics"]) == {
        "lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay", "epochs", "seed", "fewshot_k", "normalized"}
    assert record["metrics"]["weight_decay"] in linear_probe.WEIGHT_DECAYS
    split = {s: run.encode_split(model, datasets.open_benchmark(files["cls"], s)) for s in ("train", "val", "test")}
    expected = linear_probe.linear_probe(split["train"].images, split["train"].labels, split["test"].images,
                                         split["test"].labels, split["val"].images, split["val"].labels)
    for key, value in expected.items():
        assert record["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
