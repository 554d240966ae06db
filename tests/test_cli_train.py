"""`dualenc train` run as people run it, from a working directory with relative paths: Ctrl-C and the command it
prints, --resume and --resume-or-start, one run per metrics.jsonl, the captions' unknown words, the compile
notice, and every argument checked before the model loads."""

import argparse
import json
import os
import shlex
import shutil
import signal

import pytest
from conftest import make_workspace
from test_cli import dualenc_run

import dualenc
from dualenc.train import runlog
from dualenc.formats import assembly
from dualenc.train import loop as trainer
from dualenc.cli import support as common, training
from dualenc.cli import training_checks as checks

# One worker runs this module under `--dist loadgroup`, so its module fixture is built once.
pytestmark = pytest.mark.xdist_group("cli_train")

TRAIN = ["train", "--vision", "vision", "--text", "text", "--projection-dim", 8, "--batch-size", 4]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """make_workspace's folder, with odd.jsonl: its 12 pairs, 3 of them captioned with words the tokenizer
    does not know."""
    root = make_workspace(tmp_path_factory.mktemp("train"))
    rows = [json.loads(line) for line in (root / "data" / "pairs.jsonl").read_text().splitlines()]
    for row in rows[0:9:4]:
        row["caption"] = "a crimson square on teal paper"
    (root / "data" / "odd.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def steps_logged(out, kind="train"):
    return [r["step"] for r in runlog.read(str(out / runlog.METRICS_FILE)) if r["kind"] == kind]


def ctrl_c_at(at: int):
    """A Progress.step that sends this process SIGINT (Ctrl-C) once step `at` is logged."""
    step = training.Progress.step

    def ctrl_c(self, number, metrics):
        step(self, number, metrics)
        if number == at:
            os.kill(os.getpid(), signal.SIGINT)
    return ctrl_c


def test_ctrl_c_then_the_printed_command_resumes_a_relative_out(workspace, monkeypatch):
    """From the data's folder with a relative --out: a new run replaces the log an earlier run left without a
    checkpoint, says how many captions hold unknown words (and which), says it compiles; Ctrl-C after step 3
    prints a command that, run as printed, resumes (orbax took only absolute paths: it failed), dropping the
    records logged after the checkpoint it resumes from, so metrics.jsonl holds one run."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(common, "COMPILE_NOTICE_DELAY", 0.0)  # every compile says so
    step = training.Progress.step
    monkeypatch.setattr(training.Progress, "step", ctrl_c_at(3))
    out = workspace / "lit-model"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 99.0}\n' * 2)  # a run that crashed
    first = dualenc_run(*TRAIN, "--data", "data/odd.jsonl", "--out", "lit-model", "--steps", 6,
                        "--checkpoint-every", 2, "--log-every", 1, check=False)
    err = first.stderr
    assert first.returncode == 130, err[-3000:]
    assert ("replaces the log of an earlier run in lit-model that left no checkpoint: 2 records in "
            "lit-model/metrics.jsonl") in err
    assert "captions with words the tokenizer does not know: 25.0% (3 of the 12 captions)" in err
    [warning] = [line for line in err.splitlines() if "warning:" in line]
    assert "3 of the 12 captions (25%) hold words" in warning and "'crimson'" in warning and "'teal'" in warning
    assert "compiling the train step for batch 4..." in err and "compiled in" in err
    assert steps_logged(out) == [1, 2, 3] and 99.0 not in [r["loss"] for r in runlog.read(str(out / "metrics.jsonl"))]
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[0] == "dualenc" and command[-1] == "--resume" and command[command.index("--out") + 1] == "lit-model"
    assert [s for s, _ in trainer.checkpoints("lit-model/checkpoints")] == [2, 3]
    shutil.rmtree(out / "checkpoints" / "step_00000003")  # as if killed after step 3 was logged, before its save

    monkeypatch.setattr(training.Progress, "step", step)
    resumed = dualenc_run(*command[1:])
    assert "resuming from step 2" in resumed.stderr and "trained 6 steps" in resumed.stdout
    assert "dropped the 1 record of lit-model/metrics.jsonl logged after step 2" in resumed.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # step 3 once: the resumed run's
    assert (out / "training.png").is_file() and dualenc.load_config(out).projection_dim == 8
    again = dualenc_run(*command[1:-1], "--resume-or-start")  # a preemptible job's restart: nothing left to do
    assert "already finished at step 6" in again.stderr and steps_logged(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", 32], "--batch-size 32 is more than the 12 distinct images in data/pairs.jsonl (a batch holds "
                           "each image at most once): lower --batch-size to 12 or less"),
    (["--resume", "--out", "lit-modle"], "--resume: no training checkpoint in lit-modle/checkpoints"),
    (["--steps", 0], "--steps must be at least 1, got 0"),
    (["--lr", 0], "--lr must be a positive number"),
    (["--max-replaced", 1.5], "--max-replaced must be a share between 0 and 1, got 1.5"),
    (["--cache", "--lock", "text"], "--cache keeps the locked vision tower's outputs: it needs --lock vision"),
    (["--unlocked-layers", 1, "--lock", "none"], "--unlocked-layers trains the top layers of the locked tower"),
    (["--eval-data", "data/nowhere.jsonl"], "--eval-data caption file not found: data/nowhere.jsonl"),
    (["--process-id", 1], "--num-processes and --process-id go with --coordinator"),
    (["--batch-size", 6], "--batch-size 6 does not split over the 4 devices"),  # conftest's 4 CPU devices
    (["--accum-steps", 2, "--batch-size", 4], "--batch-size 4 with --accum-steps 2 does not split into 2 "
                                              "micro-batches over the 4 devices: use a multiple of 8"),
    (["--patch-dropout", 1], "--patch-dropout must be a share in [0, 1), got 1.0"),
    (["--remat", "everything"], "--remat 'everything' is not a policy in jax.checkpoint_policies"),
    (["--augment", "--cache"], "--augment (or an --aug-*/--color-jitter/--gray-scale-prob option) with --cache"),
    (["--aug-scale", 0.5, 2], "--aug-scale must satisfy min <= max within (0, 1], got (0.5, 2.0)"),
    (["--data-weights", "1::2"], "--data-weights gives 2 weights for the 1 sources of --data"),
    (["--model-parallel", 3], "--model-parallel 3 does not divide the 4 devices"),
    (["--layer-decay", 1.5], "--layer-decay must be in (0, 1], got 1.5"),
])
def test_arguments_are_checked_before_the_summary_and_the_model(args, message, workspace, monkeypatch):
    monkeypatch.chdir(workspace)

    def no_model(*_, **__):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(assembly, "start_from", no_model)
    args = ["--out", "run", *args] if "--out" not in args else args
    proc = dualenc_run(*TRAIN, "--data", "data/pairs.jsonl", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_projection_dim_of_a_whole_model_is_checked_from_its_config(workspace, tmp_path, monkeypatch):
    """Before the data is read (it is missing here) and without loading the weights."""
    import jax
    from test_train import CONFIG

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(dualenc.formats, "load_pretrained", None)  # weights are not read
    dualenc.save_pretrained(tmp_path / "model", CONFIG, dualenc.init(jax.random.key(0), CONFIG))
    proc = dualenc_run("train", "--model", tmp_path / "model", "--projection-dim", 8, "--data", "data/none.jsonl",
                       "--out", "run", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"dualenc train: error: --projection-dim: {tmp_path / 'model'} embeds with projection_dim 16; a "
        f"projection_dim of 8 does not apply to a whole model (compose towers for new ones)")


def test_resume_or_start_starts_where_there_is_no_checkpoint(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), steps=4, resume=False, resume_or_start=True)
    assert checks.resume_point(args, str(tmp_path / "checkpoints")) == (False, False)
    with pytest.raises(common.CommandError, match=f"no training checkpoint in {tmp_path}/checkpoints"):
        checks.resume_point(argparse.Namespace(**{**vars(args), "resume": True, "resume_or_start": False}),
                            str(tmp_path / "checkpoints"))


def test_run_log_keeps_one_run(tmp_path):
    """A new run replaces an earlier run's metrics.jsonl and event files; a resumed one keeps the records up to its
    checkpoint's step (and drops a line cut short by a crash) and hides later TensorBoard events."""
    records = "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    (tmp_path / "metrics.jsonl").write_text(records + '{"kind": "train", "st')
    log = runlog.RunLog(str(tmp_path), tensorboard=True, resumed_from=2)
    log.write({"kind": "train", "step": 3, "loss": 0.5})
    log.close()
    assert log.dropped == 2 and [(r["step"], r["loss"]) for r in runlog.read(log.path)] == [(1, 1.0), (2, 1.0),
                                                                                          (3, 0.5)]
    scalars, starts = events(tmp_path / "tensorboard")
    assert scalars == [("train/loss", 3)] and starts == [3]  # TensorBoard hides the earlier events from step 3 on
    fresh = runlog.RunLog(str(tmp_path), tensorboard=True)
    fresh.close()
    assert fresh.replaced == 3 and fresh.replaced_events == 1 and runlog.read(fresh.path) == []
    assert events(tmp_path / "tensorboard") == ([], [])


def events(folder):
    """([(tag, step) of each scalar], [steps of the session starts]) in a folder's TensorBoard event files."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars, starts = [], []
    for name in sorted(os.listdir(folder)):
        blob, at = (folder / name).read_bytes(), 0
        while at < len(blob):  # TFRecords: length (8 bytes), its CRC (4), the Event, its CRC (4)
            length = int.from_bytes(blob[at:at + 8], "little")
            event = Event.FromString(blob[at + 12:at + 12 + length])
            at += 16 + length
            scalars += [(value.tag, event.step) for value in event.summary.value]
            if event.session_log.status == SessionLog.START:
                starts.append(event.step)
    return scalars, starts


def test_caption_sample_of_a_prepared_folder(workspace, tmp_path):
    """Records are sampled evenly past the limit, and the summary says it is a sample; --data FOLDER takes
    --image-root for images outside the prepared folder."""
    from dualenc.data import prepare

    prepare([str(workspace / "data" / "odd.jsonl")], tmp_path / "prepared")
    source = training.training_data([str(tmp_path / "prepared")], str(tmp_path / "out" / "prepared"),
                                    image_root=str(workspace / "data"))
    assert source.image_root == str(workspace / "data")
    tokenizer = dualenc.Tokenizer.from_pretrained(str(workspace / "text"))
    captions, what = checks.caption_sample(source, limit=4)
    assert len(captions) == 4 and what == f"of the 4 captions of 4 sampled evenly from the {len(source)} records"
    line, warning = checks.unknown_words(tokenizer, captions, what)
    assert line.startswith("captions with words the tokenizer does not know: ") and line.endswith(what + ")")
    every, what = checks.caption_sample(source)
    n = len(source)  # 13: the row naming a missing image is a record too ("a photo of nothing")
    assert what == f"of the {n} captions of the {n} records"
    line, warning = checks.unknown_words(tokenizer, every, what)
    assert f"{4 / n:.1%} (4 of the {n} captions of the {n} records)" in line
    assert "'crimson'" in warning and "'nothing'" in warning


def test_records_replaced_are_logged_and_summed_up_and_too_many_stop_the_run(workspace, tmp_path, monkeypatch):
    """Issue 22 (point 12): 9 of 10 images unreadable trained on copies of one image under "rows skipped: none".
    The records replaced are counted in the log lines, metrics.jsonl and the end summary; past --max-replaced
    the run stops with one line naming --data, the most common reason and the option, and saves no model."""
    from test_train import host_train_step

    from dualenc.data import pipeline

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(dualenc.train, "make_train_step", host_train_step())  # the command's reports are under test
    (tmp_path / "images").mkdir()
    shutil.copy(workspace / "data" / "images" / "0.png", tmp_path / "images" / "0.png")
    rows = [{"image": "images/0.png", "caption": "a photo of the red square"}]
    for i in range(1, 10):
        (tmp_path / "images" / f"{i}.png").write_bytes(b"not a png")
        rows.append({"image": f"images/{i}.png", "caption": "a photo of the blue square"})
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    proc = dualenc_run(*TRAIN, "--data", tmp_path / "bad.jsonl", "--out", out, "--steps", 3, "--log-every", 1,
                       "--checkpoint-every", 0, "--max-replaced", 1)
    counts = [r["records_replaced"] for r in runlog.read(str(out / runlog.METRICS_FILE))]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert len(counts) == 3 and counts == sorted(counts) and counts[-1] > 0
    assert lines[-1].endswith(f"  replaced {counts[-1]}")
    assert f"; {counts[-1]} records replaced, unusable: unreadable image {counts[-1]}); model saved" in proc.stdout

    def too_many(*_, **__):
        raise pipeline.TooManyReplaced(5, 1200, {"unreadable image": 1000, "missing image": 8}, 0.1)

    monkeypatch.setattr(trainer, "fit", too_many)
    proc = dualenc_run(*TRAIN, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "stopped", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"dualenc train: error: {tmp_path / 'bad.jsonl'}: 1,008 of the 1,200 records drawn by step 5 (84%) could not "
        f"be used and were replaced by others, more than --max-replaced 0.1 allows; most often: unreadable image "
        f"(1,000): check the data, or raise --max-replaced")
    assert not (tmp_path / "stopped" / "config.json").exists()


def test_accumulated_run_killed_and_resumed_ends_where_the_whole_run_ends(workspace, tmp_path, monkeypatch):
    """--accum-steps 4 (with --precision, --weight-decay, --warmup, --grad-clip and AdamW's betas given): a run
    interrupted after step 2 and resumed ends with the params of the same run left alone; a resume with another
    --accum-steps is refused, naming the setting."""
    import numpy as np

    monkeypatch.chdir(workspace)
    rows = [json.loads(line) for line in (workspace / "data" / "pairs.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows[:4]):  # 16 distinct images: 4 micro-batches of 4, one row per device each
        copy = f"copy{i}_" + os.path.basename(row["image"])
        shutil.copy(os.path.join("data", row["image"]), os.path.join("data", copy))
        rows.append({**row, "image": copy})
    (workspace / "data" / "sixteen.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    scale = ["--accum-steps", 4, "--batch-size", 16, "--weight-decay", 0.05, "--warmup", 1, "--grad-clip", 0.5,
             "--beta1", 0.8, "--beta2", 0.95, "--eps", 1e-8, "--checkpoint-every", 2, "--log-every", 0]
    common_args = [a for a in TRAIN if a not in ("--batch-size", 4)] + ["--data", "data/sixteen.jsonl", "--steps", 4]
    whole = dualenc_run(*common_args, *scale, "--out", tmp_path / "whole")
    assert "4 micro-batches of 4 per step (exact gradient)" in whole.stderr
    assert "AdamW (betas 0.8, 0.95; eps 1e-08; weight decay 0.05; gradient clip 0.5)" in whole.stderr
    step = training.Progress.step
    monkeypatch.setattr(training.Progress, "step", ctrl_c_at(2))
    assert dualenc_run(*common_args, *scale, "--out", tmp_path / "cut", check=False).returncode == 130
    monkeypatch.setattr(training.Progress, "step", step)
    other = [a if a != 4 or i != 1 else 2 for i, a in enumerate(scale)]  # --accum-steps 2
    refused = dualenc_run(*common_args, *other, "--out", tmp_path / "cut", "--resume", check=False)
    assert refused.returncode != 0 and "accum_steps 4 there, 2 here" in refused.stderr
    dualenc_run(*common_args, *scale, "--out", tmp_path / "cut", "--resume")
    _, a = dualenc.load_pretrained(str(tmp_path / "whole"))
    _, b = dualenc.load_pretrained(str(tmp_path / "cut"))
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_mixed_sources_with_augmentation_on_a_2x2_mesh(workspace, tmp_path, monkeypatch):
    """--data A::B --data-weights 1::2 draws B twice as often (said in the summary), augmented images train, on
    a ("data", "model") mesh of 2 x 2 devices with FSDP, bfloat16 matmuls and layer-wise decay."""
    monkeypatch.chdir(workspace)
    proc = dualenc_run(*TRAIN, "--data", "data/pairs.jsonl::data/odd.jsonl", "--data-weights", "1::2", "--augment",
                       "--color-jitter", 0.4, 0.4, 0.4, 0.1, "--gray-scale-prob", 0.2, "--steps", 2,
                       "--model-parallel", 2, "--fsdp", "--precision", "bfloat16", "--layer-decay", 0.8,
                       "--lock", "none", "--log-every", 1, "--out", tmp_path / "mixed")
    assert "precision bfloat16; tensor parallel over 2 devices; FSDP; layer-wise learning-rate decay 0.8" \
        in proc.stderr
    assert "24 records of 2 sources, drawn 33.3% from data/pairs.jsonl (12 records x 1), 66.7% from " \
           "data/odd.jsonl (12 records x 2)" in proc.stderr
    assert "augmentation: crops of 0.9-1 of the area, colour jitter 0.4/0.4/0.4/0.1 at p 0.8, gray at p 0.2" \
        in proc.stderr
    assert steps_logged(tmp_path / "mixed") == [1, 2]


def test_lora_and_ema_runs_save_the_merged_model_the_adapters_and_the_average(workspace, tmp_path, monkeypatch):
    """--lora 2 trains adapters only (said with their count): the saved model is the starting one with the saved
    PEFT adapter merged in; --ema saves the moving average beside it; --lora refuses --lock/--cache."""
    import jax
    import numpy as np

    from dualenc import lora
    from dualenc.formats.peft import load_peft

    monkeypatch.chdir(workspace)
    start = tmp_path / "start"
    dualenc_run(*TRAIN, "--data", "data/pairs.jsonl", "--steps", 1, "--lr", 1e-9, "--out", start)
    whole = ["train", "--model", start, "--batch-size", 4, "--data", "data/pairs.jsonl"]
    out = tmp_path / "lora"
    proc = dualenc_run(*whole, "--lora", 2, "--lora-targets", "attention", "--ema", 0.5, "--steps", 3, "--out", out)
    assert "LoRA rank 2 (alpha 8) on the vision and text towers' attention kernels" in proc.stderr
    assert "moving average of the weights (decay 0.5)" in proc.stderr
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "ema" / "model.safetensors").is_file()
    config, base = dualenc.load_pretrained(str(start))
    adapters, found = load_peft(out / "adapter", base, config)
    assert found.rank == 2 and found.parts == lora.ATTENTION
    merged = lora.merge(base, adapters, found)
    _, tuned = dualenc.load_pretrained(str(out))
    _, average = dualenc.load_pretrained(str(out / "ema"))
    moved = 0
    for x, y, z, b in zip(*(jax.tree_util.tree_leaves(t) for t in (merged, tuned, average, base))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        moved += not np.array_equal(np.asarray(y), np.asarray(b))
        assert not np.array_equal(np.asarray(z), np.asarray(y)) or np.array_equal(np.asarray(y), np.asarray(b))
    assert moved == 4 * 2 * 2  # q, k, v, out of 2 layers in 2 towers; nothing else
    refused = dualenc_run(*whole, "--lora", 2, "--lock", "vision", "--out", tmp_path / "x", check=False)
    assert refused.returncode == 2 and "--lora trains adapters with every weight frozen: --lock" in refused.stderr
