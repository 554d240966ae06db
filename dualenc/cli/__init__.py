"""The `dualenc` command: demo, zero-shot, embed, search, train, eval.

common.py holds what the subcommands share, inference.py the ones that use a model, training.py `train`.
"""

from __future__ import annotations

import argparse
import os
import sys

from dualenc.cli import export, index, inference, interpolate, prepare, serve, training
from dualenc.cli.support import CommandError

# Each module declares its subcommands (options, example) in its register().
COMMAND_MODULES = (inference, index, training, interpolate, prepare, serve, export)
# Each example runs as written after `dualenc demo` (its default --out, dualenc-demo), in the same folder.
EXAMPLES = {name: example for module in COMMAND_MODULES for name, example in module.EXAMPLES.items()}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dualenc", description="A pure-JAX vision-text dual encoder.",
                                  epilog="run `dualenc COMMAND --help` for each command's options and an example; "
                                         "start with `dualenc demo`")
    top.add_argument("--version", action="version", version=version())
    subs = top.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subs)
    return top


def version() -> str:
    import platform

    import jax

    import dualenc

    return f"dualenc {dualenc.__version__} (jax {jax.__version__}, Python {platform.python_version()})"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line parsed; a mistyped command or option is reported by the parser it belongs to (the
    subcommand's usage for its options), with the closest names it knows."""
    top = parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        top.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], commands)} (choose from "
                  f"{', '.join(commands)})")
    if argv and argv[0] in commands:  # before argparse, whose "required" errors would hide a mistyped option
        sub = commands[argv[0]]
        flags = [flag for action in sub._actions for flag in action.option_strings]
        words = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        for word in words:
            name = word.split("=", 1)[0]
            if name.startswith("--") and not any(flag.startswith(name) for flag in flags):
                sub.error(f"unrecognized option {name}{did_you_mean(name, flags)}")
    args, unknown = top.parse_known_args(argv)
    if unknown:
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def did_you_mean(word: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
    args = parse(argv)
    args.argv = argv  # for messages that give a command to run next (train's --resume)
    try:
        _compilation_cache()
        return args.func(args)
    except KeyboardInterrupt:
        print("dualenc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`dualenc search ... | head`): stop quietly, as Unix tools do. Python's own
        # flush at exit would fail again on the closed pipe, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except (CommandError, ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dualenc {args.command}: error: {message}", file=sys.stderr)
        return 2
