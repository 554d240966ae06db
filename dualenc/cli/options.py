"""How the subcommands declare themselves: the help formatter, one subparser per command with its example, and
the option groups several commands share."""

from __future__ import annotations

import argparse
import textwrap


class Formatter(argparse.RawTextHelpFormatter):
    """Keeps the example's layout, and shows every option's default (none for flags and required options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.required \
                or not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


def subcommand(subs, examples: dict, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its help, its example (examples[name], which runs as written after `dualenc demo`,
    in the same folder) and --debug."""
    example = examples[name]
    p = subs.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter,
                        epilog=textwrap.dedent(f"example (after `dualenc demo`):\n  {example}"))
    p.set_defaults(func=func, example=example)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


PRECISIONS = ("float32", "bfloat16")


def images_options(p, what: str = "images") -> None:
    p.add_argument("--batch-size", type=int, default=32,
                   help=f"{what} per forward pass, split over this process's devices: rounded up to a multiple of "
                        f"their count (a note says so)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, list it on stderr and count it)")


def data_options(p) -> None:
    p.add_argument("--image-root", help="folder the pairs' image paths are relative to (default: the caption "
                                        "file's folder)")
    p.add_argument("--allow-outside", action="store_true",
                   help="accept image paths outside the data folder (absolute, or climbing out with ..); "
                        "they are skipped and counted otherwise")


def precision_option(p) -> None:
    """--precision {float32,bfloat16}, the compute dtype of the matmuls (precision_dtype gives the model
    functions' dtype= for it)."""
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="compute dtype of the matmuls: bfloat16 is faster on accelerators and on CPUs with AMX; "
                        "params, LayerNorm, softmax and the normalised embeddings stay float32")


def precision_dtype(name: str):
    """The model functions' dtype= for a --precision name: None for float32 (their default), jnp.bfloat16."""
    if name not in PRECISIONS:
        from dualenc.cli.support import CommandError

        raise CommandError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "float32":
        return None
    import jax.numpy as jnp

    return jnp.bfloat16


def device_batch(batch_size: int, command: str, flag: str = "--batch-size") -> int:
    """A batch size checked (at least 1) and rounded up to a multiple of this process's devices, which split
    every batch (dualenc.encode.device_rows); a note on stderr says when it was rounded."""
    import jax

    from dualenc import encode
    from dualenc.cli.support import at_least, note

    at_least(batch_size, flag)
    rows = encode.device_rows(batch_size)
    if rows != batch_size:
        note(command, f"{flag} {batch_size} rounded up to {rows}, a multiple of the {jax.local_device_count()} "
                      f"devices each batch is split over")
    return rows
