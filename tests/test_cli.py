"""Every subcommand end to end through the installed `dualenc` console script, on tiny models and data."""

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess


import numpy as np
import pytest
from conftest import make_workspace
from PIL import Image

import dualenc
from dualenc import cli

# One worker runs this module under `-n 2 --dist loadgroup` (the test command), so its module fixtures run once.
pytestmark = pytest.mark.xdist_group("cli")


def dualenc_run(*args, check=True):
    """The command in this process (its compiled programs stay cached between calls): (returncode, stdout,
    stderr) as subprocess.run gives them. Training runs in a subprocess instead (see dualenc_cmd), on one
    device, as a user's would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, proc.stderr[-3000:]
    return proc


def dualenc_cmd(*args, check=True, timeout=300, env=None, cwd=None):
    exe = shutil.which("dualenc")
    assert exe, "the dualenc console script is installed with the package"
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": "", **(env or {})}, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def training_run(workspace):
    """One logged training run: log lines every 2 steps, held-out evaluation every 3 (on --eval-data, and on the
    same images as CLIP_benchmark's datasets: --eval-zeroshot, --eval-retrieval), TensorBoard, and a row naming
    an image outside the data folder."""
    from PIL import Image

    from dualenc.benchmark import export

    out = workspace / "model"
    pairs = workspace / "data" / "pairs.jsonl"
    train_pairs = workspace / "data" / "train.jsonl"
    train_pairs.write_text(pairs.read_text() + json.dumps({"image": "../labels.txt", "caption": "outside"}) + "\n")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:12]
    images = [Image.open(workspace / "data" / r["image"]) for r in rows]
    names = ["red", "green", "blue"]
    export.write_split(workspace / "colours", "test", [(f"{i:03d}", im, names.index(r["label"]))
                                                       for i, (im, r) in enumerate(zip(images, rows))])
    export.write_metadata(workspace / "colours", classnames=names, templates=["a photo of the {c} square"])
    export.write_split(workspace / "captions", "test", [(f"{i:03d}", im, [r["caption"]])
                                                        for i, (im, r) in enumerate(zip(images, rows))])
    export.write_metadata(workspace / "captions", retrieval=True)
    proc = dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text", "--data", train_pairs,
                       "--out", out, "--steps", 6, "--batch-size", 4, "--checkpoint-every", 3, "--projection-dim", 8,
                       "--log-every", 2, "--eval-data", pairs, "--eval-every", 3, "--tensorboard",
                       "--eval-zeroshot", workspace / "colours", "--eval-retrieval", workspace / "captions")
    assert "trained 6 steps" in proc.stdout
    return out, proc


@pytest.fixture(scope="module")
def trained(training_run):
    return training_run[0]


def read_events(folder):
    """(tag, step, value) of every scalar in TensorBoard event files (TFRecords of Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found = []
    for name in sorted(os.listdir(folder)):
        blob = (folder / name).read_bytes()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at:at + 8])
            event = Event.FromString(blob[at + 12:at + 12 + length])
            at += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_train_logs_a_summary_progress_metrics_and_figures(training_run, workspace, tmp_path):
    """A start summary, plain log lines (stderr is not a terminal: no carriage-return bar), metrics.jsonl with
    train and held-out eval records, TensorBoard scalars and training.png. (First in the module: later tests
    resume the run.)"""
    out, proc = training_run
    err = proc.stderr
    assert "\r" not in err
    for part in ("12 pairs of 12 images", "missing image 1", "path outside the data folder 1", "2.00 epochs",
                 "(3 batches per epoch)", "device(s)", "trainable", "locked (vision tower locked)", "--image-root",
                 "--allow-outside"):
        assert part in err, (part, err)
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(word in lines[-1] for word in ("loss", "acc", "lr", "grad", "scale", "steps/s", "epoch"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert train[0]["learning_rate"] > train[-1]["learning_rate"] >= 0 and train[-1]["epoch"] == 2.0
    assert all(np.isfinite(r[k]) for r in train for k in ("loss", "accuracy", "grad_norm", "logit_scale"))
    assert np.isfinite(train[-1]["steps_per_second"]) and 0 <= evals[-1]["i2t_R@1"] <= 1
    assert 0 <= evals[-1]["zero_shot_accuracy"] <= 1  # every held-out image has a label
    # CLIP_benchmark's metrics on --eval-zeroshot / --eval-retrieval (acc5 NaN: 3 classes, as CLIP_benchmark)
    assert {"zeroshot/acc1", "zeroshot/mean_per_class_recall", "retrieval/image_retrieval_recall@1",
            "retrieval/text_retrieval_recall@10"} <= set(evals[-1]) and np.isnan(evals[-1]["zeroshot/acc5"])
    scalars = read_events(out / "tensorboard")
    assert ("train/loss", 4, pytest.approx(train[1]["loss"], rel=1e-6)) in scalars
    assert {tag for tag, _, _ in scalars} >= {"train/learning_rate", "eval/i2t_R_1", "eval/zero_shot_accuracy",
                                              "eval/zeroshot/acc1"}  # @ is not allowed in tags
    # the run's last CLIP_benchmark evaluation is `eval --benchmark` on the model it saved
    bench = json.loads(dualenc_run("eval", "--model", out, "--benchmark", workspace / "colours",
                                   workspace / "captions", "--json", "--no-figure", "--out", tmp_path).stdout)
    for record, prefix in zip(bench["results"], ("zeroshot", "retrieval")):
        for key, value in record["metrics"].items():
            assert evals[-1][f"{prefix}/{key}"] == pytest.approx(value, abs=1e-5, nan_ok=True), key
    with Image.open(out / "training.png") as picture:
        picture.load()
        assert picture.size[0] > 600


def test_train_writes_a_transformers_directory_and_resumes(trained, workspace):
    import transformers

    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        os.listdir(trained))
    model, info = transformers.VisionTextDualEncoderModel.from_pretrained(trained, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    transformers.VisionTextDualEncoderProcessor.from_pretrained(trained)
    steps = sorted(os.listdir(trained / "checkpoints"))
    assert steps == ["step_00000003", "step_00000006"]
    again = dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text",
                        "--data", workspace / "data" / "pairs.jsonl", "--out", trained, "--steps", 6, "--quiet",
                        "--batch-size", 4, "--checkpoint-every", 3, "--projection-dim", 8, check=False)
    assert again.returncode != 0 and "--resume" in again.stderr and "Traceback" not in again.stderr
    def resume(steps, *extra, check=True):
        return dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text", "--data",
                           workspace / "data" / "train.jsonl", "--out", trained, "--steps", steps, "--quiet",
                           "--batch-size", 4, "--checkpoint-every", 3, "--projection-dim", 8, "--resume", *extra,
                           check=check)

    logged = len((trained / "metrics.jsonl").read_text().splitlines())
    resumed = resume(9, "--log-every", 3)
    assert "trained 9 steps" in resumed.stdout
    assert "extending the run" in resumed.stderr and "from 6 to 9 steps" in resumed.stderr
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[logged:]] == [9]  # appended across resumes
    finished = resume(9)
    assert "already finished at step 9" in finished.stderr and "nan" not in finished.stdout + finished.stderr
    fewer = resume(5, check=False)
    assert fewer.returncode == 2 and "--steps 5" in fewer.stderr and "9 steps" in fewer.stderr
    other = resume(12, "--lr", "0.001", check=False)
    assert other.returncode == 2 and "learning_rate 0.0005 there, 0.001 here" in other.stderr, other.stderr
    assert "batch_size" not in other.stderr  # only the keys that differ


def test_train_fine_tunes_a_whole_model(trained, workspace, tmp_path):
    """--model DIR fine-tunes a whole dual encoder: its projections and logit scale are the starting point, the
    locked tower stays as it was, and the processor files come along."""
    import jax

    out = tmp_path / "tuned"
    dualenc_cmd("train", "--model", trained, "--data", workspace / "data" / "pairs.jsonl", "--out", out,
                "--steps", 2, "--batch-size", 4, "--lock", "vision", "--quiet")
    (_, before), (config, after) = dualenc.load_pretrained(trained), dualenc.load_pretrained(out)
    assert config.projection_dim == 8 and {"tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(out))
    same = jax.tree_util.tree_map(np.array_equal, before["vision"], after["vision"])
    assert all(jax.tree_util.tree_leaves(same))  # locked
    assert np.abs(np.asarray(after["text_projection"]["kernel"]) - before["text_projection"]["kernel"]).max() < 0.05
    assert not np.array_equal(after["text_projection"]["kernel"], before["text_projection"]["kernel"])
    for args, message in ((("--model", trained, "--vision", workspace / "vision"), "not both"),
                          (("--vision", workspace / "vision"), "both --vision DIR and --text DIR"),
                          (("--model", trained, "--projection-dim", 16), "projection_dim 8")):
        bad = dualenc_cmd("train", *args, "--data", workspace / "data" / "pairs.jsonl", "--out", tmp_path / "x",
                          "--steps", 1, "--quiet", check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_zero_shot_embed_search_eval(trained, workspace):
    images = workspace / "data" / "images"
    out = json.loads(dualenc_run("zero-shot", "--model", trained, "--labels", "red,green,blue", "--top-k", 5,
                                 "--json", images / "0.png", images / "1.png").stdout)
    results = out["results"]
    assert [r["image"] for r in results] == [str(images / "0.png"), str(images / "1.png")]
    assert all(len(r["labels"]) == 3 for r in results) and out["skipped"] == [] and out["images"] == 2
    _, params = dualenc.load_pretrained(trained)
    assert out["logit_scale"] == pytest.approx(float(np.exp(params["logit_scale"])), rel=1e-6)  # not a fixed 100
    assert abs(sum(results[0]["probabilities"]) - 1) < 1e-4 and out["probabilities"] == "softmax"
    plain = dualenc_run("zero-shot", "--model", trained, "--labels", "red,zebra,blue", images / "2.png")
    assert plain.stdout.startswith(str(images / "2.png") + ": ")
    assert "does not know" in plain.stderr and "'zebra'" in plain.stderr and "'red'" not in plain.stderr

    index = workspace / "images.safetensors"
    dualenc_run("embed", "--model", trained, "--images", images, "--out", index)
    from dualenc import files

    tensors, meta = files.read_safetensors(str(index))
    assert tensors["embeddings"].shape == (12, 8) and meta["kind"] == "image" and meta["count"] == "12"
    sidecar = workspace / meta["names_file"]  # the names beside it, not in the header
    assert sidecar.name == "images.names.jsonl" and len(sidecar.read_text().splitlines()) == 12
    old_style = workspace / "old.safetensors"  # as earlier versions wrote it: the names in the header
    names = [json.loads(line) for line in sidecar.read_text().splitlines()]
    files.write_safetensors(str(old_style), tensors, {"kind": "image", "names": json.dumps(names)})
    np.testing.assert_allclose(np.linalg.norm(tensors["embeddings"], axis=1), 1, rtol=1e-5)
    found = json.loads(dualenc_run("search", "--model", trained, "--index", index, "--top-k", 3, "--json",
                                   "a photo of the red square", "a blue square").stdout)
    assert [f["query"] for f in found] == ["a photo of the red square", "a blue square"]
    again = json.loads(dualenc_run("search", "--model", trained, "--index", old_style, "--top-k", 3, "--json",
                                   "a photo of the red square", "a blue square").stdout)
    assert again == found
    scores = tensors["embeddings"] @ dualenc.encode_texts(params, dualenc.load_config(trained),
                                                          dualenc.Processor.from_pretrained(trained),
                                                          ["a blue square"])[0]
    order = np.argsort(-scores, kind="stable")[:3]  # the exact, fully sorted reference
    assert [r["name"] for r in found[1]["results"]] == [names[i] for i in order]
    for f in found:
        scores = [r["score"] for r in f["results"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    (workspace / "texts.txt").write_text("a red square\na blue square\n")
    dualenc_run("embed", "--model", trained, "--texts", workspace / "texts.txt", "--out", workspace / "t.safetensors")
    by_image = json.loads(dualenc_run("search", "--model", trained, "--index", workspace / "t.safetensors", "--image",
                                      "--json", images / "0.png").stdout)
    assert {r["name"] for r in by_image[0]["results"]} == {"a red square", "a blue square"}

    report = workspace / "report"
    figures = json.loads(dualenc_run("eval", "--model", trained, "--data", workspace / "data" / "pairs.jsonl",
                                     "--labels-file", workspace / "labels.txt", "--out", report, "--json").stdout)
    assert figures["images"] == 12 and figures["skipped"] == {"missing image": 1} and figures["unreadable"] == []
    assert 0 <= figures["zero_shot_accuracy"] <= 1 and figures["zero_shot_chance"] == pytest.approx(1 / 3)
    assert set(figures["per_class_accuracy"]) == {"red", "green", "blue"}
    # mean per-class recall is the mean of the per-class accuracies; no top-5 among 3 classes
    assert figures["zero_shot_mean_per_class_recall"] == pytest.approx(np.mean(list(figures["per_class_accuracy"].values())))
    assert "zero_shot_top5_accuracy" not in figures
    # captions are identical within a colour: with labels, a caption is relevant to every image of its label
    assert figures["relevance"] == "same label"
    embeds = dualenc.encode_images(params, dualenc.load_config(trained), dualenc.Processor.from_pretrained(trained),
                                   [str(images / f"{i}.png") for i in range(12)])
    texts = dualenc.encode_texts(params, dualenc.load_config(trained), dualenc.Processor.from_pretrained(trained),
                                 [f"a photo of the {c} square" for c in ("red", "green", "blue") * 4])
    labels = np.array(["red", "green", "blue"] * 4)
    expected = dualenc.retrieval_metrics(embeds, texts, image_labels=labels, text_labels=labels)
    assert figures["i2t_R@1"] == pytest.approx(expected["i2t_R@1"])
    assert figures["t2i_R@5"] == pytest.approx(expected["t2i_R@5"])
    # the same figures with each caption relevant to its own image only would differ: 4 captions tie per colour
    own = dualenc.retrieval_metrics(embeds, texts, text_to_image=np.arange(12))
    assert any(own[k] != pytest.approx(expected[k]) for k in expected if "@" in k)
    assert json.loads((report / "metrics.json").read_text())["images"] == 12
    with Image.open(report / "eval.png") as picture:
        picture.load()


def test_folders_unreadable_images_and_odd_names(trained, workspace, tmp_path):
    """Folders are walked recursively in sorted order; an unreadable image is skipped, listed with its path and
    counted (--strict fails on it instead); a file name that is not UTF-8 prints escaped in text and JSON."""
    from dualenc import templates as sets

    source = (workspace / "data" / "images" / "0.png").read_bytes()
    photos = tmp_path / "photos"
    (photos / "00000" / "deeper").mkdir(parents=True)
    (photos / "00000" / "000000001.png").write_bytes(source)
    (photos / "00000" / "deeper" / "2.png").write_bytes(source)
    (photos / "bad.png").write_bytes(b"not an image at all")
    fd = os.open(os.fsencode(str(photos)) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT)
    os.write(fd, source)
    os.close(fd)
    out = json.loads(dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", "--json", photos).stdout)
    names = [os.path.relpath(r["image"], photos) for r in out["results"]]
    assert names == ["00000/000000001.png", "00000/deeper/2.png", "caf\\xe9.png"]
    assert [s["image"] for s in out["skipped"]] == [str(photos / "bad.png")] and out["images"] == 4
    text = dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", photos)
    assert f"{photos}/caf\\xe9.png: " in text.stdout and str(photos / "bad.png") in text.stderr
    strict = dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", "--strict", photos, check=False)
    assert strict.returncode == 2 and str(photos / "bad.png") in strict.stderr and "image 2" in strict.stderr
    globbed = json.loads(dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", "--json",
                                     photos / "**" / "*.png").stdout)
    assert globbed == out  # a quoted pattern names what the folder holds, in the same order
    unreadable = dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", "--json", photos / "bad.png",
                             check=False)
    assert unreadable.returncode == 1 and json.loads(unreadable.stdout)["results"] == []
    assert unreadable.stderr.strip().splitlines()[-1].startswith("dualenc zero-shot: error: no image could be read")
    (tmp_path / "seven.txt").write_text("\n".join(sets.OPENAI_IMAGENET_7) + "\n")
    by_name, by_file = (dualenc_run("zero-shot", "--model", trained, "--labels", "red,green", "--json", "--templates",
                                    templates, photos / "00000").stdout
                        for templates in ("openai_imagenet_7", tmp_path / "seven.txt"))
    assert by_name == by_file and json.loads(by_name)["results"] != out["results"][:2]
    written = json.loads(dualenc_run("embed", "--model", trained, "--images", photos, "--out",
                                     tmp_path / "e.safetensors", "--json").stdout)
    assert written["written"] == 3 and len(written["skipped"]) == 1
    rows = [{"image": "00000/000000001.png", "caption": "a red square", "label": "red"},
            {"image": "bad.png", "caption": "a green square", "label": "green"},
            {"image": "00000/deeper/2.png", "caption": "a green square", "label": "green"},
            {"image": "../e.safetensors", "caption": "outside the data folder"}]
    (photos / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = dualenc_run("eval", "--model", trained, "--data", photos / "pairs.jsonl", "--out", tmp_path / "report",
                       "--json")
    figures = json.loads(proc.stdout)
    assert figures["images"] == 2 and figures["texts"] == 2 and len(figures["unreadable"]) == 1
    assert figures["skipped"] == {"path outside the data folder": 1}
    assert "--image-root" in proc.stderr and "--allow-outside" in proc.stderr


def test_image_patterns_expand_as_tar_globs_do(tmp_path):
    """Quoted globs ('**' at any depth) and braces name images as tar patterns do, their matches in sorted order,
    folders among them walked and other files left out; a pattern matching nothing is an error naming it."""
    from dualenc.cli.support import CommandError, image_files

    for name in ("a/1.png", "a/b/2.jpg", "a/b/c/3.PNG", "a/.hidden.png", "a/notes.txt", "z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    at = lambda *names: [str(tmp_path / n) for n in names]  # noqa: E731
    assert image_files(at("a/**/*.png")) == at("a/1.png")  # case-sensitive, as tar globs are
    assert image_files(at("a/**/*.*")) == at("a/1.png", "a/b/2.jpg", "a/b/c/3.PNG")
    assert image_files(at("a/*")) == at("a/1.png", "a/b/2.jpg", "a/b/c/3.PNG")  # a/b walked, notes.txt left out
    assert image_files(at("{z,a/1}.png", "a/b")) == at("z.png", "a/1.png", "a/b/2.jpg", "a/b/c/3.PNG")
    for pattern, message in (("a/*.gif", "pattern '.*a/\\*.gif' matches no file"),
                             ("a/*.txt", "pattern '.*a/\\*.txt' matches no image"),
                             ("{z,y}.png", "image not found: .*y.png \\(from '.*\\{z,y\\}.png'\\)")):
        with pytest.raises(CommandError, match=message):
            image_files(at(pattern))


@pytest.mark.parametrize("args,message", [
    (["zero-shot", "--model", "/nowhere", "--labels", "a,b", "x.png"], "image not found: x.png"),
    (["eval", "--model", "/nowhere", "--data", "/nowhere.jsonl"], "caption file not found"),
    (["embed", "--model", "/nowhere", "--texts", "t.txt", "--out", "x.npy"], ".safetensors"),
    (["search", "--model", "/nowhere", "--index", "/nowhere.safetensors", "q"], "index file not found"),
    (["zero-shot", "--model", "MODEL", "--labels-file", "/no/labels.txt", "IMAGE"], "labels file not found"),
    (["zero-shot", "--model", "/nowhere/model", "--labels", "a,b", "IMAGE"], "model directory not found"),
])
def test_errors_are_one_line_without_traceback(args, message, trained, workspace):
    args = [str(trained) if a == "MODEL" else str(workspace / "data" / "images" / "0.png") if a == "IMAGE" else a
            for a in args]
    proc = dualenc_run(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("dualenc "), proc.stderr
    with pytest.raises(Exception):  # --debug: the exception itself, with its traceback
        dualenc_run(*args, "--debug", check=False)


def test_compilation_cache_keeps_programs_across_runs(trained, workspace, tmp_path):
    """The command keeps compiled programs in DUALENC_COMPILATION_CACHE (a second run reads them back and
    answers the same); "off" writes none."""
    image = workspace / "data" / "images" / "2.png"
    runs = []
    for where in (tmp_path / "cache", tmp_path / "cache", "off"):
        env = {"DUALENC_COMPILATION_CACHE": str(where), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_COMPILATION_CACHE_DIR": ""}  # the command's own choice, not the test session's
        runs.append(dualenc_cmd("zero-shot", "--model", trained, "--labels", "red,green,blue", "--json", image,
                                env=env, cwd=tmp_path).stdout)
        if len(runs) == 1:
            entries = os.listdir(tmp_path / "cache")
            assert any(name.endswith("-cache") for name in entries), entries
    assert runs[0] == runs[1] == runs[2]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(entries)  # the second run compiled nothing new
    assert not os.path.exists(tmp_path / "off")


def test_every_subcommand_has_help_with_defaults_and_an_example(tmp_path):
    top = cli.parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == set(cli.EXAMPLES)
    for name, sub in subs.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and not action.required and action.dest != "help":
                assert "default" in formatter._get_help_string(action), (name, action.dest)
        out = sub.format_help()
        assert "example (after `dualenc demo`):" in out and cli.EXAMPLES[name] in " ".join(out.split())
    (tmp_path / "dualenc-demo" / "model").mkdir(parents=True)
    (tmp_path / "dualenc-demo" / "model" / "config.json").write_text("{}")
    hint = dualenc_run("zero-shot", "--model", tmp_path / "dualenc-demo", "--labels", "a,b",
                       tmp_path / "dualenc-demo" / "model" / "config.json", check=False)
    assert hint.returncode == 2 and f"use --model {tmp_path / 'dualenc-demo' / 'model'}" in hint.stderr


def test_ctrl_c_saves_the_last_step_and_says_how_to_resume(trained, workspace, tmp_path):
    """SIGINT stops after the current step, saves it as a training checkpoint and prints the exact command that
    continues; running that command finishes the run."""
    import shlex
    import signal

    out = tmp_path / "run"
    args = ["train", "--model", trained, "--data", workspace / "data" / "pairs.jsonl", "--out", out, "--steps", 30,
            "--batch-size", 4, "--checkpoint-every", 1000, "--log-every", 1]
    proc = subprocess.Popen([shutil.which("dualenc"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""})
    for line in proc.stderr:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    err = line + proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    step = int(err.split("interrupted after step ")[1].split()[0])
    assert 3 <= step < 30 and os.listdir(out / "checkpoints") == [f"step_{step:08d}"]
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("dualenc train ") and command.endswith(" --resume")
    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=300,
                             env={**os.environ, "XLA_FLAGS": ""})
    assert resumed.returncode == 0 and "trained 30 steps" in resumed.stdout, resumed.stderr[-2000:]
    assert f"resuming from step {step}" in resumed.stderr


def test_every_subcommand_on_open_clip_and_clip_models(workspace, tmp_path):
    """An open_clip directory (no tokenizer files: open_clip's own vocabulary) runs zero-shot, embed, search and
    eval; converted with save_pretrained, the transformers CLIP directory trains with its projections kept."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 8, "quick_gelu": True,
           "vision_cfg": {"image_size": 30, "patch_size": 10, "width": 32, "layers": 1, "head_width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"resize_mode": "squash"}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(oc / "open_clip_model.safetensors"))
    images, pairs = workspace / "data" / "images", workspace / "data" / "pairs.jsonl"
    results = json.loads(dualenc_run("zero-shot", "--model", oc, "--labels", "red,green,blue", "--json",
                                     images / "0.png").stdout)["results"]
    assert len(results) == 1 and abs(sum(results[0]["probabilities"]) - 1) < 1e-4
    dualenc_run("embed", "--model", oc, "--images", images, "--out", tmp_path / "index.safetensors")
    found = json.loads(dualenc_run("search", "--model", oc, "--index", tmp_path / "index.safetensors", "--json",
                                   "a photo of the red square").stdout)[0]["results"]
    assert found and found[0]["score"] >= found[-1]["score"]
    figures = json.loads(dualenc_run("eval", "--model", oc, "--data", pairs, "--labels-file",
                                     workspace / "labels.txt", "--out", tmp_path / "report", "--json").stdout)
    assert figures["images"] == 12 and 0 <= figures["zero_shot_accuracy"] <= 1

    config, params = dualenc.load_pretrained(oc)
    dualenc.save_pretrained(tmp_path / "hf", config, params, processor=dualenc.Processor.from_pretrained(oc))
    dualenc_cmd("train", "--vision", tmp_path / "hf", "--text", tmp_path / "hf", "--data", pairs, "--lock", "vision",
                "--out", tmp_path / "tuned", "--steps", 2, "--batch-size", 4, "--quiet")
    tuned_config, tuned = dualenc.load_pretrained(tmp_path / "tuned")
    assert tuned_config.projection_dim == 8 and tuned_config.text == config.text  # the CLIP's own projections
    np.testing.assert_array_equal(tuned["vision"]["embeddings"]["patch"]["kernel"],
                                  params["vision"]["embeddings"]["patch"]["kernel"])  # locked
