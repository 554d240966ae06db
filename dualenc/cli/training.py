"""`dualenc train`: a run's start summary, progress and log lines, metrics.jsonl / TensorBoard, held-out
evaluation, training.png, resume and Ctrl-C."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import sys
import time
import traceback

import numpy as np

from dualenc.cli import training_checks as checks
from dualenc.cli import training_options
from dualenc.cli.benchmark import training_figures, training_options as benchmark_training_options, training_sets
from dualenc.cli.support import CommandError, CompileNotice, note, outside_hint, plural
from dualenc.cli.options import data_options, subcommand
from dualenc.data.pipeline import MAX_REPLACED, MIN_DRAWN, TooManyReplaced
from dualenc.errors import DualEncError


def training_data(inputs: list[str], prepared: str, *, image_root=None, allow_outside=False):
    """What --data names, as fit() takes it: a caption file (.jsonl/.csv/.tsv) up to dualenc.data.pairs.MAX_CAPTION_FILE read
    into a PairDataset; a folder written by `dualenc prepare` as a RecordSource (its images outside it only
    with image_root or allow_outside); webdataset tars, or a larger caption file, converted once (streamed,
    resumably) into `prepared` and read from there, their images where the inputs name them."""
    from dualenc import data
    from dualenc.data import pairs
    from dualenc.data import RecordSource, expand_shards, prepare
    from dualenc.data.prepare import image_root_for
    from dualenc.data.records import MANIFEST

    if len(inputs) == 1 and os.path.isfile(os.path.join(inputs[0], MANIFEST)):
        return RecordSource(inputs[0], image_root=image_root, allow_outside=allow_outside)
    captions = len(inputs) == 1 and inputs[0].lower().endswith((".jsonl", ".json", ".csv", ".tsv"))
    if captions and os.path.isfile(inputs[0]) and os.path.getsize(inputs[0]) <= pairs.MAX_CAPTION_FILE:
        return data.read_pairs(inputs[0], image_root=image_root, allow_outside=allow_outside)
    if captions and not os.path.isfile(inputs[0]):
        raise FileNotFoundError(f"caption file not found: {inputs[0]}")
    from dualenc.train import peers

    note("train", f"converting {' '.join(inputs)} into {prepared} (once; a rerun resumes or reuses it)")
    # One process converts (into storage all of them share); the others wait for it.
    peers.on_process_0("prepare", lambda: prepare(inputs, prepared, image_root=image_root,
                                                  allow_outside=allow_outside))
    return RecordSource(prepared, image_root=image_root_for(expand_shards(inputs), image_root, allow_outside),
                        allow_outside=allow_outside)


def _summary(args, dataset, run, config, params, devices: int, resumed_from, unknown: str) -> str:
    import jax

    from dualenc import train

    images = checks.images(dataset)
    per_epoch = images // run.batch_size
    if run.lora is not None:  # the adapters' shapes, drawn for nothing
        from dualenc import lora

        trainable, frozen = jax.eval_shape(lambda: lora.init(jax.random.key(0), params, config, run.lora)), params
    else:
        trainable, frozen = train.partition(params, run.locked, run.unlocked_layers)
    count = lambda tree: sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    counts = dataset.skipped if hasattr(dataset, "skipped") else getattr(dataset, "manifest", {}).get("skipped", {})
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    locking = ""
    if run.locked:
        locking = f" ({run.locked[0]} tower locked" + (f", its top {run.unlocked_layers} layers trained"
                                                       if run.unlocked_layers else "") \
                  + (", its outputs cached" if run.cached else "") + ")"
    what = f"{len(dataset.captions)} pairs of {images} images" if hasattr(dataset, "captions") else \
        f"{images} records (images with their captions)"
    if hasattr(dataset, "draws"):  # a Mixture
        what = f"{images} records of {len(dataset.parts)} sources, drawn " + ", ".join(
            f"{share:.1%} from {name} ({size} records x {weight:g})" for name, size, weight, share in
            zip(dataset.names, dataset.sizes, dataset.weights, dataset.shares()))
    lines = [f"{what} from {' '.join(args.data)} (rows skipped: {skipped})",
             f"{run.steps} steps of batch {run.batch_size} = {run.steps / max(per_epoch, 1):.2f} epochs "
             f"({per_epoch} batches per epoch); {devices} device(s)",
             f"params: {count(trainable):,} trainable, {count(frozen):,} locked{locking}",
             f"loss {run.loss}; learning rate {run.learning_rate:g} (warmup, cosine decay to 0); checkpoints every "
             f"{run.checkpoint_every or 'end of'} steps in {os.path.join(args.out, 'checkpoints')}",
             training_options.described(run, args.model_parallel), unknown]
    if resumed_from is not None:
        lines.append(f"resuming from step {resumed_from[0]} ({resumed_from[1]})")
    hint = outside_hint(dataset, args.data[0], args.image_root) if hasattr(dataset, "skipped") else None
    if hint:
        lines.append(hint)
    return "\n  ".join(lines)


class Progress:
    """Log lines every N steps (to a progress bar's line when stderr is a terminal, plain lines otherwise),
    records for metrics.jsonl / TensorBoard, and steps/s measured after the first step (the compile)."""

    def __init__(self, log, total: int, every: int, quiet: bool, start: int):
        self.log, self.total, self.every, self.quiet = log, total, every, quiet
        self.mark = None  # (step, time) after the first step of this process
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="training", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        now = time.perf_counter()
        if self.mark is None:
            self.mark = (step, now)
        if not (self.every and (step % self.every == 0 or step == self.total)):
            return
        rate = (step - self.mark[0]) / (now - self.mark[1]) if step > self.mark[0] else float("nan")
        values = {k: float(metrics[k]) for k in ("loss", "accuracy_i2t", "accuracy_t2i", "grad_norm", "logit_scale")}
        record = {"kind": "train", "step": step, "epoch": round(metrics["epoch"], 4), **values,
                  "accuracy": (values["accuracy_i2t"] + values["accuracy_t2i"]) / 2,
                  "learning_rate": metrics["learning_rate"], "steps_per_second": rate,
                  "records_replaced": int(metrics["records_replaced"])}
        self.log.write(record)
        replaced = f"  replaced {record['records_replaced']:,}" if record["records_replaced"] else ""
        self._line(f"step {step}/{self.total}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  "
                   f"lr {record['learning_rate']:.3g}  grad {record['grad_norm']:.3g}  "
                   f"scale {record['logit_scale']:.2f}  {rate:.2f} steps/s  epoch {record['epoch']:.2f}{replaced}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def evaluation(self, step: int, figures: dict) -> None:
        self.log.write({"kind": "eval", "step": step, **figures})
        self._line(f"eval at step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _evaluator(args, held_out, benchmarks: dict, config, processor, progress):
    """Held-out retrieval (and zero-shot accuracy when every image has a label) on --eval-data, and
    CLIP_benchmark's metrics on --eval-zeroshot / --eval-retrieval."""
    import dualenc

    if held_out is None:
        return lambda step, params: progress.evaluation(step, training_figures(benchmarks, config, params, processor,
                                                                               args.batch_size))
    relevant = held_out.relevance()
    labelled = "image_labels" in relevant
    classes = sorted(set(held_out.labels)) if labelled and len(set(held_out.labels)) > 1 else None

    def evaluate(step, params):
        images = dualenc.encode_images(params, config, processor, held_out.images, batch_size=args.batch_size)
        texts = dualenc.encode_texts(params, config, processor, held_out.captions, batch_size=args.batch_size)
        found = dualenc.retrieval_metrics(images, texts, ks=(1, 5), **relevant)
        figures = {k: v for k, v in found.items() if "_R@" in k and "chance" not in k}
        if classes:
            classifier = dualenc.zero_shot_classifier(params, config, processor, classes)
            top, _ = dualenc.zero_shot_predict(images, classifier, params=params)
            figures["zero_shot_accuracy"] = float(np.mean(np.asarray(classes)[top[:, 0]] == held_out.labels))
        if benchmarks:
            figures.update(training_figures(benchmarks, config, params, processor, args.batch_size))
        progress.evaluation(step, figures)

    return evaluate


class Figure:
    """training.png, redrawn from metrics.jsonl at checkpoints (at most every REDRAW_SECONDS, so a run with
    checkpoints seconds apart does not spend its time drawing) and always at the end."""

    REDRAW_SECONDS = 30.0
    NAME = "training.png"

    def __init__(self, out: str, log_path: str):
        self.path, self.log_path = os.path.join(out, self.NAME), log_path
        self.last, self.warned = None, False

    def draw(self, *, force: bool = True) -> None:
        from dualenc.train import runlog

        now = time.monotonic()
        if not force and self.last is not None and now - self.last < self.REDRAW_SECONDS:
            return
        self.last = now
        try:
            from dualenc import plots as figures
            figures.training(self.path, runlog.read(self.log_path))
        except ImportError as e:
            if not self.warned:
                self.warned = True
                note("train", f"no training.png: {e}")
        except ValueError:
            pass  # nothing logged yet


def _lost_peer(args, checkpoints: str, error) -> None:
    """Ends this process of a distributed run whose peer is gone: one line saying how to resume, exit status 3."""
    from dualenc.train import loop as trainer
    from dualenc.train import peers

    try:
        saved = trainer.checkpoints(checkpoints)
        how = f"with --resume (last checkpoint: {saved[-1][1]})" if saved else \
            "without --resume, or with --resume-or-start (last checkpoint: none yet)"
        reason = re.sub(r"(Error dispatching computation: )+", r"\1", " ".join(str(error).split()))[:160]
        print(f"dualenc train: error: process {args.process_id} lost a peer of the distributed run ({reason}); "
              f"restart all {args.num_processes} processes {how}", file=sys.stderr, flush=True)
    finally:
        peers.end_process(peers.LOST_STATUS)  # not JAX's distributed shutdown, which waits for the lost process


def cmd_train(args) -> int:
    import jax

    from dualenc.train import peers

    checks.check_args(args)
    checkpoints = os.path.join(args.out, "checkpoints")
    resuming, finished = checks.resume_point(args, checkpoints)
    if finished and os.path.isfile(os.path.join(args.out, "config.json")):
        note("train", f"the run in {args.out} already finished at step {args.steps}: nothing to train (pass a "
                      f"larger --steps with --resume to extend it)")
        return 0
    if not args.coordinator:
        return _train(args, checkpoints, resuming, None)
    watch = peers.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.heartbeat_timeout,
                             on_lost=lambda lost: _lost_peer(args, checkpoints, lost.reason))
    loopback = peers.loopback_only(args.coordinator) if args.process_id == 0 else []
    if loopback:
        note("train", f"--coordinator {args.coordinator} is {', '.join(loopback)} on this host, where the "
                      f"coordination service listens: processes on other hosts cannot join it (give this host's "
                      f"network address, or set JAX_COORDINATOR_BIND_ADDRESS)")
    if watch is None:  # --num-processes 1
        return _train(args, checkpoints, resuming, None)
    try:
        return _train(args, checkpoints, resuming, watch)
    except peers.PeerLost as e:  # from fit
        _lost_peer(args, checkpoints, e.reason)
    except Exception as e:
        # A failed collective, orbax's commit barrier or anything else but dualenc's own errors may come from a
        # lost peer: the watch tells within its timeout (and lets process 0 tell the others before its exit takes
        # the service down), else a failed collective is reported as a lost peer and anything else as this
        # process's own error. Either way the process leaves without JAX's shutdown barrier, which would wait for
        # peers that are gone or waiting.
        lost = None if isinstance(e, (DualEncError, CommandError)) else watch.settle()
        if lost is not None or isinstance(e, jax.errors.JaxRuntimeError):
            _lost_peer(args, checkpoints, lost or e)
        if not isinstance(e, (DualEncError, CommandError, ValueError, OSError)):
            traceback.print_exc()
        print(f"dualenc train: error: process {args.process_id}: {e}; the other processes stop when they miss its "
              f"heartbeats", file=sys.stderr, flush=True)
        watch.finish(f"{type(e).__name__}: {e}")  # process 0 tells the others before its exit ends the service
        peers.end_process(2)


def _start_log(args, resumed_from):
    """The run's RunLog (see runlog.RunLog: a new run replaces an earlier run's log, a resumed one drops what
    was logged after its checkpoint), saying what it replaced or dropped."""
    from dualenc.train import runlog

    log = runlog.RunLog(args.out, tensorboard=args.tensorboard, resumed_from=resumed_from)
    replaced = [f"{plural(log.replaced, 'record')} in {log.path}"] if log.replaced else []
    if log.replaced_events:
        replaced.append(f"{plural(log.replaced_events, 'event file')} in "
                        f"{os.path.join(args.out, runlog.TENSORBOARD_DIR)}")
    if replaced:
        note("train", f"this new run replaces the log of an earlier run in {args.out} that left no checkpoint: "
                      f"{' and '.join(replaced)}")
    if log.dropped:
        note("train", f"dropped the {plural(log.dropped, 'record')} of {log.path} logged after step {resumed_from}: "
                      f"those steps are trained and logged again")
    if resumed_from is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(args.out, Figure.NAME))
    return log


def _train(args, checkpoints: str, resuming: bool, watch) -> int:
    """`dualenc train` after its checks (and, with --coordinator, once this process joined the run)."""
    import jax

    import dualenc
    from dualenc import data
    from dualenc.formats import assembly
    from dualenc.train import loop as trainer

    parts = training_options.sources(args.data)
    if len(parts) == 1:
        dataset = training_data(args.data, os.path.join(args.out, "prepared"), image_root=args.image_root,
                                allow_outside=args.allow_outside)
    else:  # a mixture: each source read (or converted) as one alone would be, into a prepared folder of its own
        dataset = data.Mixture([training_data(part, os.path.join(args.out, "prepared", str(i)),
                                              image_root=args.image_root, allow_outside=args.allow_outside)
                                for i, part in enumerate(parts)], training_options.weights(args),
                               names=[" ".join(part) for part in parts])
    if jax.device_count() % args.model_parallel:
        raise CommandError(f"--model-parallel {args.model_parallel} does not divide the {jax.device_count()} "
                           f"devices")
    checks.check_batch(args, dataset, jax.device_count() // args.model_parallel)
    held_out = data.read_pairs(args.eval_data, image_root=args.eval_image_root,
                               allow_outside=args.allow_outside) if args.eval_data else None
    benchmarks = training_sets(args)
    lock = args.lock or ("none" if args.lora is not None else "vision")
    locked = () if lock == "none" else (lock,)
    config, params, processor = assembly.start_from(args.vision, args.text, model_path=args.model,
                                                   key=jax.random.key(args.seed), projection_dim=args.projection_dim,
                                                   loss=args.loss, max_length=args.max_length)
    run = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                              loss=args.loss or config.default_loss, locked=locked,
                              unlocked_layers=args.unlocked_layers, cached=args.cache, seed=args.seed,
                              max_length=processor.tokenizer.max_length, checkpoint_every=args.checkpoint_every,
                              keep=args.keep, **training_options.settings(args))
    main = jax.process_index() == 0
    saved = trainer.checkpoints(checkpoints) if resuming else []
    start = saved[-1][0] if saved else 0
    if main:
        unknown, warning = checks.unknown_words(processor.tokenizer, *checks.caption_sample(dataset))
        note("train", _summary(args, dataset, run, config, params, jax.device_count(), saved[-1] if saved else None,
                               unknown))
        if warning:
            note("train", warning)
    log = _start_log(args, start if saved else None) if main else None
    progress = Progress(log, args.steps, args.log_every, args.quiet or not main, start) if main else None
    figure = Figure(args.out, log.path) if main else None
    # What the step compiles for; the held-out evaluation says its own.
    notice = CompileNotice("train", f"the train step for batch {run.batch_size}"
                           + (" (and the locked vision tower for the LiT cache)" if run.cached else ""))
    hooks = {}
    if main:
        hooks = dict(callback=progress.step,
                     on_checkpoint=lambda step, path: figure.draw(force=False))
    if held_out is not None or benchmarks:
        evaluate = _evaluator(args, held_out, benchmarks, config, processor, progress) if main else None

        def evaluation(step, params):
            if evaluate is not None:
                train_step, notice.what = notice.what, "the held-out evaluation"
                try:
                    evaluate(step, params)
                finally:
                    notice.what = train_step

        hooks.update(evaluate=evaluation, eval_every=args.eval_every)
    mesh = training_options.mesh(args, jax.device_count())
    if mesh is not None and args.model_parallel > 1:
        try:
            dualenc.train.sharding.check_model_parallel(config, mesh)
        except dualenc.ConfigError as e:
            raise CommandError(f"--model-parallel {args.model_parallel}: {e}") from None
    replaced, outputs = collections.Counter(), {}
    try:
        with notice if main else contextlib.nullcontext():
            params, last = trainer.fit(config, params, dataset, processor, run, checkpoint_dir=checkpoints,
                                       resume=resuming, mesh=mesh, workers=args.workers, skipped=replaced,
                                       max_replaced=args.max_replaced, outputs=outputs, **hooks)
    except TooManyReplaced as e:
        raise e.named(" ".join(args.data), "--max-replaced") from None
    except trainer.Interrupted as e:
        if progress is not None:
            progress.close()
        if main:
            figure.draw()
            again = args.resume or args.resume_or_start
            command = shlex.join(["dualenc", *args.argv] + ([] if again else ["--resume"]))
            where = f"saved in {e.checkpoint}" if e.checkpoint else "no checkpoint"
            note("train", f"interrupted after step {e.step} ({where}); continue with:\n  {command}")
        if watch is not None:
            watch.finish()
        return 130
    finally:
        if log is not None:
            log.close()
    if watch is not None:
        watch.finish()
    if progress is not None:
        progress.close()
    if main:
        figure.draw()
        dualenc.save_pretrained(args.out, config, params, processor=processor)
        _save_beside(args, config, run, processor, outputs)
        if last:
            counts = ", ".join(f"{reason} {n:,}" for reason, n in sorted(replaced.items()))
            unusable = f"; {sum(replaced.values()):,} records replaced, unusable: {counts}" if replaced else ""
            print(f"trained {args.steps} steps (final loss {last['loss']:.4f}{unusable}); model saved to {args.out}")
        else:
            print(f"the run had finished at step {args.steps}; model saved to {args.out}")
    return 0


def _save_beside(args, config, run, processor, outputs: dict) -> None:
    """What the run made beside the model: the moving average (OUT/ema) and LoRA's adapters alone (OUT/adapter,
    PEFT's layout)."""
    import dualenc

    out = args.out
    if "ema" in outputs:
        dualenc.save_pretrained(os.path.join(out, "ema"), config, outputs["ema"], processor=processor)
        note("train", f"the moving average of the weights (decay {run.ema_decay:g}) saved to "
                      f"{os.path.join(out, 'ema')}")
    if "adapters" in outputs:
        from dualenc.formats.peft import save_peft

        save_peft(os.path.join(out, "adapter"), outputs["adapters"], config, run.lora,
                  base_model_name_or_path=args.model)
        note("train", f"the LoRA adapters alone (PEFT's layout) saved to {os.path.join(out, 'adapter')}")


EXAMPLES = {
    'train': 'dualenc train --model dualenc-demo/model --data dualenc-demo/data/train.jsonl --eval-data dualenc-demo/data/test.jsonl --steps 100 --eval-every 50 --out dualenc-tuned',
}


def register(subs) -> None:
    """Adds train to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "train", cmd_train, "train contrastively: fine-tune a whole dual encoder, or compose one from a "
                                       "vision and a text model (LiT, or both towers)")
    p.add_argument("--model", help="a whole dual encoder to fine-tune (VisionTextDualEncoder, CLIP, open_clip, "
                                   "SigLIP, SigLIP 2), keeping its projections and logit scale")
    p.add_argument("--vision", help="or: a vision model directory (ViT, CLIP, SigLIP, SigLIP 2) with its image "
                                    "processor settings")
    p.add_argument("--text", help="and a text model directory (BERT, RoBERTa, CLIP, SigLIP) with tokenizer files; the "
                                  "same SigLIP directory as --vision trains that whole model")
    p.add_argument("--data", required=True, nargs="+", help="image-caption pairs: a .jsonl, .csv or .tsv file over "
                                                             "an image folder, a folder written by `dualenc "
                                                             "prepare`, or webdataset tars (converted once into "
                                                             "OUT/prepared, as a caption file over 1 GiB is)")
    data_options(p)
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (0: threads of the training "
                                                          "process)")
    p.add_argument("--out", required=True, help="where the trained model, checkpoints/, metrics.jsonl and "
                                                "training.png go (a new run replaces the metrics.jsonl, "
                                                "tensorboard/ and training.png of an earlier run that left no "
                                                "checkpoint)")
    p.add_argument("--lock", choices=("vision", "text", "none"), default=None,
                   help="the tower kept as it is (default: vision; none with --lora)")
    p.add_argument("--unlocked-layers", type=int, default=0, help="train the top N layers of the locked tower")
    p.add_argument("--cache", action="store_true", help="compute the locked vision tower once (LiT cache)")
    p.add_argument("--loss", choices=("clip", "siglip"), default=None,
                   help="contrastive loss (none: the model's own: siglip for SigLIP models, else clip)")
    p.add_argument("--steps", type=int, default=1000, help="total training steps (with --resume, more than the "
                                                           "checkpoint's run extends it)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (over all devices)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warmup, then cosine decay to 0)")
    p.add_argument("--max-length", type=int, default=None, help="text length in tokens (none: the tokenizer's)")
    p.add_argument("--projection-dim", type=int, default=None,
                   help="size of new projections (none: the towers' own trained projections when both carry one "
                        "of the same size; else the size a CLIP tower's config suggests; else 512; a whole model "
                        "keeps its own)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between training checkpoints")
    p.add_argument("--keep", type=int, default=3, help="training checkpoints kept (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (new params, data order, dropout)")
    p.add_argument("--max-replaced", type=float, default=MAX_REPLACED,
                   help=f"stop once more than this share of the records drawn could not be used (and were replaced "
                        f"by others), judged after {MIN_DRAWN} records (1: never stop)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in "
                                                             "OUT/checkpoints (an error when there is none)")
    again.add_argument("--resume-or-start", action="store_true",
                       help="continue from the newest checkpoint in OUT/checkpoints when there is one, else start "
                            "a new run (for jobs restarted with the same command, e.g. on preemptible machines)")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines and metrics.jsonl records "
                                                             "(0: none)")
    p.add_argument("--eval-data", help="held-out image-caption pairs to evaluate on (retrieval recall; zero-shot "
                                       "accuracy when every image has a label)")
    p.add_argument("--eval-image-root", help="folder --eval-data's image paths are relative to (default: its "
                                             "file's folder)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (with "
                                                               "--eval-data, --eval-zeroshot or --eval-retrieval; "
                                                               "also after the last step)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to "
                                                              "OUT/tensorboard (needs dualenc[tensorboard])")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines (the start summary stays)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to train over several processes/hosts")
    p.add_argument("--num-processes", type=int, help="with --coordinator: how many processes take part")
    p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a heartbeat before a lost process stops the run")
    training_options.register(p)
    benchmark_training_options(p)
