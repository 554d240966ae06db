"""Two jax.distributed processes (gloo, 2 CPU devices each) training from webdataset shards, with exact gradient
accumulation over 2 micro-batches (equal to one device's whole-batch steps): each decodes only
its rows, in grain worker processes (their shared memory all freed); orbax checkpoints with fsdp survive a
SIGKILLed process bit for bit (the other raises PeerLost within its peer_timeout) and restore on 1 process x 4
devices; the frozen tower is not in them."""

import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time

import jax
import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import data, train
from dualenc.train import loop as trainer
from dualenc.data import RecordSource, prepare
from dualenc.data.pipeline import GlobalOrder
from dualenc.train import checkpoint, peers

from test_pipeline import CONFIG as PIPELINE_CONFIG, SIZE  # noqa: E402  (the same tiny model)

# Without dropout, so that the accumulated steps (2 micro-batches) equal one-device whole-batch steps.
CONFIG = dataclasses.replace(PIPELINE_CONFIG, text=dataclasses.replace(
    PIPELINE_CONFIG.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
RECORDS, BATCH, STEPS = 96, 8, 15
RUN = trainer.TrainConfig(steps=STEPS, batch_size=BATCH, max_length=8, locked=("vision",), fsdp=True,
                          fsdp_min_shard_mb=0, checkpoint_every=5, keep=5,  # the tiny model sharded all the same
                          accum_steps=2)


class Counting:
    """A source that appends every record index it reads to a file (from grain's worker processes too)."""

    def __init__(self, source, log):
        self.source, self.log = source, log
        self.image_root, self.manifest = source.image_root, source.manifest

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return self.source[i]


def setup(folder):
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": SIZE, "width": SIZE}),
                                  dualenc.Tokenizer.from_pretrained(os.path.join(folder, "vocab"), max_length=8))
    return processor, dualenc.init(jax.random.key(0), CONFIG), RecordSource(os.path.join(folder, "prepared"))


WORKER = textwrap.dedent("""
    import os, sys
    # 2 devices a process; the test process's backend optimisation level kept (conftest), so that params compared
    # bit for bit across the processes were computed by programs compiled alike
    level = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level")]
    os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=2", *level])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, pid, folder, name, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    peer_timeout = float(sys.argv[7])
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
    sys.path.insert(0, sys.argv[6])
    import numpy as np
    from test_multihost import Counting, RUN, CONFIG, setup
    from dualenc import train
    from dualenc.train import loop as trainer
    processor, params, source = setup(folder)
    source = Counting(source, os.path.join(folder, f"{name}-decoded-{pid}"))
    def tick(step, metrics):
        open(os.path.join(folder, f"{name}-steps-{pid}"), "a").write(f"{step}\\n")
    try:
        params, _ = trainer.fit(CONFIG, params, source, processor, RUN, checkpoint_dir=os.path.join(folder, name),
                                mesh=train.data_mesh(), workers=workers, callback=tick, peer_timeout=peer_timeout)
    except trainer.PeerLost as e:
        print("PeerLost:", e, flush=True)
        raise
    import gc, grain.multiprocessing
    print("shared memory arrays alive:", sum(isinstance(x, grain.multiprocessing.SharedMemoryArray)
                                             for x in gc.get_objects()), flush=True)
    if pid == 0:
        np.savez(os.path.join(folder, name + ".npz"),
                 **{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)})
""")


def _png(value):
    out = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    words = [f"caption {i}" for i in range(10)]
    data.write_vocab(root / "vocab", words)
    tars = []
    for shard in range(3):
        tars.append(str(root / f"{shard:05d}.tar"))
        with tarfile.open(tars[-1], "w") as tar:
            for i in range(RECORDS // 3):
                for ext, payload in (("png", _png((37 * i + 80 * shard) % 256)), ("txt", words[i % 10].encode())):
                    info = tarfile.TarInfo(f"{shard}{i:03d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    prepare(tars, str(root / "prepared"))
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder, name, workers=0, peer_timeout=30):
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), str(folder), name, str(workers),
                              os.path.dirname(__file__), str(peer_timeout)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
            for i in range(2)]


def _finish(procs):
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output.decode()[-3000:]
        # grain's worker processes hand batches over in shared memory, all of it freed when fit returns
        assert b"shared memory arrays alive: 0\n" in output, output.decode()[-3000:]


def _steps(folder, name, pid):
    path = folder / f"{name}-steps-{pid}"
    return int(path.read_text().split()[-1]) if path.exists() else 0


def test_two_processes_decode_their_rows_and_survive_a_killed_peer(folder):
    _finish(_start(folder, "whole", workers=1))  # decoding in one grain worker process per host
    order = GlobalOrder(RECORDS, BATCH, RUN.seed)
    for pid in range(2):
        decoded = [int(x) for x in (folder / f"whole-decoded-{pid}").read_text().split()]
        assert len(decoded) == STEPS * BATCH // 2  # steps x global batch / 2 processes
        mine = [order.batch(k)[pid * BATCH // 2:(pid + 1) * BATCH // 2] for k in range(STEPS)]
        assert sorted(decoded) == sorted(np.concatenate(mine).tolist())
    whole = np.load(folder / "whole.npz")

    # One process, one device, the same data, whole batches (no accumulation): the same params to 1e-5.
    processor, params, source = setup(str(folder))
    alone, _ = trainer.fit(CONFIG, params, source, processor, dataclasses.replace(RUN, checkpoint_every=0,
                                                                                   accum_steps=1))
    for path, leaf in jax.tree_util.tree_leaves_with_path(alone):
        np.testing.assert_allclose(whole[jax.tree_util.keystr(path)], leaf, atol=1e-5, rtol=0)

    # Process 1 killed mid-run: within its peer_timeout process 0 raises PeerLost from the collective that failed
    # (or, waiting in a checkpoint's barrier, which Python cannot interrupt, its watch ends it with the same
    # message) and ends with exit status 3, not in JAX's shutdown (which waited for process 1, then aborted);
    # both restarted: bit-identical params.
    procs = _start(folder, "killed", peer_timeout=5)
    deadline = time.time() + 240
    while time.time() < deadline and not (_steps(folder, "killed", 1) >= 7 and
                                          trainer.checkpoints(str(folder / "killed"))):
        assert procs[1].poll() is None, procs[1].communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    output = procs[0].communicate(timeout=90)[0].decode()
    assert procs[0].returncode == peers.LOST_STATUS and time.monotonic() - killed < 60, output[-3000:]
    lost = [line for line in output.splitlines() if "process 0 lost a peer of the distributed run after step " in line]
    assert lost and "(process 1 sent no heartbeat for " in lost[0] and "last checkpoint: " in lost[0], output[-3000:]
    procs[1].wait(timeout=60)
    assert _steps(folder, "killed", 0) < STEPS
    _finish(_start(folder, "killed"))
    again = np.load(folder / "killed.npz")
    assert set(again) == set(whole)
    for key in whole:
        np.testing.assert_array_equal(again[key], whole[key])

    # Each process wrote its own shards; the frozen tower is not in the checkpoint; it restores on 1 x 4.
    step, path = trainer.checkpoints(str(folder / "whole"))[-1]
    assert step == STEPS
    shards = [d for d in os.listdir(path) if d.startswith("ocdbt.process_")]
    assert sorted(shards) == ["ocdbt.process_0", "ocdbt.process_1"]
    names = checkpoint.saved_leaves(path)
    assert not any("frozen" in n for n in names) and any("trainable" in n for n in names)
    mesh = train.data_mesh()
    assert mesh.size == 4 and jax.process_count() == 1
    optimizer = train.default_optimizer(RUN.learning_rate, total_steps=STEPS)
    template = train.shard_state(train.init_state(params, optimizer, locked=RUN.locked), mesh,
                                 fsdp=train.sharding.FSDP(min_shard_mb=RUN.fsdp_min_shard_mb))
    state, meta = trainer.restore_state(path, template)
    assert meta["step"] == STEPS and int(state.step) == STEPS
    for p, leaf in jax.tree_util.tree_leaves_with_path(train.full_params(state)):
        np.testing.assert_array_equal(np.asarray(leaf), whole[jax.tree_util.keystr(p)])
