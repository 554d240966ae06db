"""Runs `dualenc ARGS...` as the console script does, as if only some distributions were installed: modules
whose files belong to the distributions listed in $DUALENC_BLOCKED_FILES (a JSON list of their real paths) are
refused with ModuleNotFoundError, as in a virtual environment without them. Tests use it to run the README's
commands on what `pip install dualenc[demo]` installs."""

import importlib.abc
import json
import os
import sys

with open(os.environ["DUALENC_BLOCKED_FILES"]) as f:
    BLOCKED = frozenset(json.load(f))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.origin and os.path.realpath(spec.origin) in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
        return spec


sys.meta_path.insert(0, NotInstalled())

from dualenc.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
