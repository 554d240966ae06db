"""Faults: kills during saves, a full disk, a read-only target, a lost worker, and bit-identical reruns."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import dualenc
from dualenc.train import loop as trainer

HERE = os.path.dirname(os.path.abspath(__file__))

SAVER = textwrap.dedent("""
    import os, sys, jax, numpy as np, dualenc
    from dualenc import train
    from dualenc.train import loop as trainer
    from dualenc.config import *
    config = DualEncoderConfig(
        vision=ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=8),
        text=BertConfig(vocab_size=20000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64), projection_dim=16)
    params = dualenc.init(jax.random.key(0), config)
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    state = train.init_state(params, optimizer)
    model_dir, ckpt_dir, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    while True:
        step += 1
        params["logit_scale"] = np.float32(step)
        dualenc.save_pretrained(model_dir, config, params)
        state = state._replace(step=np.int32(step))
        trainer.save_state(ckpt_dir, state, {"data_position": [0, step], "settings": {}}, keep=2)
        print("saved", flush=True)
""")


def test_kills_during_saves_leave_complete_checkpoints(tmp_path):
    model_dir, ckpt_dir = tmp_path / "model", tmp_path / "ckpt"
    rng = np.random.default_rng(0)
    template = None
    steps_seen, scales_seen = set(), set()
    for run in range(5):
        # Each run counts its steps from 1000 * run, so its checkpoints are the newest; it is killed at a random
        # moment after 1-4 completed saves, somewhere in the next model or training-state save.
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(model_dir), str(ckpt_dir), str(1000 * run)],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        for _ in range(rng.integers(1, 5)):
            assert proc.stdout.readline().strip() == b"saved"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if model_dir.exists():
            _, params = dualenc.load_pretrained(model_dir)
            scales_seen.add(float(params["logit_scale"]))
        saved = trainer.checkpoints(str(ckpt_dir))
        if saved:
            if template is None:
                import jax

                config, params = dualenc.load_pretrained(model_dir)
                optimizer = dualenc.train.default_optimizer(1e-3, total_steps=10)
                template = dualenc.train.init_state(params, optimizer)
                del jax
            state, meta = trainer.restore_state(saved[-1][1], template)
            assert int(state.step) == meta["step"] == saved[-1][0] == meta["data_position"][1]
            steps_seen.add(saved[-1][0])
    assert len(scales_seen) >= 3 and len(steps_seen) >= 3  # the kills landed at many different points
    dualenc.save_pretrained(model_dir, *dualenc.load_pretrained(model_dir))
    trainer.save_state(str(ckpt_dir), template, {"data_position": [0, 0], "settings": {}}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model"]  # the killed saves' temp dirs are cleaned up
    assert all(name.startswith("step_") for name in os.listdir(ckpt_dir))


LIMITED = textwrap.dedent("""
    import os, resource, signal, sys, jax, numpy as np, dualenc
    from dualenc import train
    from dualenc.train import loop as trainer
    config, params = dualenc.load_pretrained(sys.argv[1])
    params["logit_scale"] = np.float32(99.0)
    state = train.init_state(params, train.default_optimizer(1e-3, total_steps=10))
    import safetensors.numpy  # noqa: F401  (imported before dropping privileges: root's site-packages)
    import orbax.checkpoint  # noqa: F401
    if sys.argv[3] == "full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    elif os.geteuid() == 0:
        os.setgid(65534); os.setuid(65534)  # nobody: the target belongs to root and is not writable
    try:
        if sys.argv[4] == "model":
            dualenc.save_pretrained(sys.argv[1], config, params)
        else:
            trainer.save_state(sys.argv[2], state, {"data_position": [0, 0]})
    except OSError as e:
        print("OSError:", e)
        sys.exit(3)
""")


@pytest.mark.parametrize("fault", ["full", "read-only"])
@pytest.mark.parametrize("what", ["model", "training"])
def test_full_disk_or_read_only_target(tmp_path, fault, what):
    import pathlib
    import shutil
    import tempfile

    import jax

    # A folder others may enter (pytest's are private), made read-only to the saving process: as root the child
    # drops to user nobody, otherwise the folder's write bit is removed.
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="dualenc-faults-"))
    model_dir, ckpt_dir = tmp_path / "model", tmp_path / "ckpt"
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                                 image_size=16, patch_size=8),
        text=dualenc.BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=32), projection_dim=8)
    params = dualenc.init(jax.random.key(0), config)
    dualenc.save_pretrained(model_dir, config, params)
    optimizer = dualenc.train.default_optimizer(1e-3, total_steps=10)
    trainer.save_state(str(ckpt_dir), dualenc.train.init_state(params, optimizer), {"data_position": [0, 0]})
    before = sorted(os.listdir(tmp_path)), (model_dir / "model.safetensors").read_bytes()
    for folder in (tmp_path, model_dir, ckpt_dir):
        os.chmod(folder, 0o755 if fault == "full" or os.geteuid() == 0 else 0o555)
    try:
        done = subprocess.run([sys.executable, "-c", LIMITED, str(model_dir), str(ckpt_dir), fault, what],
                              capture_output=True, text=True, timeout=120)
    finally:
        for folder in (tmp_path, model_dir, ckpt_dir):
            os.chmod(folder, 0o755)
    assert done.returncode == 3, done.stdout + done.stderr[-2000:]
    message = done.stdout
    assert ("model" if what == "model" else "ckpt") in message and "Traceback" not in message, message
    assert (sorted(os.listdir(tmp_path)), (model_dir / "model.safetensors").read_bytes()) == before
    assert float(dualenc.load_pretrained(model_dir)[1]["logit_scale"]) == pytest.approx(2.6592)
    assert [s for s, _ in trainer.checkpoints(str(ckpt_dir))] == [0]
    shutil.rmtree(tmp_path)


def test_a_lost_worker_stops_the_run_clearly_and_it_resumes(tmp_path):
    import shutil as sh
    import socket

    from conftest import make_workspace

    ws = make_workspace(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}

    def start(pid, *extra):
        return subprocess.Popen(
            [sh.which("dualenc"), "train", "--vision", ws / "vision", "--text", ws / "text", "--data",
             ws / "data" / "pairs.jsonl", "--out", ws / "out", "--steps", "40", "--batch-size", "6",
             "--checkpoint-every", "5", "--projection-dim", "8", "--quiet", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "3", "--process-id", str(pid), "--heartbeat-timeout", "5", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(0), start(1), start(2)]
    folder = ws / "out" / "checkpoints"
    deadline = time.time() + 150
    # Kill while the second checkpoint is being written: the others then wait in orbax's commit barrier, not in a
    # collective, and only the heartbeats can tell them that a peer is gone. Process 0 finds it; process 2 learns
    # it from process 0 before process 0's exit takes the coordination service down.
    while time.time() < deadline and len(os.listdir(folder) if folder.is_dir() else ()) < 2:
        time.sleep(0.05)
    assert trainer.checkpoints(str(folder)), "no checkpoint written"
    procs[1].send_signal(signal.SIGKILL)
    for pid in (0, 2):
        _, err = procs[pid].communicate(timeout=90)
        python_lines = [line for line in err.splitlines()
                        if not line.lstrip().startswith(("@", "E1", "W1", "F1", "I1"))]
        assert procs[pid].returncode == 3, "\n".join(python_lines)[-4000:]  # what Python printed, not native logs
        message = [line for line in err.splitlines() if line.startswith("dualenc train: error:")]
        assert len(message) == 1 and f"process {pid} lost a peer" in message[0], err[-3000:]
        assert "--resume" in message[0] and "last checkpoint" in message[0] and "Traceback" not in err
    procs[1].wait()
    last = trainer.checkpoints(str(ws / "out" / "checkpoints"))[-1][0]
    assert 5 <= last < 40
    # Restarting all with --resume finishes the run bit for bit: tests/test_multihost.py (through fit).
