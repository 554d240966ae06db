"""Fuzzing orbax training checkpoints (hypothesis, bounded, counted with test_fuzz's): a step folder whose
state.json or whose files are damaged restores the state that was saved, exactly, or ends in a one-line
CheckpointError naming the checkpoint; never a traceback, never other numbers."""

import json
import os
import shutil

import pytest
from hypothesis import given, settings, strategies as st
from test_fuzz import DOCUMENTED, FUZZ, JUNK, TRIED
from test_orbax_checkpoint import equal, make_state

from dualenc.train import checkpoint

STEP = "step_00000007"
META_KEYS = ["step", "steps", "data_step", "settings", "format", "holds_frozen", "checksums", "files"]
# A restore reads every array of a small state (orbax: about 0.1 s): fewer inputs in the suite than other kinds,
# as many as any kind in a campaign (which sets DUALENC_FUZZ_EXAMPLES).
ORBAX_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("DUALENC_FUZZ_EXAMPLES") or 40))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoints folder with step 7, the state saved there, its files relative to the step folder)."""
    directory = tmp_path_factory.mktemp("orbax-fuzz") / "checkpoints"
    state = make_state(seed=7, step=7)
    path = checkpoint.save_state(str(directory), state, {"data_step": 7})
    names = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files)
    return directory, state, names


def _restore(saved, tmp_path, damage):
    directory, state, _ = saved
    copy = tmp_path / "checkpoints"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(directory, copy)
    path = str(copy / STEP)
    damage(path)
    try:
        restored, meta = checkpoint.restore_state(path, make_state(seed=2, step=0))
    except DOCUMENTED as e:
        assert path in str(e) and "\n" not in str(e), str(e)
        return
    assert equal(restored, state), "a damaged checkpoint restored other numbers"
    assert meta["step"] == 7


@ORBAX_FUZZ
@given(key=st.sampled_from(META_KEYS + ["unknown"]), value=JUNK, drop=st.booleans())
def test_fuzzed_state_json(saved, tmp_path, key, value, drop):
    TRIED["orbax state.json"] += 1

    def damage(path):
        name = os.path.join(path, checkpoint.META_FILE)
        meta = json.load(open(name))
        if drop:
            meta.pop(key, None)
        else:
            meta[key] = value
        with open(name, "w") as f:
            json.dump(meta, f)

    _restore(saved, tmp_path, damage)


@ORBAX_FUZZ
@given(file=st.integers(0, 1000), at=st.floats(0, 1), how=st.sampled_from(["flip", "cut", "zero", "grow", "drop"]),
       data=st.binary(min_size=1, max_size=64))
def test_fuzzed_step_folder_files(saved, tmp_path, file, at, how, data):
    TRIED["orbax step folder"] += 1
    names = saved[2]

    def damage(path):
        name = os.path.join(path, names[file % len(names)])
        size = os.path.getsize(name)
        where = min(int(at * size), max(size - 1, 0))
        if how == "drop":
            os.unlink(name)
            return
        if how == "cut":
            os.truncate(name, where)
            return
        with open(name, "r+b") as f:
            if how == "grow":
                f.seek(0, os.SEEK_END)
                f.write(data)
                return
            f.seek(where)
            old = f.read(len(data))
            f.seek(where)
            f.write(bytes(b ^ d or 1 for b, d in zip(old, data)) if how == "flip" else bytes(len(old)))

    _restore(saved, tmp_path, damage)
