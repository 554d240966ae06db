"""What an install of dualenc with some extras puts on the machine, and the files of everything else: the test
that every command runs on README's install runs them with those files unimportable (tests/as_installed.py)."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> set[str]:
    """The canonical names of `root` and every distribution `root[extras]` requires, transitively, as pip would
    install them (requirements with markers for other platforms or Python versions left out)."""
    found: set[str] = set()
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonical(name), wanted) in done:
            continue
        done.add((canonical(name), wanted))
        found.add(canonical(name))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # required but not installed here: nothing can be imported from it
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *wanted}):
                todo.append((req.name, frozenset(req.extras)))
    return found


def blocked_files(allowed: set[str]) -> list[str]:
    """The real paths of the .py / .so files installed by distributions outside `allowed` (canonical names)."""
    found = []
    for dist in metadata.distributions():
        if canonical(dist.metadata["Name"]) in allowed:
            continue
        for file in dist.files or ():
            if file.suffix in (".py", ".so", ".pyd"):
                found.append(os.path.realpath(dist.locate_file(file)))
    return found
