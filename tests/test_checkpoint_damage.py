"""Damaged training checkpoints (issue 22, point 7): every damage is a one-line CheckpointError naming the
checkpoint, its step, what is wrong and the earlier checkpoint to resume from; flipped bytes no longer restore
silently (checksums), a state holding NaN is neither saved nor restored, and the old format still restores."""

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
from test_orbax_checkpoint import equal, make_state

import dualenc
from dualenc.train import checkpoint

STEP7 = "step_00000007"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Checkpoints of steps 5 and 7 (one device, orbax), as a run leaves them."""
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    for step in (5, 7):
        checkpoint.save_state(str(directory), make_state(seed=step, step=step), {"data_step": step})
    return directory


def data_files(path):
    return sorted(glob.glob(os.path.join(path, "ocdbt.process_*", "d", "*")))


def cut(path):
    biggest = max(data_files(path), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)


def flip_a_byte_in_each_data_file(path):  # the attack that restored silently and trained into NaN
    for name in data_files(path):
        blob = bytearray(open(name, "rb").read())
        blob[len(blob) // 2] ^= 0x01
        open(name, "wb").write(bytes(blob))


def another_runs_data(path):
    """The arrays of another state of the same shapes, its file sizes written into state.json: every file there
    at the size recorded, all of it readable."""
    other = os.path.join(os.path.dirname(os.path.dirname(path)), "other")
    checkpoint.save_state(other, make_state(seed=70, step=7), {"data_step": 7})
    sizes = json.load(open(os.path.join(other, STEP7, checkpoint.META_FILE)))["files"]
    for name in os.listdir(path):
        if name != checkpoint.META_FILE:
            full = os.path.join(path, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
    for name in os.listdir(os.path.join(other, STEP7)):
        if name != checkpoint.META_FILE:
            shutil.move(os.path.join(other, STEP7, name), path)
    edit_meta(files=sizes)(path)
    shutil.rmtree(other)


def keep_only_state_json(path):
    for name in os.listdir(path):
        if name != checkpoint.META_FILE:
            full = os.path.join(path, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)


def edit_meta(**changes):
    def edit(path):
        name = os.path.join(path, checkpoint.META_FILE)
        meta = json.load(open(name))
        for key, value in changes.items():
            meta[key] = value(meta[key]) if callable(value) else value
        json.dump(meta, open(name, "w"))
    return edit


def other_checksum(sums):
    name = sorted(sums)[3]
    return {**sums, name: f"{int(sums[name], 16) ^ 1:016x}"}


ATTACKS = {
    "data file cut short": (cut, r"files changed size: ocdbt.process_0/d/\w+ is [\d,]+ bytes, [\d,]+ written"),
    "data file missing": (lambda p: os.unlink(max(data_files(p), key=os.path.getsize)),
                          r"files missing: ocdbt.process_0/d/\w+"),
    # Where a flip lands in compressed data, the data decompresses to other numbers or not at all.
    "a byte flipped in each data file": (flip_a_byte_in_each_data_file,
                                         r"\d+ of its 81 arrays differ from what was saved \(their checksums\), e\.g\. "
                                         r"|orbax cannot read it: "),
    "the data of another run": (another_runs_data, r"\d+ of its 81 arrays differ from what was saved \(their "
                                                   r"checksums\), e\.g\. "),
    "metadata missing": (lambda p: os.unlink(os.path.join(p, "_METADATA")), r"files missing: _METADATA"),
    "metadata cut short": (lambda p: os.truncate(os.path.join(p, "_METADATA"), 100),
                           r"files changed size: _METADATA is 100 bytes"),
    "only state.json": (keep_only_state_json, r"files missing: _CHECKPOINT_METADATA and \d+ more of its \d+"),
    "state.json not JSON": (lambda p: open(os.path.join(p, checkpoint.META_FILE), "w").write('{"step": 7,'),
                            r"its state.json is not valid JSON: Expecting"),
    "step of another type": (edit_meta(step="seven"), r'in its state.json, "step" must be an integer of at least 0, '
                                                      r"got 'seven'"),
    "step of another folder": (edit_meta(step=9), r'"step" is 9, in the folder of step 7'),
    "settings not an object": (edit_meta(settings=[1]), r'"settings" must be an object, got \[1\]'),
    "format a list": (edit_meta(format=["orbax"]), r"\"format\" must be one of \('orbax', 'safetensors'\)"),
    "a file outside the folder": (edit_meta(files={"../../secret": 3}), r'"files" must map relative paths inside'),
    "checksums of another kind": (edit_meta(checksums=[1, 2]), r'"checksums" must map names to 16 hex digits'),
    "a checksum changed": (edit_meta(checksums=other_checksum), r"1 of its 81 arrays differ from what was saved"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_damaged_checkpoint_names_its_step_the_damage_and_the_one_to_resume_from(folder, tmp_path, attack):
    damage, what = ATTACKS[attack]
    directory = tmp_path / "checkpoints"
    shutil.copytree(folder, directory)
    path = str(directory / STEP7)
    damage(path)
    with pytest.raises(dualenc.CheckpointError) as caught:
        checkpoint.restore_state(path, make_state(seed=2, step=0))
    message = str(caught.value)
    assert "\n" not in message and len(message.replace(str(directory), "")) < 600, message
    assert message.startswith(f"the training checkpoint {path} (step 7) is damaged: "), message
    assert re.search(what, message), message
    assert message.endswith(f"the newest checkpoint before it that passes these checks is step 5 "
                            f"({directory / 'step_00000005'}): move {path} out of {directory} (or delete it) to "
                            f"resume from step 5"), message
    shutil.rmtree(path)  # as the message says: step 5 then restores
    restored, meta = checkpoint.restore_state(checkpoint.latest_checkpoint(str(directory))[1], make_state(seed=2))
    assert meta["step"] == 5 and equal(restored, make_state(seed=5, step=5))


def test_when_no_earlier_checkpoint_passes_the_error_says_so(folder, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(folder, directory)
    os.unlink(directory / "step_00000005" / "_METADATA")
    cut(str(directory / STEP7))
    with pytest.raises(dualenc.CheckpointError, match=rf"\(step 7\) is damaged: files changed size: .*; no earlier "
                                                      rf"checkpoint in {directory} passes these checks: start the run "
                                                      rf"again \(after moving {directory} aside\)$"):
        checkpoint.restore_state(str(directory / STEP7), make_state(seed=2))
    with pytest.raises(dualenc.CheckpointError, match=r"step_00000007 \(step 7\) is damaged: in its state.json"):
        edit_meta(steps=3)(str(directory / STEP7))  # fewer total steps than the checkpoint's own
        checkpoint.checkpoint_meta(str(directory / STEP7))  # what `train --resume` reads first


def test_a_state_holding_nan_is_not_saved_and_an_old_checkpoint_holding_nan_is_not_restored(tmp_path):
    state = make_state(seed=3, step=4)
    kernel = np.asarray(state.trainable["visual_projection"]["kernel"]).copy()
    kernel[0, 0] = np.nan
    bad = state._replace(trainable={**state.trainable, "visual_projection": {"kernel": kernel}})
    for format in checkpoint.FORMATS:
        with pytest.raises(dualenc.CheckpointError, match=r"not saving the training checkpoint .*step_00000004: 1 "
                                                          r"arrays of the state hold NaN or inf, e\.g\. "
                                                          r"trainable/visual_projection/kernel"):
            checkpoint.save_state(str(tmp_path / format), bad, {}, format=format)
        assert checkpoint.checkpoints(str(tmp_path / format)) == []
    # The safetensors format as written before checksums: still restores, and one holding NaN does not.
    old = checkpoint.save_state(str(tmp_path / "old"), state, {"data_step": 4}, format="safetensors")
    edit_meta(checksums={}, files={})(old)
    restored, _ = checkpoint.restore_state(old, make_state(seed=1, step=0))
    assert equal(restored, state)
    arrays = checkpoint.safetensors_state.arrays(bad)
    dualenc.files.write_safetensors(os.path.join(old, checkpoint.STATE_FILE), arrays)
    with pytest.raises(dualenc.CheckpointError, match=r"\(step 4\) is damaged: 1 of its arrays hold NaN or inf, "
                                                      r"e\.g\. trainable/visual_projection/kernel"):
        checkpoint.restore_state(old, make_state(seed=1, step=0))


def test_a_checksum_sees_any_one_change():
    """Any one element changed, by the smallest step or in its sign, changes the checksum. (That it does not
    depend on the sharding, test_orbax_checkpoint's restores onto other meshes and processes check: each restore
    compares the checksums recorded at save.)"""
    from dualenc.train import integrity

    word = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    seen = {integrity.checksums([("word", word)])[0]["word"]}
    for change in (lambda x: np.nextafter(x, np.float32(np.inf)), np.negative):
        changed = word.copy()
        changed[3, 5] = change(changed[3, 5])
        seen.add(integrity.checksums([("word", changed)])[0]["word"])
    swapped = word.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere
    seen.add(integrity.checksums([("word", swapped)])[0]["word"])
    assert len(seen) == 4
