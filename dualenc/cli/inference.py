"""The subcommands that use a model: demo, zero-shot, eval (embed and search are in index.py)."""

from __future__ import annotations

import os

from dualenc.cli.support import (CommandError, CompileNotice, at_least, batch_rows, encode_readable, image_files,
                                load_model, note, outside_hint, plural, print_json, read_lines, require,
                                shown, warn_unknown_words)
from dualenc.cli.benchmark import benchmark_options, check_modes, cmd_benchmark
from dualenc.cli.options import (data_options, device_batch, images_options, precision_dtype, precision_option,
                                 subcommand)

RECALL_CURVE = (1, 2, 3, 5, 10, 20, 50, 100)
TEXT_BATCH = 64  # prompts per forward pass of zero-shot's classifier


def cmd_demo(args) -> int:
    from dualenc import demo

    figures = demo.run(args.out, args.steps, args.seed, quiet=args.json)
    if args.json:
        print_json(figures)
    else:
        print(demo.table(figures))
    return 0


def cmd_zero_shot(args) -> int:
    import dualenc
    from dualenc import encode

    labels = read_lines(args.labels_file, "labels") if args.labels_file else \
        [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    if len(labels) < 2:
        raise CommandError("give at least two labels: --labels cat,dog or --labels-file FILE")
    at_least(args.top_k, "--top-k")
    batch_size = device_batch(args.batch_size, "zero-shot")
    dtype = precision_dtype(args.precision)
    templates = _templates(args.templates)
    images = image_files(args.images)
    config, params, processor = load_model(args.model)
    params = encode.replicate(params)  # once for both towers
    warn_unknown_words(processor, labels, ("label", "labels"), "zero-shot")
    with CompileNotice("zero-shot") as notice:
        notice.what = f"the text tower for batch {batch_rows(len(labels) * len(templates), TEXT_BATCH)}"
        classifier = dualenc.zero_shot_classifier(params, config, processor, labels, templates,
                                                  batch_size=TEXT_BATCH, dtype=dtype)
        notice.what = f"the image tower for batch {batch_rows(len(images), batch_size)}"
        embeds, kept, skipped = encode_readable(params, config, processor, images, batch_size=batch_size,
                                                strict=args.strict, command="zero-shot", dtype=dtype)
    rule = dualenc.zero_shot_logit_rule(params)
    top, probs = dualenc.zero_shot_predict(embeds, classifier, k=args.top_k, **rule) if kept else ([], [])
    results = [{"image": shown(path), "labels": [labels[j] for j in row], "probabilities": [round(float(p), 6)
                                                                                           for p in ps]}
               for path, row, ps in zip(kept, top, probs)]
    if args.json:
        print_json({"results": results, "skipped": skipped, "images": len(images), **rule,
                    "probabilities": "sigmoid" if "logit_bias" in rule else "softmax", "precision": args.precision})
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"])))
        if skipped and results:
            print(f"({len(results)} of {plural(len(images), 'image')} classified; {len(skipped)} unreadable, "
                  f"listed on stderr)")
    if not kept:
        note("zero-shot", f"error: no image could be read ({plural(len(images), 'image')} given, listed above as "
                          f"unreadable)")
        return 1
    return 0


def _templates(value: str) -> list[str]:
    """The prompt templates of --templates: a built-in set by name, else a file of them; checked."""
    from dualenc import templates
    from dualenc.errors import InputError

    if value in templates.TEMPLATE_SETS:
        return templates.resolve(value)
    if not os.path.isfile(value):
        raise CommandError(f"--templates {value}: neither a file nor a built-in template set "
                           f"({', '.join(templates.TEMPLATE_SETS)})")
    try:
        return templates.resolve(read_lines(value, "templates"))
    except InputError as e:
        raise CommandError(f"templates file {value}: {e}") from None


def cmd_eval(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import data, encode, files
    from dualenc.benchmark import metrics

    check_modes(args)
    batch_size = device_batch(args.batch_size, "eval")
    dtype = precision_dtype(args.precision)
    if args.benchmark:
        return cmd_benchmark(args, batch_size, dtype)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f"--out {args.out} exists and is not a folder")
    if not args.no_figure:
        require("matplotlib", "demo", "eval.png", "pass --no-figure")
    dataset = data.read_pairs(args.data, image_root=args.image_root, allow_outside=args.allow_outside)
    labels = read_lines(args.labels_file, "labels") if args.labels_file else None
    if labels:
        if "image_labels" not in dataset.relevance():
            raise CommandError(f"{args.data} needs a 'label' for every image to measure zero-shot accuracy")
        unknown = sorted({t for t in dataset.labels if t not in labels})
        if unknown:
            raise CommandError(f"{args.data} has labels missing from {args.labels_file}: {', '.join(unknown[:10])}")
    hint = outside_hint(dataset, args.data, args.image_root)
    if hint:
        note("eval", hint)
    config, params, processor = load_model(args.model)
    params = encode.replicate(params)  # once for both towers
    if labels:
        warn_unknown_words(processor, labels, ("label", "labels"), "eval")
    with CompileNotice("eval") as notice:
        notice.what = f"the image tower for batch {batch_rows(len(dataset.images), batch_size)}"
        image_embeds, kept, unreadable = encode_readable(params, config, processor, dataset.images,
                                                         batch_size=batch_size, strict=args.strict,
                                                         command="eval", dtype=dtype)
        if not kept:
            note("eval", f"error: no image of {args.data} could be read ({plural(len(dataset.images), 'image')}, "
                         f"listed above as unreadable)")
            return 1
        dataset = _keep_images(dataset, kept)
        notice.what = f"the text tower for batch {batch_rows(len(dataset.captions), batch_size)}"
        text_embeds = dualenc.encode_texts(params, config, processor, dataset.captions, batch_size=batch_size,
                                           dtype=dtype)
        if labels:
            prompts = len(labels) * len(dualenc.evaluate.DEFAULT_TEMPLATES)
            notice.what = f"the text tower for batch {batch_rows(prompts, TEXT_BATCH)}"
            classifier = dualenc.zero_shot_classifier(params, config, processor, labels, batch_size=TEXT_BATCH,
                                                      dtype=dtype)
    relevant = dataset.relevance()
    figures = dualenc.retrieval_metrics(image_embeds, text_embeds, **relevant)
    figures["relevance"] = "same label" if "image_labels" in relevant else "own image"
    curve = dualenc.retrieval_metrics(image_embeds, text_embeds, ks=RECALL_CURVE, **relevant)
    per_class = confusion = None
    if labels:
        truth = list(dataset.labels)
        top, _ = dualenc.zero_shot_predict(image_embeds, classifier, params=params)
        predicted = [labels[j] for j in top[:, 0]]
        figures["zero_shot_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth)]))
        where = {c: i for i, c in enumerate(labels)}
        found = metrics.classification_metrics(image_embeds @ classifier, [where[t] for t in truth], len(labels))
        if len(labels) >= 5:  # CLIP_benchmark's acc5 (NaN under 5 classes: left out here)
            figures["zero_shot_top5_accuracy"] = found["acc5"]
        figures["zero_shot_mean_per_class_recall"] = found["mean_per_class_recall"]
        figures["zero_shot_chance"] = 1.0 / len(labels)
        per_class = {c: float(np.mean([p == c for p, t in zip(predicted, truth) if t == c]))
                     for c in labels if c in truth}
        figures["per_class_accuracy"] = per_class
        confusion = np.zeros((len(labels), len(labels)), np.int64)
        for p, t in zip(predicted, truth):
            confusion[where[t], where[p]] += 1
    figures.update(images=len(dataset.images), texts=len(dataset.captions), skipped=dict(dataset.skipped),
                   unreadable=unreadable, precision=args.precision)
    os.makedirs(args.out, exist_ok=True)
    files.write_json_atomic(os.path.join(args.out, "metrics.json"), figures)
    picture = None
    if not args.no_figure:
        from dualenc import plots as drawing

        picture = drawing.evaluation(os.path.join(args.out, "eval.png"), retrieval=curve, per_class=per_class,
                                     confusion=(confusion, labels) if confusion is not None else None,
                                     title=args.data)
    if args.json:
        print_json({**figures, "figure": picture})
    else:
        for key, value in figures.items():
            if key == "per_class_accuracy":
                for name, acc in value.items():
                    print(f"  {name:22} {acc:.4f}")
            elif key != "unreadable":
                print(f"{key:24} {value:.4f}" if isinstance(value, float) else f"{key:24} {value}")
        print(f"metrics and figure in {args.out}" if picture else f"metrics in {args.out}")
    return 0


def _keep_images(dataset, kept: list):
    """The dataset without the images left out of `kept` (unreadable) and their captions."""
    import numpy as np

    from dualenc.data import PairDataset

    if len(kept) == len(dataset.images):
        return dataset
    new_index = {path: i for i, path in enumerate(kept)}
    old = np.asarray([new_index.get(path, -1) for path in dataset.images], np.int64)
    owners = old[dataset.caption_image]
    rows = np.flatnonzero(owners >= 0)
    labels = None if dataset.labels is None else dataset.labels[old >= 0]
    return PairDataset(kept, [dataset.captions[j] for j in rows], owners[rows], labels, dataset.classnames,
                       dataset.skipped)


EXAMPLES = {
    'demo': 'dualenc demo --steps 1000 --seed 0 --out dualenc-demo',
    'zero-shot': 'dualenc zero-shot --model dualenc-demo/model --labels-file dualenc-demo/data/labels.txt dualenc-demo/data/images/test',
    'eval': 'dualenc eval --model dualenc-demo/model --data dualenc-demo/data/test.jsonl --labels-file dualenc-demo/data/labels.txt --out dualenc-eval',
}


def register(subs) -> None:
    """Adds demo, zero-shot, eval to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "demo", cmd_demo, "train a small dual encoder on the embedded digits, evaluate it, and save it "
                                     "with the digits as image and caption files")
    p.add_argument("--out", default="dualenc-demo", help="output folder: model/, data/, demo.png")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    p = subcommand(subs, EXAMPLES, "zero-shot", cmd_zero_shot, "classify images among labels given as text")
    p.add_argument("--model", required=True, help="a dual encoder directory (weights, config, processor files)")
    p.add_argument("--labels", help="comma-separated class names")
    p.add_argument("--labels-file", help="a file with one class name per line")
    p.add_argument("--templates", default="default",
                   help="prompt templates, each with {} for the label: a built-in set (default: dualenc's 18; "
                        "openai_imagenet: the CLIP paper's 80; openai_imagenet_7: the 7 of them CLIP's notebook "
                        "uses), or a file of them, one per line (./NAME for a file named as a set) (default: "
                        "default)")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per image (all of them if fewer)")
    images_options(p)
    precision_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: results, skipped images, the logit "
                                                       "scale and precision used")
    p.add_argument("images", nargs="+", help="image files or folders (walked recursively, in sorted order) or "
                                             "quoted patterns ('photos/**/*.jpg', 'photos/{a,b}/*.png')")

    p = subcommand(subs, EXAMPLES, "eval", cmd_eval, "retrieval metrics on image-caption pairs, and zero-shot accuracy with labels; "
                                     "writes metrics.json and eval.png; or, with --benchmark, CLIP_benchmark's "
                                     "tasks and numbers on its datasets")
    p.add_argument("--model", required=True, help="a dual encoder directory")
    p.add_argument("--data", help="image-caption pairs: .jsonl or .csv (with a 'label' field, texts are relevant "
                                  "to every image of their label)")
    data_options(p)
    p.add_argument("--labels-file", help="class names, one per line, for zero-shot accuracy")
    p.add_argument("--out", default="dualenc-eval", help="folder for metrics.json and eval.png")
    p.add_argument("--no-figure", action="store_true", help="write metrics.json only (eval.png needs matplotlib: "
                                                            "dualenc[demo])")
    images_options(p, "images or texts")
    precision_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    benchmark_options(p)
