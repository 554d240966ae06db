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


def images_options(p, what: str = "images") -> None:
    p.add_argument("--batch-size", type=int, default=32, help=f"{what} per forward pass")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, list it on stderr and count it)")


def data_options(p) -> None:
    p.add_argument("--image-root", help="folder the pairs' image paths are relative to (default: the caption "
                                        "file's folder)")
    p.add_argument("--allow-outside", action="store_true",
                   help="accept image paths outside the data folder (absolute, or climbing out with ..); "
                        "they are skipped and counted otherwise")
