"""How orbax's failures are told: one short line, and none of the noise its abandoned reads leave behind."""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import sys

# asyncio's words for a task or future whose exception nobody read: orbax starts a read per array, and when one
# fails the others' failures (kilobytes of TensorStore spec each) are reported this way when they are collected.
_ABANDONED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _Abandoned(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ABANDONED)


@contextlib.contextmanager
def quiet():
    """Runs an orbax call without its absl warnings; if it fails, the reads it abandoned are collected before
    leaving, with the coroutines' "Exception ignored" reports dropped, and asyncio's "never retrieved" reports are
    dropped from then on (orbax's event loop may hold some of those reads until the process exits), so that the
    caller's one-line error is all that is printed."""
    absl = logging.getLogger("absl")  # orbax warns there of what it could not read, before raising
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    except Exception:
        log = logging.getLogger("asyncio")
        if not any(isinstance(f, _Abandoned) for f in log.filters):
            log.addFilter(_Abandoned())
        hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None
        try:
            gc.collect()
        finally:
            sys.unraisablehook = hook
        raise
    finally:
        absl.setLevel(level)


def reason(e: BaseException) -> str:
    """An orbax or TensorStore error in one short line: its first cause's message (orbax's own may hold
    kilobytes of TensorStore spec), without the checkpoint's path."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
