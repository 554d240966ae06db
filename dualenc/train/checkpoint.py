"""Training checkpoints: orbax-checkpoint PyTrees written by every host asynchronously, and the older
safetensors format, still read (and written on request).

A training checkpoint is a directory `step_NNNNNNNN` holding `state.json` (step, the run's total steps, data
position, settings, "format") and the train state:

- "orbax" (the default): an orbax-checkpoint PyTree (OCDBT) of the state without its frozen params, as a
  nested dict {"step", "trainable", "opt_state", "rng"} (named like the TrainState's fields and keys; sequence
  indices as strings). Every process writes the shards of the arrays it holds (no gather); the frozen (locked)
  params are not written, restore takes them from its template (the model training started from). Restore
  reads into the template's shardings, whatever mesh or process count wrote the checkpoint.
- "safetensors" (written before orbax): `state.safetensors`, one tensor per state leaf, frozen params included,
  named by its pytree path; gathered to process 0, which writes it synchronously.

state.json also records a checksum of every array written ("checksums", see dualenc.train.integrity: the same
whatever the sharding) and the size of every file ("files"). A save refuses a state holding NaN or inf. A
restore checks state.json's keys, that every file is there at its size, reads the arrays and compares their
checksums and finiteness: any damage is a CheckpointError naming the checkpoint, its step, what is wrong, and
the newest earlier checkpoint that passes the same checks (to resume from, once the damaged one is moved out of
the folder). Checkpoints written before checksums were recorded are checked for finiteness only.

A checkpoint counts (in `checkpoints`) once its `state.json` exists. An orbax save writes
`step_NNNNNNNN.partial` (orbax itself writes `….partial.orbax-checkpoint-tmp` and renames it when every process
has written its shards); process 0 then writes `state.json` into it and renames it `step_NNNNNNNN` (swapping
it atomically with an older checkpoint of the same step). A save killed at any point leaves the checkpoints
that counted before; its leftovers are removed by the next save. Checkpoints beyond `keep` lose their
`state.json` first, then the rest.

Asynchronous saves: `save_state(..., wait=False)` returns once the state's arrays are copied to host memory;
writing, the commit and state.json follow in a background thread. Training is blocked by a save for the time
`save_state` takes to return: waiting for the previous save to commit (if it has not), a barrier across
processes, the checksums, the device-to-host copy and creating directories (`SaveRecord.blocked_s`). The next save, a restore
and `wait_for_save` wait for it; errors of the background write are raised there.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np

from dualenc import files
from dualenc.errors import CheckpointError, ConfigError
from dualenc.params import check_tree
from dualenc.train import integrity, orbax_errors, safetensors_state
from dualenc.train.sharding import host_array
from dualenc.train.state import TrainState

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE, META_FILE = safetensors_state.FILE, integrity.META_FILE
FORMATS = ("orbax", "safetensors")
_LEFTOVER = re.compile(r"^step_\d{8}\.")  # step_NNNNNNNN.partial and orbax's temporary directories
_PARTIAL = ".partial"
_BARRIER_TIMEOUT_S = 600


@dataclasses.dataclass
class SaveRecord:
    """When a save_state call started, returned and committed (time.perf_counter() seconds).

    blocked_s is what the save cost the training loop; committed_s the time until the checkpoint counted.
    """

    path: str
    step: int
    started: float
    waited_s: float = 0.0  # of blocked_s, waiting for the previous save to commit
    returned: float | None = None
    committed: float | None = None
    error: BaseException | None = dataclasses.field(default=None, repr=False)
    _thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def blocked_s(self) -> float | None:
        return None if self.returned is None else self.returned - self.started

    @property
    def committed_s(self) -> float | None:
        return None if self.committed is None else self.committed - self.started


_lock = threading.Lock()
_pending: SaveRecord | None = None  # the save whose background commit nobody has waited for yet
_last: SaveRecord | None = None
_saves = 0  # save_state calls in this process (the same count on every process): unique barrier names
_checkpointer = None


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError('orbax training checkpoints need orbax-checkpoint: '
                          'pip install "dualenc[checkpoint]"') from e
    return ocp


def _names(tree) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of every leaf, the path's parts as strings: field names, dict keys, sequence indices."""
    def part(key):
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return [(tuple(part(k) for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _nest(items) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _lookup(tree: dict, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _step_of(state: TrainState) -> int:
    step = state.step
    if isinstance(step, jax.Array) and step.is_fully_replicated:
        return int(np.asarray(step.addressable_data(0)))
    return int(host_array(step))


def checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete training checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(directory, name, META_FILE)):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint, or None: process 0's answer, on every process.

    Under jax.distributed every process must call it (a collective); a host that lists the directory late or
    differently still resumes from the step process 0 found.
    """
    found = checkpoints(directory)
    if jax.process_count() == 1:
        return found[-1] if found else None
    from jax.experimental import multihost_utils

    step = int(multihost_utils.broadcast_one_to_all(np.int32(found[-1][0] if found else -1)))
    return None if step < 0 else (step, os.path.join(directory, f"step_{step:08d}"))


def checkpoint_meta(path: str) -> dict:
    """A training checkpoint's state.json, its keys checked: its step, the run's total steps ("steps", absent in
    checkpoints of earlier versions), data position, settings, format ("orbax"; absent: "safetensors"), for orbax
    holds_frozen (whether the frozen params were written), checksums and files (absent in earlier versions).

    Raises:
      CheckpointError: state.json cannot be read, or a key has the wrong type (see damaged).
    """
    meta, problem = integrity.meta_of(path, _step_in(path), FORMATS)
    if problem is not None:
        raise damaged(path, problem)
    return meta


def _step_in(path: str) -> int | None:
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def damaged(path: str, problem: str) -> CheckpointError:
    """The error for a damaged checkpoint: it, its step and what is wrong, and the newest earlier checkpoint in
    its folder that passes the checks made before reading arrays (state.json, its files), to resume from."""
    step, directory = _step_in(path), os.path.dirname(os.path.normpath(path)) or "."
    earlier = [(s, p) for s, p in checkpoints(directory) if step is not None and s < step]
    return integrity.damaged(path, step, problem, earlier, FORMATS)


def last_save() -> SaveRecord | None:
    """The record of this process's latest save_state call (committed is None while it is being written)."""
    return _last


def wait_for_save() -> SaveRecord | None:
    """Blocks until this process's pending save is committed (on every process, with state.json written) and
    returns its record, or None when none was pending. Raises the background write's error, once."""
    global _pending
    with _lock:
        record, _pending = _pending, None
    if record is None:
        return None
    if record._thread is not None:
        record._thread.join()
    if record.error is not None:
        error, record.error = record.error, None
        raise error
    return record


@atexit.register
def _unwaited():
    record = _pending
    if record is not None and record._thread is not None:
        record._thread.join()
        if record.error is not None:
            raise record.error


def _remove(path: str):
    """Removes a checkpoint so that it stops counting first (state.json), then its files."""
    try:
        os.unlink(os.path.join(path, META_FILE))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _prune(directory: str, keep: int):
    for _, old in checkpoints(directory)[:-keep] if keep > 0 else []:
        _remove(old)


def _clean(directory: str, path: str):
    """Process 0, before a save (none in flight): what killed saves and removals left behind."""
    files.clean_stale(path)
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if _LEFTOVER.match(name) or (STEP_DIR.match(name) and not os.path.isfile(os.path.join(full, META_FILE))):
            shutil.rmtree(full, ignore_errors=True)


def _publish(staged: str, path: str):
    """Renames a finished checkpoint into place, swapping it with an older copy of the same step."""
    if os.path.isdir(path):
        if not files.exchange(staged, path):
            raise OSError(f"cannot replace {path} atomically: this filesystem does not support swapping "
                          f"directories")
        _remove(staged)
    else:
        os.rename(staged, path)
    files.fsync(os.path.dirname(os.path.abspath(path)))


def save_state(directory: str, state: TrainState, meta: dict, keep: int = 3, *, format: str = "orbax",
               wait: bool = True, exclude_frozen: bool | None = None) -> str:
    """Writes the training checkpoint of `state` into `directory`/step_NNNNNNNN and returns its path.

    Every process must call it, with the same arguments. After the checkpoint is committed, process 0 removes
    all but the newest `keep` (keep <= 0 keeps all). A save first waits for the previous one.

    Args:
      meta: what state.json holds besides the step and format (data position, settings, steps).
      format: "orbax" (each process writes its shards) or "safetensors" (the earlier format: gathered to
        process 0, written synchronously, every leaf included).
      wait: False returns once the arrays are copied to host memory; the write goes on in the background
        (see wait_for_save, last_save). Safetensors saves always complete before returning.
      exclude_frozen: leave the frozen params out (default for orbax; the safetensors format holds them all).

    Raises:
      ImportError: format "orbax" without orbax-checkpoint installed.
      OSError: the checkpoint could not be written (with wait; else from wait_for_save or the next save).
    """
    global _pending, _last, _saves
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if exclude_frozen is None:
        exclude_frozen = format == "orbax"
    if exclude_frozen and format == "safetensors":
        raise ConfigError("the safetensors format holds every leaf of the state: exclude_frozen needs orbax")
    ocp = _orbax() if format == "orbax" else None
    if ocp is not None:
        directory = _absolute(directory)
    started = time.perf_counter()
    previous = wait_for_save()
    waited = time.perf_counter() - started if previous is not None else 0.0
    _saves += 1
    step = _step_of(state)
    path = os.path.join(directory, f"step_{step:08d}")
    record = SaveRecord(path, step, started, waited_s=waited)
    _last = record
    tree = _rebuilt(state._replace(frozen={}) if exclude_frozen else state)
    meta = {**meta, "step": step, "checksums": _checksums(tree, path)}
    if format == "safetensors":
        _save_safetensors(directory, path, tree, meta, keep)
        record.returned = record.committed = time.perf_counter()
        return path
    item = _nest((p, leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)) for p, leaf in _names(tree))
    meta = {**meta, "format": "orbax", "holds_frozen": not exclude_frozen}
    if jax.process_index() == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            _clean(directory, path)
            # Orbax creates its folder here; when it cannot, its waiting threads outlive the error for minutes.
            os.mkdir(path + _PARTIAL)
            os.rmdir(path + _PARTIAL)
        except OSError as e:
            raise type(e)(e.errno, f"cannot save the training checkpoint {path}: {e.strerror or e}") from None
    try:
        _async_checkpointer(ocp).save(path + _PARTIAL, args=ocp.args.PyTreeSave(item), force=True)
    except OSError as e:
        raise _save_error(path, e) from e
    record.returned = time.perf_counter()
    record._thread = threading.Thread(target=_commit, args=(record, meta, directory, keep, _saves),
                                      name="dualenc-checkpoint-commit")
    with _lock:
        _pending = record
    record._thread.start()
    if wait:
        wait_for_save()
    return path


def _checksums(tree, path: str) -> dict[str, str]:
    """The checksums of a state about to be saved; a state holding NaN or inf is refused (it would not restore)."""
    sums, bad = integrity.checksums([("/".join(p), leaf) for p, leaf in _names(tree)])
    if bad:
        raise CheckpointError(f"not saving the training checkpoint {path}: {len(bad)} arrays of the state hold NaN "
                              f"or inf, e.g. {', '.join(bad[:3])}")
    return sums


def _absolute(path: str) -> str:
    """Every path handed to orbax: it reads a relative one as no checkpoint at all (its metadata is None)."""
    return os.path.abspath(os.fspath(path))


def _save_error(path: str, e: Exception) -> OSError:
    message = f"saving the training checkpoint {path} failed: {e}"
    return OSError(e.errno, message) if getattr(e, "errno", None) is not None else OSError(message)


def _rebuilt(tree):
    """The tree with its malformed arrays rebuilt by an identity jit: with one device per process, jax.device_put
    of a single-device array onto a sharding across processes gives an array whose addressable_shards raise
    (jax 0.10), which orbax reads."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def malformed(leaf):
        try:
            leaf.addressable_shards
        except ValueError:
            return True
        return False

    bad = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array) and malformed(leaf)]
    if bad:
        fixed = jax.jit(lambda xs: xs, out_shardings=[leaves[i].sharding for i in bad])([leaves[i] for i in bad])
        for i, leaf in zip(bad, fixed):
            leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _async_checkpointer(ocp):
    global _checkpointer
    if _checkpointer is None:
        _checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
    return _checkpointer


def _commit(record: SaveRecord, meta: dict, directory: str, keep: int, serial: int):
    """Background: waits for orbax's commit, then process 0 writes state.json and prunes; all processes meet."""
    try:
        try:
            _checkpointer.wait_until_finished()
            if jax.process_index() == 0:
                meta = {**meta, "files": integrity.file_sizes(record.path + _PARTIAL, skip=(META_FILE,))}
                files.write_json_atomic(os.path.join(record.path + _PARTIAL, META_FILE), meta)
                _publish(record.path + _PARTIAL, record.path)
                _prune(directory, keep)
        finally:
            if jax.process_count() > 1:
                import orbax.checkpoint as ocp

                ocp.multihost.get_barrier_sync_fn()(key=f"dualenc_checkpoint_{serial}_{record.step}",
                                                    timeout_ms=_BARRIER_TIMEOUT_S * 1000)
    except TimeoutError as e:  # a barrier: a process was lost or stalled
        record.error = e
    except (OSError, ValueError) as e:  # tensorstore reports a failed write as ValueError
        record.error = _save_error(record.path, e)
        record.error.__cause__ = e
    except BaseException as e:  # noqa: BLE001  (raised by wait_for_save)
        record.error = e
    record.committed = time.perf_counter()


def _save_safetensors(directory: str, path: str, state: TrainState, meta: dict, keep: int):
    arrays = safetensors_state.arrays(state)
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    with files.atomic_directory(path) as tmp:
        files.write_safetensors(os.path.join(tmp, STATE_FILE), arrays)
        meta = {**meta, "files": integrity.file_sizes(tmp, skip=(META_FILE,))}
        files.write_json_atomic(os.path.join(tmp, META_FILE), meta)
    _prune(directory, keep)


def restore_state(path: str, template: TrainState) -> tuple[TrainState, dict]:
    """Loads a training checkpoint (either format) into the structure, dtypes and shardings of `template`,
    strictly; frozen params the checkpoint does not hold are the template's. Returns (state, meta).

    Raises:
      CheckpointError: leaves missing, unexpected or of another shape or dtype (named); or a damaged checkpoint
        (see damaged): state.json, a file missing or of another size, arrays that cannot be read, whose
        checksums differ from those recorded at save, or that hold NaN or inf.
    """
    wait_for_save()
    meta = checkpoint_meta(path)
    problem = integrity.missing_or_resized(path, meta.get("files", {}))
    if problem is not None:
        raise damaged(path, problem)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        state = safetensors_state.read(os.path.join(path, STATE_FILE), template)
    elif meta.get("format") != "orbax":
        raise damaged(path, f"it holds neither {STATE_FILE} nor an orbax checkpoint (format "
                            f"{meta.get('format')!r} in {META_FILE})")
    else:
        state = _restore_orbax(path, template)
    held = meta.get("format") != "orbax" or meta.get("holds_frozen", False)
    sums, bad = integrity.checksums([("/".join(p), leaf) for p, leaf in _names(state) if held or p[0] != "frozen"])
    problem = integrity.compare(meta["checksums"], sums) if "checksums" in meta else None
    if problem is None and bad:
        problem = f"{len(bad)} of its arrays hold NaN or inf, e.g. {', '.join(bad[:3])}"
    if problem is not None:
        raise damaged(path, problem)
    return state, meta


def saved_leaves(path: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of the leaves of an orbax training checkpoint, read from its metadata."""
    ocp = _orbax()
    path = _absolute(path)
    try:
        with orbax_errors.quiet():
            found = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(path)
        tree = None if found is None or found.item_metadata is None else found.item_metadata.tree
    except Exception as e:  # noqa: BLE001  (orbax raises bare Exceptions, and AttributeError on a damaged file)
        raise damaged(path, f"its orbax metadata cannot be read: {orbax_errors.reason(e)}") from e
    if not isinstance(tree, dict):
        raise damaged(path, "its orbax metadata (_METADATA, _CHECKPOINT_METADATA) is missing or unreadable")
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): (tuple(m.shape), np.dtype(m.dtype))
            for p, m in leaves}


def _restore_orbax(path: str, template: TrainState) -> TrainState:
    ocp = _orbax()
    path = _absolute(path)
    saved = saved_leaves(path)
    flat, treedef = jax.tree_util.tree_flatten(template)
    names = [p for p, _ in _names(template)]
    with_frozen = any(p[0] == "frozen" for p in saved)
    wanted = [(p, leaf) for p, leaf in zip(names, flat) if with_frozen or p[0] != "frozen"]
    check_tree({"/".join(p): [tuple(np.shape(leaf)), np.dtype(leaf.dtype)] for p, leaf in wanted},
               {"/".join(p): [shape, dtype] for p, (shape, dtype) in saved.items()},
               f"{path} does not match this training setup", noun="leaf", error=CheckpointError)

    def target(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return (jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                    ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype))
        dtype = np.asarray(leaf).dtype
        return np.zeros(np.shape(leaf), dtype), ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)

    targets = [(p, target(leaf)) for p, leaf in wanted]
    try:
        with orbax_errors.quiet():
            restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(path, args=ocp.args.PyTreeRestore(
                item=_nest((p, t[0]) for p, t in targets), restore_args=_nest((p, t[1]) for p, t in targets)))
    except Exception as e:  # noqa: BLE001  (orbax raises bare Exceptions)
        raise damaged(path, f"orbax cannot read it: {orbax_errors.reason(e)}") from e
    leaves = [_lookup(restored, p) if with_frozen or p[0] != "frozen" else leaf for p, leaf in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
