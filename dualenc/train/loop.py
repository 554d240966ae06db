"""The training loop: batches in, steps, metrics out; training checkpoints and exact resume.

Batches come from dualenc.data.Pipeline (grain): their order is a function of the seed and the step alone,
each process decoding only its rows of every global batch. A training checkpoint is a directory
`step_NNNNNNNN` written with orbax (dualenc.train.checkpoint): each process writes its own shards of the
trainable params, optimizer state, step and RNG, asynchronously; the frozen (locked) tower is not written,
it is the one the run starts from. `state.json` holds the step, the run's total steps and its settings.
Resuming restores the state onto the current mesh (any number of processes), so an interrupted run ends
with the same params as one that was never interrupted. Checkpoints of earlier versions (state.safetensors)
still restore.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import tempfile
import os
import shutil
import signal
import threading
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from dualenc import train
from dualenc.config import DualEncoderConfig
from dualenc.data import PairDataset
from dualenc.train import lit_cache
from dualenc.data.pipeline import MAX_REPLACED, SKIP_REASONS, Pipeline, check_replaced, data_fingerprint
from dualenc.errors import CheckpointError, ConfigError, DualEncError
from dualenc.lora import LoRA
from dualenc.processing.augment import Augment

from dualenc.train.checkpoint import (META_FILE, STATE_FILE, STEP_DIR, checkpoint_meta, checkpoints,  # noqa: F401
                                      latest_checkpoint, restore_state, save_state, wait_for_save)
from dualenc.train.peers import FitWatch, PeerLost  # noqa: F401  (trainer.PeerLost)
from dualenc.train.sharding import FSDP, host_array as _host_array
from dualenc.train.state import ADAPTERS



@dataclasses.dataclass
class TrainConfig:
    """What a training run does; saved in each checkpoint so a resume can check it matches."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    loss: str | None = None  # "clip" or "siglip"; None: the model's own (config.default_loss)
    locked: tuple[str, ...] = ()
    unlocked_layers: int = 0
    cached: bool = False
    seed: int = 0
    max_length: int = 32
    checkpoint_every: int = 0
    keep: int = 3
    fsdp: bool = False
    fsdp_min_shard_mb: float = 4.0  # with fsdp: leaves under this many MiB stay replicated (train.sharding.FSDP)
    remat_policy: str | None = None
    dtype: str | None = None  # compute dtype of the matmuls ("bfloat16"); params and optimizer state stay float32
    accum_steps: int = 1  # micro-batches per step, with the whole batch's exact gradient (train.accumulate)
    patch_dropout: float = 0.0  # FLIP: share of the vision tower's patches dropped in training
    grad_clip: float | None = 1.0  # global gradient norm clipped to this (None: no clipping)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    augment: Augment | None = None  # training augmentation in the data pipeline (random resized crop, colours)
    lora: LoRA | None = None  # train low-rank adapters (dualenc.lora), every param frozen
    ema_decay: float | None = None  # keep an exponential moving average of the trained params (averaging.with_ema)
    loss_form: str = "auto"  # on several devices: "ring" (the default there) or "gather" (make_train_step)
    layer_decay: float | None = None  # layer-wise learning-rate decay (optimizer.layer_scales)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        self.locked = tuple(self.locked)
        if self.lora is not None and (self.locked or self.unlocked_layers or self.cached):
            raise ConfigError("lora trains adapters with every param frozen: leave locked, unlocked_layers and "
                              "cached unset")


class Interrupted(KeyboardInterrupt):
    """fit() stopped on Ctrl-C (SIGINT) after its last completed step.

    Attributes:
      step: the last completed step.
      checkpoint: the training checkpoint holding that step (written on the interrupt, or the newest one when no
        step completed since it), or None without a checkpoint_dir.
    """

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class _InterruptAfterStep:
    """While active (in the main thread), a first Ctrl-C only asks the loop to stop after the current step; a
    second one interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class NonFiniteLoss(DualEncError):
    """fit() stopped at a step whose loss or gradient norm is NaN or infinite (its update, and every later one,
    would not be numbers): nothing from that step on is saved or returned.

    Attributes:
      step: that step.
      checkpoint: the newest training checkpoint, written before it, or None.
    """

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: str | None):
        where = f"the last checkpoint, written before it, is {checkpoint}" if checkpoint else \
            "no checkpoint was written before it"
        super().__init__(f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm}): stopped "
                         f"there, saving nothing from that step on; {where} (a lower learning rate or a longer "
                         f"warmup may avoid it)")
        self.step, self.checkpoint = step, checkpoint


def optimizer_of(run: TrainConfig, config: DualEncoderConfig | None = None):
    """The run's optimizer: dualenc.train.default_optimizer with the run's rate, schedule, decay, clipping,
    AdamW's betas and eps and layer-wise decay (over each tower's depth in `config`)."""
    depths = None
    if run.layer_decay is not None and config is not None:
        depths = {side: getattr(config, side).num_hidden_layers for side in ("vision", "text")
                  if hasattr(getattr(config, side), "num_hidden_layers")}
    optimizer = train.default_optimizer(run.learning_rate, total_steps=run.steps, warmup_steps=run.warmup_steps,
                                        weight_decay=run.weight_decay, clip_norm=run.grad_clip, b1=run.beta1,
                                        b2=run.beta2, eps=run.eps, layer_decay=run.layer_decay, depths=depths)
    if run.ema_decay is not None:
        from dualenc.train.averaging import with_ema

        optimizer = with_ema(optimizer, run.ema_decay)
    return optimizer


def settings_of(run: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint's (all but steps, checkpoint_every, keep and the
    FSDP floor: a checkpoint restores onto any layout)."""
    def jsonable(v):  # as JSON reads it back: tuples (also inside augment and lora) as lists
        if isinstance(v, dict):
            return {k: jsonable(x) for k, x in v.items()}
        return [jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {k: jsonable(v) for k, v in dataclasses.asdict(run).items()
            if k not in ("steps", "checkpoint_every", "keep", "fsdp_min_shard_mb")}


_FINGERPRINTS = {"model_sha256": "the model the run started from",  # what each fingerprint identifies
                 "data_sha256": "the training data"}


def fingerprints(params: dict, dataset) -> dict:
    """What a checkpoint records of the run's start, for a resume to check: model_sha256 (the starting params,
    as dualenc.search.index.model_fingerprint computes it) and data_sha256 (pipeline.data_fingerprint)."""
    from dualenc.search.index import model_fingerprint

    return {"model_sha256": model_fingerprint(params), "data_sha256": data_fingerprint(dataset)}


def check_resume(path: str, meta: dict, run: TrainConfig, fingerprints: dict | None = None) -> None:
    """Raises CheckpointError when a run cannot continue from the checkpoint at `path`: other settings or, given
    `fingerprints` (see fingerprints()), another starting model or other data (naming what differs), or fewer
    total steps than the checkpoint's run. A checkpoint of an earlier version that records no fingerprint is
    resumed with a warning."""
    ours, theirs = {**settings_of(run), **(fingerprints or {})}, meta.get("settings") or {}
    if theirs:  # settings added since the checkpoint was written: it ran with their defaults
        theirs = {**{k: v for k, v in settings_of(TrainConfig()).items() if k not in theirs}, **theirs}
    unrecorded = sorted(k for k in fingerprints or {} if k not in theirs)
    if unrecorded:
        warnings.warn(f"{path} records no {' or '.join(unrecorded)} (written by an earlier dualenc): whether "
                      f"{' and '.join(_FINGERPRINTS[k] for k in unrecorded)} are the same is not checked")
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k, "<unset>") != theirs.get(k, "<unset>")
                    and k not in unrecorded and (k in ours or k not in _FINGERPRINTS))

    def shown(k):
        if k in _FINGERPRINTS:
            return f"{k} {str(theirs.get(k))[:12]}... there, {ours[k][:12]}... here (not {_FINGERPRINTS[k]})"
        return f"{k} {theirs.get(k, '<unset>')!r} there, {ours.get(k, '<unset>')!r} here"

    if differ:
        raise CheckpointError(f"{path} was written by a run with other settings: " + "; ".join(map(shown, differ)))
    done = int(meta["step"])
    planned = int(meta.get("steps", done))
    if run.steps < planned:
        raise CheckpointError(f"steps {run.steps} is fewer than the {planned} steps of the run that wrote {path} "
                              f"(at step {done}): resume with steps {planned}, or more to extend it")


def _finish(state, run: TrainConfig, outputs: dict | None) -> None:
    """Fills fit's `outputs` (see fit) from the final state."""
    if outputs is None:
        return
    if run.ema_decay is not None:
        from dualenc.train.averaging import ema_params

        average = train.full_params(state, run.lora, trainable=ema_params(state.opt_state))
        outputs["ema"] = jax.tree_util.tree_map(_host_array, average)
    if run.lora is not None:
        outputs["adapters"] = jax.tree_util.tree_map(_host_array, state.trainable[ADAPTERS])


def _local(x) -> np.ndarray:
    """A replicated array's value, read on this host without a collective."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class _StepChecks:
    """What fit checks of each step, one step late so that the host never waits for the step it has just
    dispatched (and at once before a checkpoint, an evaluation and the end): a NaN or infinite loss or gradient
    norm stops the run (NonFiniteLoss); so do more records replaced than max_replaced allows (TooManyReplaced),
    counted over every process by the train step (its records_replaced metric)."""

    def __init__(self, batch_size: int, start: int, limit: float, data: str, checkpoint: str | None):
        self.batch_size, self.start, self.limit, self.data, self.checkpoint = batch_size, start, limit, data, checkpoint
        self.total = self.pending = None
        self.replaced = dict.fromkeys(SKIP_REASONS, 0)  # by reason, as of the last step checked

    def after(self, step: int, metrics: dict) -> dict:
        """Takes a dispatched step's metrics, checks the previous step's; returns the metrics with
        records_replaced the run's total so far (a device scalar, as the others)."""
        counts = metrics.pop("records_replaced")
        self.total = counts if self.total is None else self.total + counts
        previous, self.pending = self.pending, (step, metrics["loss"], metrics["grad_norm"], self.total)
        if previous is not None:
            self._check(*previous)
        return {**metrics, "records_replaced": self.total.sum()}

    def settle(self) -> None:
        previous, self.pending = self.pending, None
        if previous is not None:
            self._check(*previous)

    def _check(self, step: int, loss, grad_norm, total) -> None:
        loss, grad_norm = float(_local(loss)), float(_local(grad_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            wait_for_save()  # the last checkpoint, committed
            raise NonFiniteLoss(step, loss, grad_norm, self.checkpoint)
        self.replaced = dict(zip(SKIP_REASONS, (int(n) for n in _local(total))))
        drawn = (step - self.start) * self.batch_size + sum(self.replaced.values())
        check_replaced(step, drawn, self.replaced, self.limit, self.data)


def fit(config: DualEncoderConfig, params: dict, dataset: PairDataset, processor, run: TrainConfig, *,
        checkpoint_dir: str | None = None, resume: bool = True, mesh=None,
        callback: Callable[[int, dict], None] | None = None,
        evaluate: Callable[[int, dict], Any] | None = None, eval_every: int = 0,
        on_checkpoint: Callable[[int, str], None] | None = None, workers: int = 0, cache_dir: str | None = None,
        skipped: collections.Counter | None = None, max_replaced: float = MAX_REPLACED,
        peer_timeout: float = 30.0, outputs: dict | None = None) -> tuple[dict, dict]:
    """Trains contrastively and returns (params, last metrics).

    The data is a PairDataset (a caption file over an image folder, read by data.read_pairs) or a random-access
    source of records (dualenc.data.RecordSource: webdataset shards or caption files that `prepare`
    converted); dualenc.data.Pipeline (grain) draws the batches: a seeded global order, each process
    decoding only its rows of every global batch, the position a function of the step alone.

    With checkpoint_dir, a checkpoint is written every run.checkpoint_every steps and at the end, and with
    resume the newest one is restored first (same data position, same RNG). A checkpoint's run may be extended
    (run.steps larger than its steps): the learning-rate schedule is then the one of the new total (warmup,
    then cosine decay to zero at run.steps), followed from the checkpoint's step on. Fewer steps than the
    checkpoint's run, other settings, another starting model (`params`) or other data (their fingerprints: see
    fingerprints()), raise CheckpointError; so does a damaged checkpoint (naming the newest earlier one that
    passes the checks, see dualenc.train.checkpoint); a finished run resumed with its own steps trains no step
    and returns empty metrics.

    A step whose loss or gradient norm is NaN or infinite stops the run (NonFiniteLoss, naming the step and the
    last checkpoint): no checkpoint or params of that step or later are saved or returned. A record that cannot
    be used is replaced by another (see dualenc.data.pipeline) and counted; once MIN_DRAWN records were
    drawn since the run started or resumed, more than `max_replaced` of them replaced stops the run
    (pipeline.TooManyReplaced, naming the most common reason).

    With a mesh the step is data parallel over its "data" axis; under jax.distributed each process feeds its
    share of every global batch. With several processes every one must call fit; each watches the others'
    heartbeats (dualenc.train.peers: the watch peers.initialize started, else one of its own) and a peer lost
    (killed, or silent for peer_timeout seconds) raises PeerLost (its step and newest checkpoint) from the error
    it caused; where this process waits where Python cannot interrupt it (a collective that never returns, a
    checkpoint's barrier), the watch ends the process instead (one line on stderr). Either way the process ends
    with exit status 3 (peers.LOST_STATUS), without JAX's distributed shutdown, which would wait for the lost
    peer and then abort.

    Ctrl-C (SIGINT, in the main thread) stops after the current step: the step is saved as a checkpoint (with
    checkpoint_dir) and Interrupted is raised; a second Ctrl-C interrupts at once.

    Args:
      callback: called after every step with (step, metrics): the step's loss, logit_scale, accuracy_i2t,
        accuracy_t2i, grad_norm, records_replaced (the records replaced since the run started or resumed, over
        every process) (device scalars: converting one waits for the step) and, as floats, learning_rate (the
        rate of that update), epoch (epochs of data consumed) and step_seconds (dispatch).
      evaluate: called with (step, params) every eval_every steps and after the last step.
      on_checkpoint: called with (step, path) after each checkpoint is written.
      workers: grain worker processes decoding images (0: threads of this process).
      cache_dir: where the LiT cache (run.cached) is written and found again, keyed by a fingerprint of the
        locked tower, the preprocessing and the data (default: checkpoint_dir/lit-cache; without either, a
        temporary folder removed at the end).
      skipped: a Counter to which the records replaced in the batches used (over every process) are added, by
        reason.
      max_replaced: the share of the records drawn that may be replaced (0 to 1; 1 never stops).
      outputs: a dict fit fills at the end with what the run made beside the params: "ema" (with run.ema_decay:
        the whole params with the trained ones replaced by their moving average) and "adapters" (with run.lora:
        the adapters alone, for dualenc.formats.peft.save_peft), host arrays gathered from every process.
      peer_timeout: seconds without a peer's heartbeat before it counts as lost (under jax.distributed with
        several processes); JAX's own heartbeat timeout (jax.distributed.initialize's heartbeat_timeout_seconds)
        must be longer, or JAX aborts the process first.
    """
    skipped = skipped if skipped is not None else collections.Counter()
    if isinstance(max_replaced, bool) or not isinstance(max_replaced, (int, float)) or not 0 <= max_replaced <= 1:
        raise ConfigError(f"max_replaced must be a share between 0 and 1, got {max_replaced!r}")
    run = dataclasses.replace(run, loss=run.loss or config.default_loss)
    if run.cached and run.augment is not None:
        raise ConfigError("augment with cached=True: the LiT cache holds the locked vision tower's features of "
                          "the unaugmented images, computed once, so augmentation cannot apply to them; train "
                          "without the cache to augment, or without augment to cache")
    text = config.text
    if config.text_padding == "max_length" and run.max_length != text.max_length:
        raise ConfigError(f"max_length is {run.max_length}, but the text tower ({type(text).__name__}) pools the "
                          f"last position and is used on text padded to its {text.max_length} positions, as "
                          f"trained: train with max_length={text.max_length}")
    # The rate of every update, computed once: a schedule call per step would wait for that step's computation.
    rates = np.asarray(train.learning_rate_schedule(run.learning_rate, total_steps=run.steps,
                                                    warmup_steps=run.warmup_steps)(np.arange(run.steps)))
    optimizer = optimizer_of(run, config)
    state = train.init_state(params, optimizer, locked=run.locked, unlocked_layers=run.unlocked_layers,
                             seed=run.seed, lora=run.lora, config=config)
    fsdp = FSDP(min_shard_mb=run.fsdp_min_shard_mb) if run.fsdp else False
    if mesh is not None:
        state = train.shard_state(state, mesh, fsdp)
    latest, scratch = None, None
    settings = settings_of(run)
    if checkpoint_dir:
        settings.update(fingerprints(params, dataset))
    watch = FitWatch(peer_timeout)  # under jax.distributed: before the first collective
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir and resume else None  # one answer for all processes
    if found is not None:
        _, latest = found
        check_resume(latest, checkpoint_meta(latest), run, {k: settings[k] for k in _FINGERPRINTS})
        state, meta = restore_state(latest, state)
    step_fn = train.make_train_step(config, optimizer, loss=run.loss, locked=run.locked,
                                    unlocked_layers=run.unlocked_layers, cached=run.cached,
                                    remat_policy=run.remat_policy, dtype=run.dtype, mesh=mesh, fsdp=fsdp,
                                    accum_steps=run.accum_steps, patch_dropout=run.patch_dropout, lora=run.lora,
                                    loss_form=run.loss_form)
    step = int(_host_array(state.step))
    if step >= run.steps:
        _finish(state, run, outputs)
        return jax.tree_util.tree_map(_host_array, train.full_params(state, run.lora)), {}
    features = None
    if run.cached:
        if run.locked[:1] != ("vision",):
            raise ConfigError("the LiT cache in fit() covers a locked vision tower")
        if cache_dir is None and checkpoint_dir is None:
            cache_dir = scratch = tempfile.mkdtemp(prefix="dualenc-lit-")
        features, _ = lit_cache.build(cache_dir or os.path.join(checkpoint_dir, "lit-cache"), params, config,
                                      processor, dataset, batch_size=run.batch_size, workers=workers)
    local = mesh is not None  # with a mesh, this process reads its share of each global batch; else all of it
    batches = Pipeline(dataset, processor, run.batch_size, seed=run.seed, max_length=run.max_length, start=step,
                       augment=run.augment,
                       steps=run.steps, workers=workers, features=features,
                       process_index=jax.process_index() if local else 0,
                       process_count=jax.process_count() if local else 1)
    metrics = {}
    checks = _StepChecks(run.batch_size, step, max_replaced, getattr(dataset, "folder", None) or
                         " + ".join(getattr(dataset, "names", ())) or "the training data",
                         latest)

    def checkpoint():
        # Asynchronous: each process writes its shards while training goes on (the next save, a resume and the
        # end of fit wait for it); the frozen tower is not saved, it comes from `params` again on resume.
        checks.settle()
        path = save_state(checkpoint_dir, state, {"data_step": step, "settings": settings, "steps": run.steps},
                          keep=run.keep, wait=False)
        checks.checkpoint = path
        if path is not None and on_checkpoint is not None:
            on_checkpoint(step, path)
        return path

    def params_now():
        return jax.tree_util.tree_map(_host_array, train.full_params(state, run.lora))  # gathered from every host

    try:
        with _InterruptAfterStep() as interrupt, watch.guard(lambda: step, checkpoint_dir):
            for _, batch in batches:
                # The counts copied: passed as their view into grain's shared memory, they kept it past the end
                # of fit (the resource tracker reported it leaked in a 2-process run with worker processes).
                batch = {**{k: v for k, v in batch.items() if not k.startswith("_")},
                         "records_replaced": np.array(batch["_skipped"])}
                if mesh is not None:
                    batch = train.shard_batch(batch, mesh)
                started = time.perf_counter()
                state, metrics = step_fn(state, batch)
                step += 1
                metrics = checks.after(step, metrics)
                if callback is not None:
                    callback(step, {**metrics, "step_seconds": time.perf_counter() - started,
                                    "learning_rate": float(rates[step - 1]), "epoch": batches.epoch(step)})
                saved = checkpoint_dir and run.checkpoint_every and step % run.checkpoint_every == 0
                if saved:
                    latest = checkpoint()
                if evaluate is not None and eval_every and step % eval_every == 0 and step < run.steps:
                    checks.settle()
                    evaluate(step, params_now())
                if interrupt.requested and step < run.steps:  # (after the last step, the run ends as usual)
                    if checkpoint_dir and not saved:
                        latest = checkpoint()
                    wait_for_save()
                    raise Interrupted(step, latest if checkpoint_dir else None)
            # The last batch's shared memory (grain's worker processes hand batches over in it) is freed now, not
            # left to the resource tracker at exit (which reports it as leaked): the StopIteration grain handed
            # over holds the frames of its (joined) threads, a reference cycle that holds the batch.
            batch = None
            checks.settle()  # the last step done with its inputs (on CPU they may be views of that memory)
            gc.collect()
            if checkpoint_dir and (not run.checkpoint_every or step % run.checkpoint_every):
                checkpoint()
            wait_for_save()
            params = params_now()
            _finish(state, run, outputs)
            if evaluate is not None:
                evaluate(step, params)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    skipped.update({reason: n for reason, n in checks.replaced.items() if n})
    return params, {k: float(_host_array(v)) for k, v in metrics.items()}


