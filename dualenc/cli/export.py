"""`dualenc export`: a model's image and text encoders as jax.export programs (and ONNX graphs) in a folder."""

from __future__ import annotations

import os

from dualenc.cli.options import subcommand
from dualenc.cli.support import CommandError, load_model


def cmd_export(args) -> int:
    from dualenc.errors import InputError
    from dualenc.export import bundle

    try:
        import flatbuffers  # noqa: F401  (jax.export's serialization)
    except ImportError:
        raise CommandError("dualenc export needs flatbuffers: pip install 'dualenc[export]'") from None
    if args.onnx:
        try:
            import jax2onnx  # noqa: F401
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise CommandError("--onnx needs jax2onnx, onnx and onnxruntime: pip install 'dualenc[onnx]'") from None
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise CommandError(f"--out {args.out} is not empty: give another folder, or --force to replace it")
    config, params, processor = load_model(args.model)
    try:
        manifest = bundle.export_encoders(args.out, config, params, processor, onnx=args.onnx, force=args.force,
                                          batch_sizes=args.batch_sizes, platforms=args.platforms,
                                          source=args.model)
    except InputError as e:
        raise CommandError(str(e).replace("out ", "--out ", 1).replace("batch_sizes", "--batch-sizes", 1)) from None
    for side, checks in manifest["checks"].items():
        worst = ", ".join(f"{fmt} {max(by_batch.values()):.1e}" for fmt, by_batch in checks.items())
        print(f"{side} encoder: largest difference from dualenc at batch {', '.join(map(str, args.batch_sizes))}: {worst}")
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    return 0


EXAMPLES = {
    "export": "dualenc export --model dualenc-demo/model --out dualenc-export",
}


def _batch_size(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subs) -> None:
    """Adds export to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "export", cmd_export,
                   "write the model's image and text encoders as jax.export programs (weights in .npz files beside "
                   "them; run with jax alone, no dualenc) and, with --onnx, as ONNX graphs, with the tokenizer and "
                   "preprocessor files and a manifest.json; each is checked against dualenc's embeddings")
    p.add_argument("--model", required=True, help="a dual encoder directory (or Hugging Face model id)")
    p.add_argument("--out", required=True, help="folder to write (atomically); must not exist or be empty")
    p.add_argument("--onnx", action="store_true", help="also write ONNX graphs (pip install 'dualenc[onnx]')")
    p.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--batch-sizes", type=_batch_size, nargs="+", default=[1, 8], metavar="N",
                   help="batch sizes at which each exported encoder is checked against dualenc (the batch size "
                        "of the exported encoders stays symbolic)")
    p.add_argument("--platforms", nargs="+", default=["cpu", "cuda", "tpu"], choices=["cpu", "cuda", "tpu"],
                   help="the platforms the jax.export programs are lowered for")
