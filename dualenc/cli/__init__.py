"""The `dualenc` command: demo, zero-shot, embed, search, train, eval.

common.py holds what the subcommands share, inference.py the ones that use a model, training.py `train`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from dualenc.cli.common import CommandError
from dualenc.cli.index import cmd_embed, cmd_merge, cmd_search
from dualenc.cli.inference import cmd_demo, cmd_eval, cmd_zero_shot
from dualenc.cli.prepare import cmd_prepare
from dualenc.cli.training import cmd_train

# Each runs as written after `dualenc demo` (its default --out, dualenc-demo), in the same folder.
EXAMPLES = {
    "demo": "dualenc demo --steps 2000 --seed 0 --out dualenc-demo",
    "zero-shot": "dualenc zero-shot --model dualenc-demo/model --labels-file dualenc-demo/data/labels.txt "
                 "dualenc-demo/data/images/test",
    "embed": "dualenc embed --model dualenc-demo/model --images dualenc-demo/data/images/test --out digits.safetensors",
    "search": 'dualenc search --model dualenc-demo/model --index digits.safetensors "a photo of the digit seven" '
              '"the number 3"',
    "merge": "dualenc merge digits.safetensors --out digits-all.safetensors --ann",
    "train": "dualenc train --model dualenc-demo/model --data dualenc-demo/data/train.jsonl --eval-data "
             "dualenc-demo/data/test.jsonl --steps 100 --eval-every 50 --out dualenc-tuned",
    "eval": "dualenc eval --model dualenc-demo/model --data dualenc-demo/data/test.jsonl --labels-file "
            "dualenc-demo/data/labels.txt --out dualenc-eval",
    "prepare": "dualenc prepare dualenc-demo/data/train.jsonl --out dualenc-prepared --records-per-shard 500",
}


class _Formatter(argparse.RawTextHelpFormatter):
    """Keeps the example's layout, and shows every option's default (none for flags and required options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.required \
                or not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


def _sub(subs, name, func, help_text):
    p = subs.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter,
                        epilog=textwrap.dedent(f"example (after `dualenc demo`):\n  {EXAMPLES[name]}"))
    p.set_defaults(func=func)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _images_options(p, what="images"):
    p.add_argument("--batch-size", type=int, default=32, help=f"{what} per forward pass")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, list it on stderr and count it)")


def _data_options(p):
    p.add_argument("--image-root", help="folder the pairs' image paths are relative to (default: the caption "
                                        "file's folder)")
    p.add_argument("--allow-outside", action="store_true",
                   help="accept image paths outside the data folder (absolute, or climbing out with ..); "
                        "they are skipped and counted otherwise")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dualenc", description="A pure-JAX vision-text dual encoder.",
                                  epilog="run `dualenc COMMAND --help` for each command's options and an example; "
                                         "start with `dualenc demo`")
    subs = top.add_subparsers(dest="command", required=True)
    p = _sub(subs, "demo", cmd_demo, "train a small dual encoder on the embedded digits, evaluate it, and save it "
                                     "with the digits as image and caption files")
    p.add_argument("--out", default="dualenc-demo", help="output folder: model/, data/, demo.png")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    p = _sub(subs, "zero-shot", cmd_zero_shot, "classify images among labels given as text")
    p.add_argument("--model", required=True, help="a dual encoder directory (weights, config, processor files)")
    p.add_argument("--labels", help="comma-separated class names")
    p.add_argument("--labels-file", help="a file with one class name per line")
    p.add_argument("--templates", help="a file of prompt templates, one per line, each with {} for the label "
                                       "(default: a small built-in set)")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per image (all of them if fewer)")
    _images_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: results, skipped images, the logit "
                                                       "scale used")
    p.add_argument("images", nargs="+", help="image files or folders (walked recursively, in sorted order)")

    p = _sub(subs, "embed", cmd_embed, "write normalised embeddings of images or texts to a safetensors file (and "
                                       "their names beside it), streamed a batch at a time")
    p.add_argument("--model", required=True, help="a dual encoder directory")
    p.add_argument("--images", nargs="+", help="image files or folders (walked recursively, in sorted order); or "
                                               "webdataset tars ('data/{00000..00009}.tar', 'data/*.tar'); or a "
                                               "folder written by `dualenc prepare` (ArrayRecord)")
    p.add_argument("--texts", help="or: a file with one text per line")
    p.add_argument("--out", required=True, help="the .safetensors file to write (NAME.names.jsonl goes beside it)")
    p.add_argument("--shard", metavar="I/N", help="embed only the I-th (from 0) of N contiguous slices of the "
                                                  "sorted inputs; `dualenc merge` joins the N parts (default: all; "
                                                  "under jax.distributed, this process's slice, written to "
                                                  "NAME-0000I-of-0000N.safetensors)")
    p.add_argument("--ann", action="store_true", help="also build the approximate-search index NAME.faiss "
                                                      "(needs dualenc[search]) and print its recall@10")
    _images_options(p, "images or texts")
    p.add_argument("--json", action="store_true", help="print one JSON object: what was written and skipped")

    p = _sub(subs, "search", cmd_search, "find the nearest images or texts of an embedding file to queries")
    p.add_argument("--model", required=True, help="the dual encoder that wrote the index")
    p.add_argument("--index", required=True, help="an embedding file written by `dualenc embed`")
    p.add_argument("--image", action="store_true", help="the queries are image paths, not texts")
    p.add_argument("--top-k", type=int, default=5, help="results per query")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ann", action="store_true", help="search the ANN index NAME.faiss (built by embed or merge "
                                                        "--ann; default: it is used when there is one, the index "
                                                        "holds 200,000 rows or more and the ANN's measured recall@10 "
                                                        "is at least 0.9)")
    how.add_argument("--exact", action="store_true", help="search every row, even where an ANN index would be used")
    p.add_argument("--json", action="store_true", help="print a JSON list: each query with its results and the "
                                                       "search used")
    p.add_argument("query", nargs="+", help="one or more queries (the model loads once)")

    p = _sub(subs, "merge", cmd_merge, "join embedding files (the shards of `dualenc embed --shard`, in order) into "
                                       "one, streamed")
    p.add_argument("parts", nargs="+", metavar="PART", help="embedding files; shards all N of them, 0 to N-1")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--ann", action="store_true", help="also build the approximate-search index NAME.faiss "
                                                      "(needs dualenc[search]) and print its recall@10")
    p.add_argument("--json", action="store_true", help="print one JSON object: what was written")

    p = _sub(subs, "train", cmd_train, "train contrastively: fine-tune a whole dual encoder, or compose one from a "
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
    _data_options(p)
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (0: threads of the training "
                                                          "process)")
    p.add_argument("--out", required=True, help="where the trained model, checkpoints/, metrics.jsonl and "
                                                "training.png go")
    p.add_argument("--lock", choices=("vision", "text", "none"), default="vision", help="the tower kept as it is")
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
    p.add_argument("--keep", type=int, default=3, help="training checkpoints kept")
    p.add_argument("--seed", type=int, default=0, help="random seed (new params, data order, dropout)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines and metrics.jsonl records "
                                                             "(0: none)")
    p.add_argument("--eval-data", help="held-out image-caption pairs to evaluate on (retrieval recall; zero-shot "
                                       "accuracy when every image has a label)")
    p.add_argument("--eval-image-root", help="folder --eval-data's image paths are relative to (default: its "
                                             "file's folder)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (with "
                                                               "--eval-data; also after the last step)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to "
                                                              "OUT/tensorboard (needs dualenc[tensorboard])")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines (the start summary stays)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to train over several processes/hosts")
    p.add_argument("--num-processes", type=int, help="with --coordinator: how many processes take part")
    p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a heartbeat before a lost process stops the run")

    p = _sub(subs, "eval", cmd_eval, "retrieval metrics on image-caption pairs, and zero-shot accuracy with labels; "
                                     "writes metrics.json and eval.png")
    p.add_argument("--model", required=True, help="a dual encoder directory")
    p.add_argument("--data", required=True, help="image-caption pairs: .jsonl or .csv (with a 'label' field, texts "
                                                 "are relevant to every image of their label)")
    _data_options(p)
    p.add_argument("--labels-file", help="class names, one per line, for zero-shot accuracy")
    p.add_argument("--out", default="dualenc-eval", help="folder for metrics.json and eval.png")
    _images_options(p, "images or texts")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    p = _sub(subs, "prepare", cmd_prepare, "convert webdataset tars and caption files (.jsonl, .csv, .tsv) to "
                                           "ArrayRecord shards with a manifest, for fast random access; a rerun "
                                           "resumes")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="tar shards (patterns such as 'data/{00000..00009}.tar' "
                                                              "or 'data/*.tar') and caption files")
    p.add_argument("--out", required=True, help="the folder for the shards and manifest.json (new, empty, or an "
                                                "unfinished run of the same inputs)")
    p.add_argument("--records-per-shard", type=int, default=50_000, help="records per shard of a caption file (each "
                                                                         "tar becomes one shard)")
    _data_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: records, skipped, shards")
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
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    args.argv = argv  # for messages that give a command to run next (train's --resume)
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
