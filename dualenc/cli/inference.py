"""The subcommands that use a model: demo, zero-shot, embed, search, eval."""

from __future__ import annotations

import json
import os
import sys

from dualenc.cli.common import (CommandError, encode_readable, image_files, load_model, note, outside_hint,
                                print_json, read_lines, relevance, shown, warn_unknown_words)

RECALL_CURVE = (1, 2, 3, 5, 10, 20, 50, 100)


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

    labels = read_lines(args.labels_file, "labels") if args.labels_file else \
        [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    if len(labels) < 2:
        raise CommandError("give at least two labels: --labels cat,dog or --labels-file FILE")
    templates = read_lines(args.templates, "templates") if args.templates else dualenc.evaluate.DEFAULT_TEMPLATES
    images = image_files(args.images)
    config, params, processor = load_model(args.model)
    warn_unknown_words(processor, labels, "labels", "zero-shot")
    classifier = dualenc.zero_shot_classifier(params, config, processor, labels, templates)
    embeds, kept, skipped = encode_readable(params, config, processor, images, batch_size=args.batch_size,
                                            strict=args.strict, command="zero-shot")
    rule = dualenc.zero_shot_logit_rule(params)
    top, probs = dualenc.zero_shot_predict(embeds, classifier, k=args.top_k, **rule)
    results = [{"image": shown(path), "labels": [labels[j] for j in row], "probabilities": [round(float(p), 6)
                                                                                           for p in ps]}
               for path, row, ps in zip(kept, top, probs)]
    if args.json:
        print_json({"results": results, "skipped": skipped, "images": len(images), **rule,
                    "probabilities": "sigmoid" if "logit_bias" in rule else "softmax"})
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"])))
        if skipped:
            print(f"({len(results)} of {len(images)} images classified; {len(skipped)} unreadable, listed on stderr)")
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import files

    if bool(args.images) == bool(args.texts):
        raise CommandError("give either --images or --texts")
    if not args.out.endswith(".safetensors"):
        raise CommandError(f"--out must name a .safetensors file, got {args.out}")
    config, params, processor = load_model(args.model)
    skipped = []
    if args.images:
        names = image_files(args.images)
        embeds, names, skipped = encode_readable(params, config, processor, names, batch_size=args.batch_size,
                                                 strict=args.strict, command="embed")
        kind = "image"
    else:
        names = read_lines(args.texts, "texts")
        embeds = dualenc.encode_texts(params, config, processor, names, batch_size=args.batch_size)
        kind = "text"
    if not len(names):
        raise CommandError("no image could be read: nothing to write")
    names = [shown(n) for n in names]
    # The names go to a sidecar file (one JSON string per line): in the safetensors header, millions of them
    # would pass its size limit only after all the encoding.
    sidecar = names_file(args.out)
    files.write_text_atomic(sidecar, "".join(json.dumps(n) + "\n" for n in names))
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        files.write_safetensors(tmp, {"embeddings": np.asarray(embeds, np.float32)},
                                {"kind": kind, "names_file": os.path.basename(sidecar), "count": str(len(names))})
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if args.json:
        print_json({"out": args.out, "kind": kind, "written": len(names), "dims": int(embeds.shape[1]),
                    "skipped": skipped})
    print(f"wrote {len(names)} {kind} embeddings ({embeds.shape[1]} dims) to {args.out}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""), file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import files

    if not os.path.isfile(args.index):
        raise CommandError(f"index file not found: {args.index}")
    tensors, meta = files.read_safetensors(args.index)
    if "embeddings" not in tensors or not ("names" in meta or "names_file" in meta):
        raise CommandError(f"{args.index} is not an embedding file written by `dualenc embed`")
    names = _read_names(args.index, meta)
    index = np.asarray(tensors["embeddings"], np.float32)
    if index.ndim != 2 or len(names) != len(index):
        raise CommandError(f"{args.index}: {len(names)} names for embeddings of shape {index.shape}")
    config, params, processor = load_model(args.model)
    if index.shape[1] != config.projection_dim:
        raise CommandError(f"{args.index} holds {index.shape[1]}-dim embeddings, the model makes "
                           f"{config.projection_dim}")
    if args.image:
        queries = dualenc.encode_images(params, config, processor, image_files(args.query))
    else:
        warn_unknown_words(processor, args.query, "queries", "search")
        queries = dualenc.encode_texts(params, config, processor, args.query)
    if args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    found = []
    k = min(args.top_k, len(names))
    for query, embed in zip(args.query, queries):
        scores = index @ embed
        best = np.argpartition(-scores, k - 1)[:k]  # the top k without sorting every score
        best = best[np.lexsort((best, -scores[best]))]  # best first; ties by position, as a stable sort
        found.append({"query": shown(query), "results": [{"name": names[i], "score": round(float(scores[i]), 6)}
                                                         for i in best]})
    if args.json:
        print_json(found)
    else:
        for i, item in enumerate(found):
            if len(found) > 1:
                print(("\n" if i else "") + f"{item['query']}:")
            for r in item["results"]:
                print(f"{r['score']:.4f}  {r['name']}")
    return 0


def names_file(index: str) -> str:
    """The sidecar file of an embedding file's names: photos.safetensors -> photos.names.jsonl."""
    return index[:-len(".safetensors")] + ".names.jsonl"


def _read_names(index: str, meta: dict) -> list[str]:
    """An embedding file's names: from its sidecar (named in its metadata, beside it), or from the header, where
    earlier versions kept them."""
    try:
        if "names" in meta:
            names = json.loads(meta["names"])
        else:
            sidecar = meta["names_file"]
            if os.path.basename(sidecar) != sidecar or not sidecar.endswith(".names.jsonl"):
                raise CommandError(f"{index}: its names_file {sidecar!r} must be a .names.jsonl file beside it")
            path = os.path.join(os.path.dirname(os.path.abspath(index)), sidecar)
            if not os.path.isfile(path):
                raise CommandError(f"{index}: its names file {path} is missing")
            with open(path, encoding="utf-8") as f:
                names = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CommandError(f"{index}: its names are not valid JSON") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CommandError(f"{index}: its names must be a list of strings")
    return names


def cmd_eval(args) -> int:
    import numpy as np

    import dualenc
    from dualenc import data, files

    dataset = data.read_pairs(args.data, image_root=args.image_root, allow_outside=args.allow_outside)
    hint = outside_hint(dataset, args.data, args.image_root)
    if hint:
        note("eval", hint)
    config, params, processor = load_model(args.model)
    image_embeds, kept, unreadable = encode_readable(params, config, processor, dataset.images,
                                                     batch_size=args.batch_size, strict=args.strict, command="eval")
    dataset = _keep_images(dataset, kept)
    text_embeds = dualenc.encode_texts(params, config, processor, dataset.captions, batch_size=args.batch_size)
    relevant = relevance(dataset)
    labelled = "image_labels" in relevant
    figures = dualenc.retrieval_metrics(image_embeds, text_embeds, **relevant)
    figures["relevance"] = "same label" if labelled else "own image"
    curve = dualenc.retrieval_metrics(image_embeds, text_embeds, ks=RECALL_CURVE, **relevant)
    per_class = confusion = None
    labels = read_lines(args.labels_file, "labels") if args.labels_file else None
    if labels:
        if not labelled:
            raise CommandError(f"{args.data} needs a 'label' for every image to measure zero-shot accuracy")
        truth = list(dataset.labels)
        unknown = sorted({t for t in truth if t not in labels})
        if unknown:
            raise CommandError(f"{args.data} has labels missing from {args.labels_file}: {', '.join(unknown[:10])}")
        warn_unknown_words(processor, labels, "labels", "eval")
        classifier = dualenc.zero_shot_classifier(params, config, processor, labels)
        top, _ = dualenc.zero_shot_predict(image_embeds, classifier, params=params)
        predicted = [labels[j] for j in top[:, 0]]
        figures["zero_shot_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth)]))
        figures["zero_shot_chance"] = 1.0 / len(labels)
        per_class = {c: float(np.mean([p == c for p, t in zip(predicted, truth) if t == c]))
                     for c in labels if c in truth}
        figures["per_class_accuracy"] = per_class
        where = {c: i for i, c in enumerate(labels)}
        confusion = np.zeros((len(labels), len(labels)), np.int64)
        for p, t in zip(predicted, truth):
            confusion[where[t], where[p]] += 1
    figures.update(images=len(dataset.images), texts=len(dataset.captions), skipped=dict(dataset.skipped),
                   unreadable=unreadable)
    os.makedirs(args.out, exist_ok=True)
    files.write_json_atomic(os.path.join(args.out, "metrics.json"), figures)
    picture = _figure(os.path.join(args.out, "eval.png"), curve, per_class,
                      (confusion, labels) if confusion is not None else None, args.data)
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


def _figure(path, curve, per_class, confusion, title) -> str | None:
    try:
        from dualenc import figures
        return figures.evaluation(path, retrieval=curve, per_class=per_class, confusion=confusion, title=title)
    except ImportError as e:
        note("eval", f"no figure: {e}")
        return None
