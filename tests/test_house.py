"""The house's rules, as README's "The house" maps them: imports go one way, `import dualenc` is light, the public
names resolve, and the old module names still work (with a warning)."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import dualenc
from dualenc import aliases

PACKAGE = pathlib.Path(dualenc.__file__).parent

# The rooms from the ground floor up: a module may import its own room and the rooms below it, never above.
# The core (errors .. losses) reads no file; files and hub are the I/O floor the outer wings stand on.
FLOORS = [
    {"errors"},
    {"fields", "tables", "kinds", "params"},
    {"layers"},
    {"towers"},
    {"config"},
    {"model", "losses", "lora"},
    {"files", "hub", "layouts"},
    {"processing", "templates"},
    {"formats"},
    {"encode", "data"},
    {"evaluate", "search", "benchmark"},
    {"export"},
    {"train"},
    {"plots"},
    {"demo"},
    {"serve"},
    {"cli"},
]
CORE = set().union(*FLOORS[:6])
SURFACE = {"__init__", "aliases"}  # the public surface and the old names: they name every room, lazily
RANK = {room: i for i, floor in enumerate(FLOORS) for room in floor}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every dualenc module a source file imports, at the top or inside a function, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("dualenc")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dualenc") and not node.level:
            if node.module == "dualenc":  # from dualenc import files, towers: the modules named
                out += [(node.lineno, "dualenc." + a.name) for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_every_room_is_on_a_floor():
    rooms = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    assert rooms - SURFACE - {"__main__"} == set(RANK), "a room was added or removed: put it on a floor here and in README"


def test_imports_go_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        me = _room(".".join(rel.parts))
        if me in SURFACE:
            continue
        for line, target in _imports(path):
            other = _room(target)
            if other in SURFACE and target != "dualenc":
                wrong.append(f"{rel}:{line} imports {target}: nothing inside imports the surface's helpers")
            elif other in RANK and RANK[other] > RANK[me]:
                wrong.append(f"{rel}:{line} ({me}) imports {target} ({other}), a floor above")
            elif me in CORE and other in {"files", "hub", "layouts"}:
                wrong.append(f"{rel}:{line}: the core does no I/O, but imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_takes_another_modules_private_names():
    taken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dualenc"):
                taken += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not taken, "\n".join(taken)


def _loaded(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


HEAVY = ("grain", "orbax", "faiss", "matplotlib", "tensorboardX", "array_record")
OUTER = ("dualenc.cli", "dualenc.train", "dualenc.data", "dualenc.search", "dualenc.formats", "dualenc.demo")


def test_importing_dualenc_or_a_tower_loads_no_training_data_search_or_cli():
    bare = _loaded("import dualenc")
    assert "jax" not in bare and {m for m in bare if m.startswith("dualenc")} <= {"dualenc", "dualenc.aliases"}
    for statement in ("import dualenc.towers.vit", "import dualenc; dualenc.apply; dualenc.DualEncoderConfig"):
        loaded = _loaded(statement)
        assert "jax" in loaded and "dualenc.model" in loaded or "towers.vit" in statement
        assert not {m for m in loaded if m.split(".")[0] in HEAVY}, statement
        assert not {m for m in loaded if m.startswith(OUTER)}, (statement, sorted(m for m in loaded
                                                                                 if m.startswith(OUTER)))


def test_the_tokenizer_and_the_command_line_load_no_model():
    """The tokenizer reads a model's config only when a directory is read; `dualenc --help` imports no jax."""
    for statement in ("import dualenc.processing.text", "import dualenc.processing", "import dualenc.cli"):
        loaded = _loaded(statement)
        assert "jax" not in loaded and "dualenc.config" not in loaded and "dualenc.towers" not in loaded, statement


def test_public_names_resolve_lazily():
    for name in dualenc.__all__:
        assert getattr(dualenc, name) is not None, name
    assert set(dualenc.__all__) <= set(dir(dualenc))
    assert dualenc.train.fit.__module__ == "dualenc.train.loop"
    assert dualenc.vit is sys.modules["dualenc.towers.vit"]
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        dualenc.nonesuch  # noqa: B018


def test_old_module_names_warn_and_forward():
    code = ("import json, sys, warnings\nfrom dualenc import aliases\nout = {}\n"
            "for old in sorted(aliases.MOVED):\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        exec('import ' + old)\n"
            "    m = sys.modules[old]\n"
            "    names = [n for n in dir(m) if not n.startswith('_')]\n"
            "    out[old] = [[str(w.message) for w in caught if w.category is aliases.MovedModuleWarning],\n"
            "                len(names), all(getattr(m, n) is not None for n in names)]\n"
            "print(json.dumps(out))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert set(out) == set(aliases.MOVED)
    for old, (warned, names, resolved) in out.items():
        assert any(w.startswith(old + " is now " + aliases.MOVED[old][0]) for w in warned), (old, warned)
        assert names > 0 and resolved, old


def test_old_names_reach_the_same_objects():
    with pytest.warns(aliases.MovedModuleWarning, match="dualenc.train.loop and dualenc.formats.assembly"):
        old = aliases.module("dualenc.trainer")
    from dualenc.formats import assembly
    from dualenc.train import loop

    assert old.fit is loop.fit and old.start_from is assembly.start_from
    with pytest.raises(AttributeError, match="now dualenc.train.loop"):
        old.nonesuch  # noqa: B018
