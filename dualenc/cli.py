"""The `dualenc` command: demo, zero-shot, embed, search, train, eval."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CommandError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


def _print_json(obj):
    print(json.dumps(obj, indent=None, sort_keys=True))


def _load_model(path: str):
    import dualenc

    if not os.path.isdir(path):
        raise CommandError(f"model directory not found: {path}")
    config, params = dualenc.load_pretrained(path)
    return config, params, dualenc.Processor.from_pretrained(path)


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise CommandError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise CommandError(f"{what} file {path} is not UTF-8 text") from None
    lines = [line for line in lines if line]
    if not lines:
        raise CommandError(f"{what} file {path} is empty")
    return lines


def _image_files(items: list[str]) -> list[str]:
    found = []
    for item in items:
        if os.path.isdir(item):
            found += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise CommandError(f"image not found: {item}")
    if not found:
        raise CommandError(f"no images in {' '.join(items)}")
    return found


# ------------------------------------------------------------------------------------------------ commands

def cmd_demo(args) -> int:
    from dualenc import demo

    figures = demo.run(args.out, args.steps, args.seed, quiet=args.json)
    if args.json:
        _print_json(figures)
    else:
        print(demo.table(figures))
    return 0


def cmd_zero_shot(args) -> int:
    import dualenc

    labels = _read_lines(args.labels_file, "labels") if args.labels_file else \
        [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    if len(labels) < 2:
        raise CommandError("give at least two labels: --labels cat,dog or --labels-file FILE")
    templates = _read_lines(args.templates, "templates") if args.templates else dualenc.evaluate.DEFAULT_TEMPLATES
    images = _image_files(args.images)
    config, params, processor = _load_model(args.model)
    classifier = dualenc.zero_shot_classifier(params, config, processor, labels, templates)
    embeds = dualenc.encode_images(params, config, processor, images, batch_size=args.batch_size)
    top, probs = dualenc.zero_shot_predict(embeds, classifier, k=min(args.top_k, len(labels)),
                                           **dualenc.evaluate.zero_shot_logit_rule(params, config))
    results = [{"image": path, "labels": [labels[j] for j in row], "probabilities": [round(float(p), 6) for p in ps]}
               for path, row, ps in zip(images, top, probs)]
    if args.json:
        _print_json(results)
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"])))
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import files

    if bool(args.images) == bool(args.texts):
        raise CommandError("give either --images or --texts")
    if not args.out.endswith(".safetensors"):
        raise CommandError(f"--out must name a .safetensors file, got {args.out}")
    config, params, processor = _load_model(args.model)
    if args.images:
        names = _image_files(args.images)
        embeds = dualenc.encode_images(params, config, processor, names, batch_size=args.batch_size)
        kind = "image"
    else:
        names = _read_lines(args.texts, "texts")
        embeds = dualenc.encode_texts(params, config, processor, names, batch_size=args.batch_size)
        kind = "text"
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        files.write_safetensors(tmp, {"embeddings": np.asarray(embeds, np.float32)},
                                {"kind": kind, "names": json.dumps(names)})
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(names)} {kind} embeddings ({embeds.shape[1]} dims) to {args.out}", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import files

    if not os.path.isfile(args.index):
        raise CommandError(f"index file not found: {args.index}")
    tensors, meta = files.read_safetensors(args.index)
    if "embeddings" not in tensors or "names" not in meta:
        raise CommandError(f"{args.index} is not an embedding file written by `dualenc embed`")
    try:
        names = json.loads(meta["names"])
    except json.JSONDecodeError:
        raise CommandError(f"{args.index}: its names metadata is not valid JSON") from None
    index = np.asarray(tensors["embeddings"], np.float32)
    if index.ndim != 2 or len(names) != len(index):
        raise CommandError(f"{args.index}: {len(names)} names for embeddings of shape {index.shape}")
    config, params, processor = _load_model(args.model)
    if index.shape[1] != config.projection_dim:
        raise CommandError(f"{args.index} holds {index.shape[1]}-dim embeddings, the model makes "
                           f"{config.projection_dim}")
    if args.image:
        query = dualenc.encode_images(params, config, processor, _image_files([args.query]))[0]
    else:
        query = dualenc.encode_texts(params, config, processor, [args.query])[0]
    scores = index @ query
    best = np.argsort(-scores, kind="stable")[:args.top_k]
    results = [{"name": names[i], "score": round(float(scores[i]), 6)} for i in best]
    if args.json:
        _print_json(results)
    else:
        for r in results:
            print(f"{r['score']:.4f}  {r['name']}")
    return 0


def cmd_train(args) -> int:
    import jax

    import dualenc
    from dualenc import data, trainer

    if args.model is not None and (args.vision or args.text):
        raise CommandError("give --model DIR (fine-tune a whole model) or --vision DIR --text DIR (compose towers), "
                           "not both")
    if args.model is None and not (args.vision and args.text):
        raise CommandError("give --model DIR (fine-tune a whole model) or both --vision DIR and --text DIR")
    for flag, path in (("--model", args.model), ("--vision", args.vision), ("--text", args.text)):
        if path is not None and not os.path.isdir(path):
            raise CommandError(f"{flag} model directory not found: {path}")
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise CommandError("--coordinator needs --num-processes and --process-id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # for CPU devices; GPUs use NCCL
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
    dataset = data.read_pairs(args.data, image_root=args.image_root)
    locked = () if args.lock == "none" else (args.lock,)
    checkpoints = os.path.join(args.out, "checkpoints")
    config, params, processor = trainer.start_from(args.vision, args.text, model_path=args.model,
                                                   key=jax.random.key(args.seed), projection_dim=args.projection_dim,
                                                   loss=args.loss, max_length=args.max_length)
    run = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, loss=args.loss,
                              locked=locked, unlocked_layers=args.unlocked_layers, cached=args.cache,
                              seed=args.seed, max_length=processor.tokenizer.max_length,
                              checkpoint_every=args.checkpoint_every, keep=args.keep)
    if not args.resume and trainer.checkpoints(checkpoints):
        raise CommandError(f"{checkpoints} already holds checkpoints: pass --resume to continue, or another --out")
    mesh = dualenc.train.data_mesh() if jax.device_count() > 1 else None
    bar = None
    if not args.quiet and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step, metrics):
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=True)

    try:
        params, last = trainer.fit(config, params, dataset, processor, run, checkpoint_dir=checkpoints,
                                   resume=args.resume, mesh=mesh, callback=progress)
    except jax.errors.JaxRuntimeError as e:
        if not args.coordinator:
            raise
        saved = trainer.checkpoints(checkpoints)
        last_saved = saved[-1][1] if saved else "none yet"
        reason = re.sub(r"(Error dispatching computation: )+", r"\1", " ".join(str(e).split()))[:160]
        print(f"dualenc train: error: process {args.process_id} lost a peer of the distributed run ({reason}); "
              f"restart all {args.num_processes} processes with --resume (last checkpoint: {last_saved})",
              file=sys.stderr, flush=True)
        os._exit(3)  # skip the distributed shutdown barrier, which would wait for the lost process
    if bar is not None:
        bar.close()
    if dataset.skipped:
        print(f"skipped rows of {args.data}: {dict(dataset.skipped)}", file=sys.stderr)
    if jax.process_index() == 0:
        dualenc.save_pretrained(args.out, config, params, processor=processor)
        print(f"trained {args.steps} steps (final loss {last.get('loss', float('nan')):.4f}); model saved to "
              f"{args.out}")
    return 0


def cmd_eval(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import data

    dataset = data.read_pairs(args.data, image_root=args.image_root)
    config, params, processor = _load_model(args.model)
    image_embeds = dualenc.encode_images(params, config, processor, dataset.images, batch_size=args.batch_size)
    text_embeds = dualenc.encode_texts(params, config, processor, dataset.captions, batch_size=args.batch_size)
    figures = dualenc.retrieval_metrics(image_embeds, text_embeds, dataset.caption_image)
    labels = _read_lines(args.labels_file, "labels") if args.labels_file else None
    if labels:
        if dataset.labels is None or not all(dataset.labels):
            raise CommandError(f"{args.data} needs a 'label' for every image to measure zero-shot accuracy")
        truth = list(dataset.labels)
        unknown = sorted({t for t in truth if t not in labels})
        if unknown:
            raise CommandError(f"{args.data} has labels missing from {args.labels_file}: {', '.join(unknown[:10])}")
        classifier = dualenc.zero_shot_classifier(params, config, processor, labels)
        top, _ = dualenc.zero_shot_predict(image_embeds, classifier, **dualenc.zero_shot_logit_rule(params, config))
        figures["zero_shot_accuracy"] = float(np.mean([labels[t] == y for t, y in zip(top[:, 0], truth)]))
    figures.update(images=len(dataset.images), texts=len(dataset.captions), skipped=dict(dataset.skipped))
    if args.json:
        _print_json(figures)
    else:
        for key, value in figures.items():
            print(f"{key:24} {value:.4f}" if isinstance(value, float) else f"{key:24} {value}")
    return 0


# ------------------------------------------------------------------------------------------------ parser

EXAMPLES = {
    "demo": "dualenc demo --steps 2000 --seed 0 --out dualenc-demo",
    "zero-shot": "dualenc zero-shot --model ./my-model --labels cat,dog,bird photos/*.jpg",
    "embed": "dualenc embed --model ./my-model --images photos/ --out photos.safetensors",
    "search": 'dualenc search --model ./my-model --index photos.safetensors "a dog on a beach"',
    "train": "dualenc train --vision ./vit --text ./bert --data pairs.jsonl --lock vision --out ./lit-model",
    "eval": "dualenc eval --model ./lit-model --data test.jsonl --labels-file classes.txt",
}


def _sub(subs, name, func, help_text):
    p = subs.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawTextHelpFormatter,
                        epilog=textwrap.dedent(f"example:\n  {EXAMPLES[name]}"))
    p.set_defaults(func=func)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dualenc", description="A pure-JAX vision-text dual encoder.",
                                  epilog="run `dualenc COMMAND --help` for each command's options and an example")
    subs = top.add_subparsers(dest="command", required=True)
    p = _sub(subs, "demo", cmd_demo, "train a small dual encoder on the embedded digits, evaluate and save it")
    p.add_argument("--out", default="dualenc-demo", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    p = _sub(subs, "zero-shot", cmd_zero_shot, "classify images among labels given as text")
    p.add_argument("--model", required=True, help="a dual encoder directory (weights, config, processor files)")
    p.add_argument("--labels", help="comma-separated class names")
    p.add_argument("--labels-file", help="a file with one class name per line")
    p.add_argument("--templates", help="a file of prompt templates, one per line, each with {} for the label")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("images", nargs="+", help="image files or folders")

    p = _sub(subs, "embed", cmd_embed, "write normalised embeddings of images or texts to a safetensors file")
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", help="image files or folders")
    p.add_argument("--texts", help="a file with one text per line")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--batch-size", type=int, default=32)

    p = _sub(subs, "search", cmd_search, "find the nearest images or texts of an embedding file to a query")
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True, help="an embedding file written by `dualenc embed`")
    p.add_argument("--image", action="store_true", help="the query is an image path, not text")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("query")

    p = _sub(subs, "train", cmd_train, "train contrastively from a vision and a text model (LiT or both towers)")
    p.add_argument("--model", help="a whole dual encoder to fine-tune (VisionTextDualEncoder, CLIP, open_clip, "
                                   "SigLIP, SigLIP 2), keeping its projections and logit scale")
    p.add_argument("--vision", help="or: a vision model directory (ViT, CLIP, SigLIP, SigLIP 2) with its image "
                                    "processor settings")
    p.add_argument("--text", help="and a text model directory (BERT, RoBERTa, CLIP, SigLIP) with tokenizer files; the "
                                  "same SigLIP directory as --vision trains that whole model")
    p.add_argument("--data", required=True, help="image-caption pairs: .jsonl or .csv")
    p.add_argument("--image-root", help="folder the pairs' image paths are relative to (default: the file's)")
    p.add_argument("--out", required=True, help="where the trained model (and checkpoints/) go")
    p.add_argument("--lock", choices=("vision", "text", "none"), default="vision")
    p.add_argument("--unlocked-layers", type=int, default=0, help="train the top N layers of the locked tower")
    p.add_argument("--cache", action="store_true", help="compute the locked vision tower once (LiT cache)")
    p.add_argument("--loss", choices=("clip", "siglip"), default=None,
                   help="contrastive loss (default: the model's own: siglip for SigLIP models, else clip)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--projection-dim", type=int, default=None,
                   help="size of new projections (default: keep the towers' own trained projections when both "
                        "carry one of the same size, as CLIP directories do; else new ones of 512; a whole SigLIP "
                        "model has none)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to train over several processes/hosts")
    p.add_argument("--num-processes", type=int, help="with --coordinator: how many processes take part")
    p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a heartbeat before a lost process stops the run (default: %(default)s)")

    p = _sub(subs, "eval", cmd_eval, "retrieval metrics on image-caption pairs, and zero-shot accuracy with labels")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="image-caption pairs: .jsonl or .csv (a 'label' field for zero-shot)")
    p.add_argument("--image-root")
    p.add_argument("--labels-file", help="class names, one per line, for zero-shot accuracy")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    return top


def _compilation_cache():
    """Keeps compiled programs across runs in a persistent cache, so a second `dualenc zero-shot` on the same
    model skips compiling. DUALENC_COMPILATION_CACHE names the folder (default ~/.cache/dualenc/jax) or, set
    to "off", turns it off; a cache configured through jax's own settings is left as it is."""
    import jax

    where = os.environ.get("DUALENC_COMPILATION_CACHE")
    if (where or "").strip().lower() in ("0", "off", "false", "no") or jax.config.jax_compilation_cache_dir:
        return
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "dualenc", "jax")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return  # an optimisation only: without a writable folder, compile as usual
    if not os.access(where, os.W_OK):
        return
    jax.config.update("jax_compilation_cache_dir", where)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        _compilation_cache()
        return args.func(args)
    except KeyboardInterrupt:
        print("dualenc: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dualenc {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
