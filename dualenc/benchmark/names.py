"""CLIP_benchmark's English class names and zero-shot templates of its standard datasets (shipped in data/).

en_classnames.json and en_zeroshot_classification_templates.json are CLIP_benchmark's files as it ships them
(MIT license, data/LICENSE-CLIP_benchmark.txt); torchvision_classnames.json adds CIFAR-10 and CIFAR-100, whose names
CLIP_benchmark takes from torchvision. Templates keep CLIP_benchmark's "{c}" for the class name
(dualenc.templates.fill fills it).

DATASETS (the names with both class names and templates) and IMAGENET_CLASSNAMES are read on first use.
"""

from __future__ import annotations

import difflib
import functools
import json
import os

from dualenc.errors import InputError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CLASSNAME_FILES = ("en_classnames.json", "torchvision_classnames.json")
TEMPLATE_FILE = "en_zeroshot_classification_templates.json"
# CLIP_benchmark's dataset prefixes: "wds/cars" is looked up as "wds/cars", then "cars"
PREFIXES = ("wds/", "vtab/", "tfds/")


@functools.cache
def _table(what: str) -> dict[str, tuple[str, ...]]:
    out = {}
    for name in (CLASSNAME_FILES if what == "classnames" else (TEMPLATE_FILE,)):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            out.update({k: tuple(v) for k, v in json.load(f).items()})
    return out


def _lookup(what: str, dataset: str) -> list[str]:
    table = _table(what)
    if not isinstance(dataset, str):
        raise InputError(f"dataset must be a string naming one of CLIP_benchmark's datasets, got {dataset!r}")
    keys = [dataset] + [dataset[len(p):] for p in PREFIXES if dataset.startswith(p)]
    for key in keys:
        if key in table:
            return list(table[key])
    close = difflib.get_close_matches(keys[-1], list(table), n=3, cutoff=0.6)
    other = "templates" if what == "classnames" else "classnames"
    hint = (f"; CLIP_benchmark has {other} but no {what} for it" if any(k in _table(other) for k in keys) else "")
    raise InputError(f"no built-in {what} for dataset {dataset!r}{hint}"
                     + (f"; close: {', '.join(close)}" if close else "")
                     + f" (known: {len(table)} datasets, e.g. {', '.join(sorted(table)[:4])}, ...)")


def classnames(dataset: str) -> list[str]:
    """The class names of one of CLIP_benchmark's datasets ("imagenet1k", "cifar10", "wds/cars" as "cars", ...),
    in label order. An unknown name is an InputError listing close matches."""
    return _lookup("classnames", dataset)


def templates(dataset: str) -> list[str]:
    """CLIP_benchmark's zero-shot templates of a dataset, each with one "{c}" for the class name."""
    return _lookup("templates", dataset)


def __getattr__(name: str):
    if name == "DATASETS":
        return tuple(sorted(set(_table("classnames")) & set(_table("templates"))))
    if name == "IMAGENET_CLASSNAMES":
        return _table("classnames")["imagenet1k"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
