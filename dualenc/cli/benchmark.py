"""`dualenc eval --benchmark`: CLIP_benchmark's tasks on a list of datasets, one results JSON each in its layout,
one table on stdout, and a figure per dataset."""

from __future__ import annotations

import os
import warnings

from dualenc.cli.support import CommandError, CompileNotice, note, print_json, require

TASK_CHOICES = ("auto", "zeroshot_classification", "zeroshot_retrieval", "linear_probe")
RECALL_CURVE = (1, 2, 3, 5, 10, 20, 50, 100)


def benchmark_options(p) -> None:
    """The options of `dualenc eval` that only --benchmark uses."""
    p.add_argument("--benchmark", nargs="+", metavar="DATASET",
                   help="evaluate as CLIP_benchmark does on these datasets (instead of --data): folders in its "
                        "webdataset layout (ROOT/test/0.tar, nshards.txt, classnames.txt, ...), image folders "
                        "per class, dualenc JSONL files, or hub dataset ids such as clip-benchmark/wds_cars "
                        "(from the hub cache when offline); writes one CLIP_benchmark results JSON each to --out "
                        "and prints one table")
    p.add_argument("--task", choices=TASK_CHOICES, default="auto",
                   help="with --benchmark: the task (auto: each dataset's own, from its dataset_type.txt)")
    p.add_argument("--split", default="test", help="with --benchmark: the split evaluated")
    p.add_argument("--train-split", default="train", help="with --task linear_probe: the split the probe fits on")
    p.add_argument("--val-split", help="with --task linear_probe: the split its weight decay is swept on (none: "
                                       "weight decay 0, as CLIP_benchmark without a validation split)")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], help="with --benchmark: retrieval's k's")
    p.add_argument("--classnames", help="with --benchmark: class names for datasets without their own: a file (one "
                                        "per line) or a built-in dataset name (imagenet1k, flowers, pets, ...)")
    p.add_argument("--templates", help="with --benchmark: prompt templates ({c} or {} for the class name) for "
                                       "datasets without their own: a file (one per line), a built-in dataset "
                                       "name, or a template set (openai_imagenet: the CLIP paper's 80, which "
                                       "is also the default)")
    p.add_argument("--fewshot-k", type=int, default=-1, help="with --task linear_probe: images per class (-1: all)")
    p.add_argument("--fewshot-epochs", type=int, default=10, help="with --task linear_probe: epochs of each fit")
    p.add_argument("--fewshot-lr", type=float, default=0.1, help="with --task linear_probe: AdamW's learning rate")
    p.add_argument("--seed", type=int, default=0, help="with --task linear_probe: the seed of its draws")


# the options --benchmark alone uses, with their defaults
ONLY_BENCHMARK = {"task": "auto", "split": "test", "train_split": "train", "val_split": None, "recall_k": [1, 5, 10],
                  "classnames": None, "templates": None, "fewshot_k": -1, "fewshot_epochs": 10, "fewshot_lr": 0.1,
                  "seed": 0}


def check_modes(args) -> None:
    """Exactly one of --data and --benchmark; the benchmark's options only with it."""
    if bool(args.data) == bool(args.benchmark):
        raise CommandError("give --data (image-caption pairs) or --benchmark DATASET ... (CLIP_benchmark's "
                           "datasets), not both" if args.data else "give --data FILE or --benchmark DATASET ...")
    if not args.benchmark:
        changed = [name for name, default in ONLY_BENCHMARK.items() if getattr(args, name) != default]
        if changed:
            raise CommandError(f"--{changed[0].replace('_', '-')} applies to --benchmark only")
    else:
        for name in ("labels_file", "image_root"):
            if getattr(args, name):
                raise CommandError(f"--{name.replace('_', '-')} applies to --data only")


def _check(args) -> None:
    from dualenc.cli.support import at_least

    if any(k < 1 for k in args.recall_k):
        raise CommandError(f"--recall-k must be positive integers, got {args.recall_k}")
    at_least(args.fewshot_epochs, "--fewshot-epochs")
    if args.fewshot_k == 0 or args.fewshot_k < -1:
        raise CommandError(f"--fewshot-k must be -1 (every image) or a positive count, got {args.fewshot_k}")
    if not args.fewshot_lr > 0:
        raise CommandError(f"--fewshot-lr must be positive, got {args.fewshot_lr}")
    if args.val_split and args.task != "linear_probe":
        raise CommandError("--val-split applies to --task linear_probe only")


def cmd_benchmark(args, batch_size: int, dtype) -> int:
    from dualenc.benchmark import datasets, run
    from dualenc.errors import DualEncError

    _check(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f"--out {args.out} exists and is not a folder")
    if not args.no_figure:
        require("matplotlib", "demo", "the figures", "pass --no-figure")

    def open_split(dataset: str, split: str):
        try:
            return datasets.open_benchmark(dataset, split, classnames=args.classnames, templates=args.templates)
        except (DualEncError, FileNotFoundError) as e:
            raise CommandError(f"--benchmark {dataset}: {e}") from None

    # every dataset is opened (its layout, names and templates checked) before any is evaluated
    tests = [open_split(d, args.split) for d in args.benchmark]
    model = run.Model.load(args.model, batch_size=batch_size, dtype=dtype)
    records, figures = [], []
    with CompileNotice("eval") as notice, run.Compiles() as compiles:
        for dataset, data in zip(args.benchmark, tests):
            task = data.task if args.task == "auto" else args.task
            before = compiles.count
            notice.what = f"the towers for {data.name}"
            details: dict = {}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", UserWarning)
                    if task == "zeroshot_classification":
                        found = run.zeroshot_classification(model, data, details=details)
                    elif task == "zeroshot_retrieval":
                        found = run.zeroshot_retrieval(model, data, recall_k=args.recall_k, details=details)
                    else:
                        train = open_split(dataset, args.train_split)
                        val = open_split(dataset, args.val_split) if args.val_split else None
                        found = run.linear_probe(model, train, data, val, fewshot_k=args.fewshot_k,
                                                 epochs=args.fewshot_epochs, lr=args.fewshot_lr, seed=args.seed)
            except DualEncError as e:
                raise CommandError(f"--benchmark {dataset}: {e}") from None
            for said in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
                note("eval", f"{data.name}: {said}")
            record = run.result(data.name, args.model, task, found)
            path = run.write_result(args.out, record)
            records.append(record)
            images = len(details.get("labels", details.get("image_embeds", ())))
            note("eval", f"{data.name} {task}: " + (f"{images:,} images, " if images else "")
                 + f"{compiles.count - before} programs compiled, results in {path}")
            if not args.no_figure and details:
                figures.append(_figure(args.out, record, data, details))
    if args.json:
        print_json({"results": records, "figures": figures})
    else:
        print(run.table(records))
        print(f"results in {args.out}")
    return 0


def _figure(folder: str, record: dict, data, details: dict) -> str:
    """eval.png's panels for one benchmark result: the recall curve (retrieval), or per-class accuracy and the
    confusion matrix (classification; the most confused pairs for many classes)."""
    import numpy as np

    from dualenc import plots
    from dualenc.benchmark import metrics, run

    path = run.output_path(folder, record)[:-len(".json")] + ".png"
    title = f"{record['dataset']}: {record['task']}"
    if "image_embeds" in details:
        found = metrics.retrieval_recall(details["image_embeds"], details["text_embeds"], details["caption_image"],
                                         RECALL_CURVE)
        curve = {}
        for k in RECALL_CURVE:
            curve[f"i2t_R@{k}"] = found[f"text_retrieval_recall@{k}"]
            curve[f"t2i_R@{k}"] = found[f"image_retrieval_recall@{k}"]
        return plots.evaluation(path, retrieval=curve, title=title)
    labels, predictions, names = details["labels"], details["predictions"], list(data.classnames)
    n = len(names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {names[c]: float(confusion[c, c] / confusion[c].sum()) for c in np.unique(labels)}
    return plots.evaluation(path, retrieval=None, per_class=per_class, confusion=(confusion, names), title=title)


def training_options(p) -> None:
    """`dualenc train`'s options for CLIP_benchmark's metrics at --eval-every."""
    g = p.add_argument_group("evaluation during training, as CLIP_benchmark (at --eval-every and after the last "
                             "step; logged to metrics.jsonl, TensorBoard and training.png)")
    g.add_argument("--eval-zeroshot", metavar="DATASET",
                   help="a classification dataset (CLIP_benchmark's webdataset folder, an image folder per class, "
                        "or a hub dataset id): zero-shot acc1, acc5 and mean per-class recall")
    g.add_argument("--eval-retrieval", metavar="DATASET",
                   help="a captioned dataset (CLIP_benchmark's webdataset folder or a hub dataset id): image and "
                        "text retrieval recall@1/5/10")
    g.add_argument("--eval-split", default="test", help="the split of --eval-zeroshot and --eval-retrieval")


def training_sets(args) -> dict:
    """{"zeroshot": BenchmarkSet, "retrieval": BenchmarkSet} for the datasets given (opened and checked now,
    before training starts)."""
    from dualenc.benchmark import datasets
    from dualenc.errors import DualEncError

    sets = {}
    for kind, flag, task in (("zeroshot", "--eval-zeroshot", "zeroshot_classification"),
                             ("retrieval", "--eval-retrieval", "zeroshot_retrieval")):
        dataset = getattr(args, flag[2:].replace("-", "_"))
        if not dataset:
            continue
        try:
            data = datasets.open_benchmark(dataset, args.eval_split)
        except (DualEncError, FileNotFoundError) as e:
            raise CommandError(f"{flag} {dataset}: {e}") from None
        if data.task != task:
            raise CommandError(f"{flag} {dataset}: a {data.task.replace('zeroshot_', '')} dataset; {flag} needs a "
                               f"{task.replace('zeroshot_', '')} one")
        sets[kind] = data
    return sets


def training_figures(sets: dict, config, params, processor, batch_size: int) -> dict:
    """The metrics of `sets` for the params of a step: {"zeroshot/acc1", ..., "retrieval/image_retrieval_recall@1",
    ...}."""
    from dualenc import encode
    from dualenc.benchmark import run

    model = run.Model(config, encode.replicate(params), processor, batch_size=batch_size)
    figures = {}
    if "zeroshot" in sets:
        found = run.zeroshot_classification(model, sets["zeroshot"], progress=False)
        figures.update({f"zeroshot/{k}": v for k, v in found.items()})
    if "retrieval" in sets:
        found = run.zeroshot_retrieval(model, sets["retrieval"], progress=False)
        figures.update({f"retrieval/{k}": v for k, v in found.items()})
    return figures
