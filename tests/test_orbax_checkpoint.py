"""Training checkpoints with orbax: sharded round trips, other meshes, async commits, keep, the old format, and
two processes each writing their shards."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
from test_multihost import _free_port as free_port
from test_train import CONFIG

import dualenc
from dualenc import train
from dualenc.train import checkpoint
from dualenc.train.sharding import FSDP

HERE = os.path.dirname(os.path.abspath(__file__))


SPLIT_ALL = FSDP(min_shard_mb=0)  # FSDP without a size floor: the tiny model's leaves are split too


def make_state(mesh=None, fsdp=SPLIT_ALL, seed=1, step=7, config=CONFIG):
    """A train state with the vision tower locked and every trainable and optimizer leaf random (the same on
    every process for the same seed), sharded over `mesh` when given."""
    params = dualenc.init(jax.random.key(0), config)
    state = train.init_state(params, train.default_optimizer(1e-3, total_steps=10), locked=("vision",),
                             layer_loop=False)
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if x.dtype.kind == "f":
            return rng.standard_normal(x.shape).astype(x.dtype)
        return rng.integers(0, 1000, x.shape).astype(x.dtype)

    state = state._replace(step=np.int32(step), trainable=jax.tree_util.tree_map(fill, state.trainable),
                           opt_state=jax.tree_util.tree_map(fill, state.opt_state), rng=fill(state.rng))
    state = jax.tree_util.tree_map(np.asarray, state)
    return train.shard_state(state, mesh, fsdp) if mesh is not None else jax.tree_util.tree_map(jax.numpy.asarray,
                                                                                                  state)


def equal(a, b, skip_frozen=False):
    if skip_frozen:
        a, b = a._replace(frozen={}), b._replace(frozen={})
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) and np.asarray(x).dtype == np.asarray(y).dtype
               for x, y in zip(leaves_a, leaves_b))


def nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def disk_size(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4
    return train.data_mesh()


@pytest.fixture(scope="module")
def saved(mesh, tmp_path_factory):
    """An fsdp-sharded state on 4 devices, saved (orbax, frozen excluded), and the path."""
    state = make_state(mesh)
    assert state.trainable["text"]["embeddings"]["word"].sharding.spec != ()
    path = checkpoint.save_state(str(tmp_path_factory.mktemp("ckpt")), state, {"data_position": [0, 7]})
    return state, path


def test_round_trip_is_bit_identical_and_leaves_out_the_frozen_tower(mesh, saved, tmp_path):
    state, path = saved
    template = make_state(mesh, seed=2, step=0)
    restored, meta = checkpoint.restore_state(path, template)
    assert equal(restored, state)  # trainable, opt_state, step, rng: saved; frozen: the template's (the same)
    sums, sizes = meta.pop("checksums"), meta.pop("files")
    assert meta == {"data_position": [0, 7], "step": 7, "format": "orbax", "holds_frozen": False}
    assert set(sums) == {"/".join(p) for p in checkpoint.saved_leaves(path)}  # a checksum per array written
    assert sizes["_METADATA"] == os.path.getsize(os.path.join(path, "_METADATA")) and checkpoint.META_FILE not in sizes
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(template)):
        assert a.sharding == b.sharding
    assert checkpoint.checkpoints(os.path.dirname(path)) == [(7, path)]
    saved_names = checkpoint.saved_leaves(path)
    assert {p[0] for p in saved_names} == {"step", "trainable", "opt_state", "rng"}
    assert ("trainable", "text", "embeddings", "word") in saved_names and not os.path.exists(
        os.path.join(path, checkpoint.STATE_FILE))
    assert set(state.frozen) == {"vision"}
    # A vision tower big beside the rest: what the checkpoint holds is then smaller than what it leaves out.
    big = dataclasses.replace(CONFIG, vision=dualenc.ViTConfig(hidden_size=64, num_hidden_layers=6,
                                                               num_attention_heads=4, intermediate_size=256,
                                                               image_size=32, patch_size=8))
    state = make_state(mesh, config=big)
    without = checkpoint.save_state(str(tmp_path / "without"), state, {"data_position": [0, 7]})
    with_frozen = checkpoint.save_state(str(tmp_path / "with"), state, {"data_position": [0, 7]},
                                        exclude_frozen=False)
    assert {p[0] for p in checkpoint.saved_leaves(with_frozen)} == {"step", "trainable", "opt_state", "rng", "frozen"}
    frozen = nbytes(state.frozen)
    assert disk_size(without) < frozen < disk_size(with_frozen)
    assert equal(checkpoint.restore_state(with_frozen, make_state(mesh, seed=2, config=big))[0], state)


def test_restores_onto_other_meshes(saved):
    state, path = saved
    single = make_state(None, seed=3, step=0)
    restored, _ = checkpoint.restore_state(path, single)
    assert equal(restored, state) and restored.trainable["text"]["embeddings"]["word"].sharding.num_devices == 1
    two = train.data_mesh(jax.devices()[:2])
    template = make_state(two, fsdp=SPLIT_ALL, seed=3, step=0)
    restored, _ = checkpoint.restore_state(path, template)
    assert equal(restored, state)
    word = restored.trainable["text"]["embeddings"]["word"]
    assert word.sharding == template.trainable["text"]["embeddings"]["word"].sharding and word.sharding.num_devices == 2


def test_relative_paths_save_and_restore(saved, tmp_path, monkeypatch):
    """Paths relative to the working directory, as `dualenc train --out DIR` gives them, save and restore (orbax
    reads a relative path as no checkpoint: the restore failed with AttributeError on its None metadata)."""
    state, _ = saved
    monkeypatch.chdir(tmp_path)
    single = jax.tree_util.tree_map(np.asarray, state)
    checkpoint.save_state(os.path.join("run", "checkpoints"), single, {"data_position": [0, 7]})
    [(step, path)] = checkpoint.checkpoints(os.path.join("run", "checkpoints"))
    assert step == 7 and not os.path.isabs(path)
    assert ("trainable", "text", "embeddings", "word") in checkpoint.saved_leaves(path)
    restored, meta = checkpoint.restore_state(path, make_state(None, seed=3, step=0))
    assert equal(restored, state) and meta["step"] == 7


def test_async_save_counts_only_once_committed(mesh, tmp_path, monkeypatch):
    state = make_state(mesh, seed=4, step=3)
    expected = jax.tree_util.tree_map(np.asarray, state)
    hold, write = threading.Event(), checkpoint.files.write_json_atomic

    def held_write(path, data):
        assert hold.wait(60)
        write(path, data)

    monkeypatch.setattr(checkpoint.files, "write_json_atomic", held_write)
    path = checkpoint.save_state(str(tmp_path), state, {"data_position": [0, 3]}, wait=False)
    record = checkpoint.last_save()
    assert record.returned is not None and record.committed is None
    # The state's buffers may be donated at once (the train step does): the save holds its own host copy.
    bump = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s), donate_argnums=0)
    bumped = bump(state.trainable)
    assert checkpoint.checkpoints(str(tmp_path)) == [] and not os.path.exists(path)
    hold.set()
    assert checkpoint.wait_for_save() is record and record.committed is not None
    assert checkpoint.checkpoints(str(tmp_path)) == [(3, path)]
    print(f"\nsave blocked {record.blocked_s * 1e3:.1f} ms, committed after {record.committed_s * 1e3:.1f} ms")
    restored, _ = checkpoint.restore_state(path, make_state(mesh, seed=5, step=0))
    assert equal(restored, expected, skip_frozen=True)
    assert not equal(bumped, expected.trainable)


def test_keep_leftovers_and_resaving_a_step(mesh, tmp_path):
    directory = str(tmp_path)
    os.makedirs(os.path.join(directory, "step_00000009.partial.orbax-checkpoint-tmp"))  # a killed save's
    os.makedirs(os.path.join(directory, "step_00000008"))  # an orbax commit killed before state.json
    for step in (1, 2, 3, 4):
        checkpoint.save_state(directory, make_state(mesh, seed=step, step=step), {"data_position": [0, step]},
                              keep=2, wait=False)
    assert checkpoint.wait_for_save().step == 4
    assert [s for s, _ in checkpoint.checkpoints(directory)] == [3, 4]
    assert sorted(os.listdir(directory)) == ["step_00000003", "step_00000004"]
    again = make_state(mesh, seed=40, step=4)
    path = checkpoint.save_state(directory, again, {"data_position": [1, 0]}, keep=2)  # replaces step 4
    restored, meta = checkpoint.restore_state(path, make_state(mesh, seed=0, step=0))
    assert equal(restored, again) and meta["data_position"] == [1, 0]
    assert sorted(os.listdir(directory)) == ["step_00000003", "step_00000004"]
    assert checkpoint.latest_checkpoint(directory) == (4, path)
    assert checkpoint.latest_checkpoint(str(tmp_path / "none")) is None


def test_old_format_restores_without_orbax_and_strict_errors(mesh, saved, tmp_path, monkeypatch):
    state, orbax_path = saved
    old = checkpoint.save_state(str(tmp_path), state, {"data_position": [0, 7]}, format="safetensors")
    assert sorted(os.listdir(old)) == [checkpoint.META_FILE, checkpoint.STATE_FILE]
    tensors, _ = dualenc.files.read_safetensors(os.path.join(old, checkpoint.STATE_FILE))
    assert any(name.startswith(".frozen") for name in tensors)  # as written before orbax: every leaf
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # orbax not installed
    restored, meta = checkpoint.restore_state(old, make_state(mesh, seed=2, step=0))
    assert equal(restored, state) and "format" not in meta
    with pytest.raises(ImportError, match=r"dualenc\[checkpoint\]"):
        checkpoint.save_state(str(tmp_path / "new"), state, {"data_position": [0, 7]})
    monkeypatch.undo()
    template = make_state(mesh, seed=2, step=0)
    kernel = template.trainable["visual_projection"]["kernel"]
    wrong = template._replace(trainable={**template.trainable, "visual_projection": {"kernel": kernel[:, :8]}})
    with pytest.raises(dualenc.CheckpointError, match=r"step_00000007.*wrong shape.*visual_projection/kernel"):
        checkpoint.restore_state(orbax_path, wrong)
    params = dualenc.init(jax.random.key(0), CONFIG)
    per_layer = train.init_state(params, train.default_optimizer(1e-3, total_steps=10), locked=("vision",))
    with pytest.raises(dualenc.CheckpointError, match=r"missing.*trainable/text/encoder/0/.*unexpected"):
        checkpoint.restore_state(orbax_path, per_layer)
    with pytest.raises(dualenc.ConfigError, match="exclude_frozen"):
        checkpoint.save_state(str(tmp_path), state, {}, format="safetensors", exclude_frozen=True)


WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    sys.path.insert(0, sys.argv[4])
    from test_orbax_checkpoint import SPLIT_ALL, make_state
    from dualenc import train
    from dualenc.train import checkpoint
    assert jax.device_count() == 4 and jax.process_count() == 2
    state = make_state(train.data_mesh(), fsdp=SPLIT_ALL, seed=11, step=5)
    word = state.trainable["text"]["embeddings"]["word"]
    assert not word.is_fully_addressable and len(word.addressable_shards) == 2
    path = checkpoint.save_state(sys.argv[3], state, {"data_position": [0, 5]}, wait=False)
    checkpoint.wait_for_save()
    # As fit places a new state: jax arrays put on a mesh of one device per process (arrays jax 0.10 builds
    # oddly), replicated.
    firsts = [d for d in jax.devices() if d.id == min(e.id for e in jax.devices() if e.process_index == d.process_index)]
    state = jax.tree_util.tree_map(jax.numpy.asarray, make_state(seed=13, step=6))
    checkpoint.save_state(sys.argv[3], train.shard_state(state, train.data_mesh(firsts)), {"data_position": [0, 6]})
    # process 1 looks in an empty folder: it still gets process 0's answer
    mine = sys.argv[3] if jax.process_index() == 0 else sys.argv[3] + "-empty"
    step, _ = checkpoint.latest_checkpoint(mine)
    print("saved", path, "latest", step, flush=True)
""")


def test_two_processes_each_write_their_shards(mesh, tmp_path):
    address, directory = f"127.0.0.1:{free_port()}", str(tmp_path / "ckpt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), directory, HERE], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = []
    for p in procs:
        output, _ = p.communicate(timeout=180)
        outputs.append(output.decode())
        assert p.returncode == 0, output.decode()[-3000:]
    path = os.path.join(directory, "step_00000005")
    for output in outputs:
        assert f"saved {path} latest 6" in output, output[-2000:]
    assert [s for s, _ in checkpoint.checkpoints(directory)] == [5, 6]
    for process in (0, 1):
        shards = os.path.join(path, f"ocdbt.process_{process}", "d")
        assert os.listdir(shards) and disk_size(shards) > 0, process
    expected = make_state(mesh, seed=11, step=5)
    restored, meta = checkpoint.restore_state(path, make_state(mesh, seed=12, step=0))
    assert meta["step"] == 5 and equal(restored, expected)
    restored, _ = checkpoint.restore_state(os.path.join(directory, "step_00000006"), make_state(mesh, seed=12))
    assert equal(restored, make_state(mesh, seed=13, step=6))
