"""What `dualenc train` checks before it trains: its arguments, --resume against the checkpoints, the batch
against the data, and the captions against the tokenizer's vocabulary."""

from __future__ import annotations

import collections
import contextlib
import math
import os

import numpy as np

from dualenc.cli.support import CommandError, at_least, note, require

CAPTION_SAMPLE = 2000  # captions (or records) looked at for words the tokenizer does not know
UNKNOWN_WARNING = 0.05  # above this share of captions with unknown words, train warns


def check_args(args) -> None:
    """Every argument checked before any work; what needs the data (the batch against the images) is checked
    as soon as the data is read, before the model loads."""
    from dualenc import hub
    from dualenc.formats import assembly
    from dualenc.errors import ConfigError

    if args.model is not None and (args.vision or args.text):
        raise CommandError("give --model DIR (fine-tune a whole model) or --vision DIR --text DIR (compose towers), "
                           "not both")
    if args.model is None and not (args.vision and args.text):
        raise CommandError("give --model DIR (fine-tune a whole model) or both --vision DIR and --text DIR")
    for flag, path in (("--model", args.model), ("--vision", args.vision), ("--text", args.text)):
        if path is not None and not os.path.isdir(hub.resolve(path)):
            raise CommandError(f"{flag} model directory not found: {path}")
    if args.projection_dim is not None:
        at_least(args.projection_dim, "--projection-dim")
        try:  # from the config files alone
            assembly.check_start(args.vision, args.text, model_path=args.model, projection_dim=args.projection_dim)
        except ConfigError as e:
            raise CommandError(f"--projection-dim: {e}") from None
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--log-every", args.log_every, 0), ("--eval-every", args.eval_every, 0),
                               ("--checkpoint-every", args.checkpoint_every, 0), ("--keep", args.keep, 0),
                               ("--unlocked-layers", args.unlocked_layers, 0), ("--workers", args.workers, 0),
                               ("--seed", args.seed, 0), ("--heartbeat-timeout", args.heartbeat_timeout, 1),
                               ("--max-length", args.max_length, 1)):
        if value is not None:
            at_least(value, flag, least)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CommandError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.max_replaced <= 1:
        raise CommandError(f"--max-replaced must be a share between 0 and 1, got {args.max_replaced}")
    from dualenc.cli import training_options

    training_options.check(args)
    if args.cache and args.lock not in (None, "vision"):
        raise CommandError(f"--cache keeps the locked vision tower's outputs: it needs --lock vision, got --lock "
                           f"{args.lock}")
    if args.unlocked_layers and (args.lock == "none" or args.lora is not None):
        raise CommandError("--unlocked-layers trains the top layers of the locked tower: --lock none locks none")
    for flag, path in (("--image-root", args.image_root), ("--eval-image-root", args.eval_image_root)):
        if path is not None and not os.path.isdir(path):
            raise CommandError(f"{flag} folder not found: {path}")
    if args.eval_data is not None and not os.path.isfile(args.eval_data):
        raise CommandError(f"--eval-data caption file not found: {args.eval_data}")
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise CommandError("--coordinator needs --num-processes and --process-id")
        at_least(args.num_processes, "--num-processes")
        if not 0 <= args.process_id < args.num_processes:
            raise CommandError(f"--process-id must be in [0, {args.num_processes - 1}] (--num-processes "
                               f"{args.num_processes}), got {args.process_id}")
    elif args.num_processes is not None or args.process_id is not None:
        raise CommandError("--num-processes and --process-id go with --coordinator HOST:PORT")
    if args.tensorboard:
        require("tensorboardX", "tensorboard", "--tensorboard")


def check_batch(args, dataset, devices: int) -> None:
    """The batch against the data and the devices, once the data is read (before the model loads)."""
    if args.batch_size % devices:
        raise CommandError(f"--batch-size {args.batch_size} does not split over the {devices} devices: use a "
                           f"multiple of {devices}")
    accum = getattr(args, "accum_steps", 1)
    if accum > 1 and args.batch_size % (devices * accum):
        raise CommandError(f"--batch-size {args.batch_size} with --accum-steps {accum} does not split into {accum} "
                           f"micro-batches over the {devices} devices: use a multiple of {devices * accum}")
    count = images(dataset)
    if args.batch_size > count:
        fits = count - count % devices  # the largest batch that still splits over the devices
        what = f"{fits} or less" + (f" (a multiple of the {devices} devices)" if devices > 1 else "") if fits \
            else f"{count} or less, and run on fewer devices (a batch splits evenly over the {devices} devices)"
        raise CommandError(f"--batch-size {args.batch_size} is more than the {count} distinct images in "
                           f"{' '.join(args.data)} (a batch holds each image at most once): lower --batch-size to "
                           f"{what}")


def images(dataset) -> int:
    """The distinct images of the training data: a PairDataset's images, a RecordSource's records."""
    return len(dataset.images) if hasattr(dataset, "images") else len(dataset)


def resume_point(args, checkpoints: str) -> tuple[bool, bool]:
    """Checks --resume / --resume-or-start against the newest checkpoint before anything loads: (whether the run
    continues from a checkpoint, whether that run is finished)."""
    from dualenc.train import loop as trainer

    saved = trainer.checkpoints(checkpoints)
    resuming = bool(saved) and (args.resume or args.resume_or_start)
    if not saved:
        if args.resume:
            raise CommandError(f"--resume: no training checkpoint in {checkpoints} to continue from"
                               + ("" if os.path.isdir(args.out) else f" (no folder {args.out})")
                               + ": check --out, or leave out --resume to start a new run there "
                                 "(--resume-or-start resumes only when there is a checkpoint)")
        return False, False
    if not resuming:
        raise CommandError(f"{checkpoints} already holds checkpoints: pass --resume to continue, or another "
                           f"--out")
    step, path = saved[-1]
    planned = int(trainer.checkpoint_meta(path).get("steps", step))
    if args.steps < planned:
        raise CommandError(f"--steps {args.steps} is fewer than the {planned} steps of the run in {args.out} "
                           f"(checkpoint at step {step}): resume with --steps {planned}, or more to extend it")
    if args.steps == step:
        return True, True
    if args.steps > planned:
        note("train", f"extending the run in {args.out} from {planned} to {args.steps} steps: the learning-rate "
                      f"schedule (warmup, then cosine decay to 0) is recomputed for {args.steps} steps and followed "
                      f"from step {step} on")
    return True, False


def caption_sample(dataset, limit: int = CAPTION_SAMPLE) -> tuple[list[str], str]:
    """(captions, which they are, e.g. "of the 12 captions"): a PairDataset's captions, or those of a
    RecordSource's records; past `limit` captions (records), `limit` evenly spaced ones, said to be a sample."""
    from dualenc.data.records import decode_record
    from dualenc.errors import DataError

    if hasattr(dataset, "draws"):  # a Mixture: its sources' samples together
        found = [caption_sample(part, max(1, limit // len(dataset.parts))) for part in dataset.sources]
        return [c for captions, _ in found for c in captions], "of " + " and ".join(w[3:] for _, w in found)
    pairs = hasattr(dataset, "captions")
    total = len(dataset.captions) if pairs else len(dataset)
    picked = np.unique(np.linspace(0, total - 1, min(total, limit)).round().astype(np.int64))
    which = f"the {total:,}" if len(picked) == total else f"{len(picked):,} sampled evenly from the {total:,}"
    if pairs:
        return [dataset.captions[i] for i in picked], f"of {which} captions"
    captions = []
    for i in picked:
        with contextlib.suppress(DataError):  # a damaged record: the pipeline skips and counts it
            captions += decode_record(bytes(dataset[int(i)])).captions
    return captions, f"of the {len(captions):,} captions of {which} records"


def unknown_words(tokenizer, captions: list[str], what: str) -> tuple[str, str | None]:
    """(the start summary's line on captions with words the tokenizer maps to its unknown token, a warning
    naming the most frequent of those words when over UNKNOWN_WARNING of the captions hold one, else None)."""
    unknown = tokenizer.unknown_words(list(dict.fromkeys(captions)))
    hit = [c for c in captions if c in unknown]
    share = len(hit) / max(len(captions), 1)
    line = f"captions with words the tokenizer does not know: {share:.1%} ({len(hit):,} {what})"
    if share <= UNKNOWN_WARNING:
        return line, None
    words = collections.Counter(w for c in hit for w in unknown[c]).most_common(8)
    return line, (f"warning: {len(hit):,} {what} ({share:.0%}) {'holds' if len(hit) == 1 else 'hold'} words the "
                  f"tokenizer does not know, such as {', '.join(repr(w) for w, _ in words)}: each is read as its "
                  f"unknown token, so the model cannot learn them; train with a text model whose vocabulary covers "
                  f"the captions (--text DIR), or check their language and spelling")
