"""Runs `dualenc ARGS...` as the console script does and, at exit, writes the names of every module it imported
(JSON) to the file named by $DUALENC_RECORD_IMPORTS: tests compare them with what the README's install gives."""

import atexit
import json
import os
import sys


def _write():
    with open(os.environ["DUALENC_RECORD_IMPORTS"], "w") as f:
        json.dump({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}, f)


atexit.register(_write)

from dualenc.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
