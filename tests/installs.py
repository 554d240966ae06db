"""What an install of dualenc with some extras puts on the machine, and which installed distribution each
imported module file belongs to: the test that every command runs on README's install uses both."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sysconfig

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


def file_owners() -> dict[str, str]:
    """{real path of an installed .py / .so file: canonical name of the distribution that installed it}."""
    owners = {}
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.suffix in (".py", ".so", ".pyd"):
                owners[os.path.realpath(dist.locate_file(file))] = canonical(dist.metadata["Name"])
    return owners


def outside(modules: dict[str, str | None], allowed: set[str], owners: dict[str, str], own_tree: str) -> dict:
    """{distribution: [modules]} for the modules imported from a distribution outside `allowed` (the standard
    library, modules without a file and the files under `own_tree`, the package's source, are not counted)."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    own_tree = os.path.realpath(own_tree)
    extra: dict[str, list[str]] = {}
    for name, file in modules.items():
        if not file:
            continue
        path = os.path.realpath(file)
        if path.startswith(own_tree + os.sep):
            continue
        owner = owners.get(path)
        if owner is None:
            if any(path.startswith(s + os.sep) for s in stdlib) and "site-packages" not in path:
                continue
            owner = f"no installed distribution ({path})"
        if owner not in allowed:
            extra.setdefault(owner, []).append(name)
    return extra
