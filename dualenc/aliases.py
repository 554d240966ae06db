"""The old module names of the renovated house, kept working: `import dualenc.trainer` (or
`from dualenc.index import search`) still works, warns once per import with the new name, and forwards every
attribute to the module (or modules) that now hold it. Nothing in dualenc uses these names."""

from __future__ import annotations

import sys
import types
import warnings

# old name -> the modules that now hold what it held (looked up in order)
MOVED = {
    "dualenc.trainer": ("dualenc.train.loop", "dualenc.formats.assembly"),
    "dualenc.runlog": ("dualenc.train.runlog",),
    "dualenc.datasets": ("dualenc.data",),
    "dualenc.datasets.captions": ("dualenc.data.captions",),
    "dualenc.datasets.records": ("dualenc.data.records",),
    "dualenc.datasets.webdataset": ("dualenc.data.webdataset",),
    "dualenc.datasets.prepare": ("dualenc.data.prepare",),
    "dualenc.datasets.pipeline": ("dualenc.data.pipeline",),
    "dualenc.datasets.features": ("dualenc.train.lit_cache",),
    "dualenc.index": ("dualenc.search.index",),
    "dualenc.index_file": ("dualenc.search.store",),
    "dualenc.ann": ("dualenc.search.ann",),
    "dualenc.figures": ("dualenc.plots",),
    "dualenc.naflex": ("dualenc.towers.siglip2",),
    "dualenc.towers.naflex": ("dualenc.towers.siglip2",),
    "dualenc.towers.common": ("dualenc.towers.inputs",),
    "dualenc.processing.openclip": ("dualenc.processing.open_clip",),
    "dualenc.processing.common": ("dualenc.processing.pixels",),
}
PACKAGES = {"dualenc.datasets"}


class MovedModuleWarning(FutureWarning):
    """A module was imported by a name it had before dualenc's rooms were renamed."""


def module(old: str) -> types.ModuleType:
    """A module standing for `old`: its attributes are the new modules'. Warns with the new name."""
    targets = MOVED[old]
    warnings.warn(f"{old} is now {' and '.join(targets)}; the old name will be removed",
                  MovedModuleWarning, stacklevel=3)
    proxy = types.ModuleType(old, f"Moved: see {', '.join(targets)}.")

    def __getattr__(name):
        for target in targets:
            held = _load(target)
            if hasattr(held, name):
                return getattr(held, name)
        raise AttributeError(f"module {old!r} (now {', '.join(targets)}) has no attribute {name!r}")

    def __dir__():
        return sorted({n for target in targets for n in dir(_load(target))})

    proxy.__getattr__, proxy.__dir__ = __getattr__, __dir__
    if old in PACKAGES:
        proxy.__path__ = []
    return proxy


class _Finder:
    """On sys.meta_path: finds only the old names, whose module is made by `module`."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return type(__spec__)(fullname, _Finder)  # a ModuleSpec, without importing importlib

    @staticmethod
    def create_module(spec):
        return module(spec.name)

    @staticmethod
    def exec_module(proxy):
        pass


def _load(name: str) -> types.ModuleType:
    """The new module `name`, imported now; every import written out (tests/test_security.py)."""
    if name == "dualenc.train.loop":
        import dualenc.train.loop
    elif name == "dualenc.formats.assembly":
        import dualenc.formats.assembly
    elif name == "dualenc.train.runlog":
        import dualenc.train.runlog
    elif name == "dualenc.train.lit_cache":
        import dualenc.train.lit_cache
    elif name.startswith("dualenc.data"):
        import dualenc.data  # all of its modules
    elif name == "dualenc.search.index":
        import dualenc.search.index
    elif name == "dualenc.search.store":
        import dualenc.search.store
    elif name == "dualenc.search.ann":
        import dualenc.search.ann
    elif name == "dualenc.plots":
        import dualenc.plots
    elif name.startswith("dualenc.towers"):
        import dualenc.towers  # all of its modules
    elif name.startswith("dualenc.processing."):
        import dualenc.processing.open_clip, dualenc.processing.pixels  # noqa: E401,F401
    return sys.modules[name]


if not any(isinstance(f, type) and f.__name__ == "_Finder" and f.__module__ == __name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder)  # before the path finders: a stale folder of an old name must not win
