"""README.md's Python examples and every command's --help example run as written after `dualenc demo`."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dualenc.cli import EXAMPLES

# One worker runs this module under `-n 2 --dist loadgroup` (the test command), so its module fixtures run once.
pytestmark = pytest.mark.xdist_group("readme")

README = Path(__file__).resolve().parent.parent / "README.md"
DEMO_COMMAND = 'pip install -e ".[demo]" && dualenc demo'
ENV = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's shell has


def run(args, cwd, timeout=300, env=None):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=cwd)
    assert proc.returncode == 0, f"{shlex.join(map(str, args))} failed:\n{proc.stderr[-4000:]}"
    return proc


LAUNCHER = Path(__file__).resolve().parent / "as_installed.py"
_BLOCKED: dict[frozenset, Path] = {}


def blocked_files(extras: set[str], folder: Path) -> Path:
    """A JSON file listing the files of every distribution `pip install dualenc[extras]` would not install."""
    import installs

    key = frozenset(extras)
    if key not in _BLOCKED:
        path = folder / f"blocked-{'-'.join(sorted(extras))}.json"
        path.write_text(json.dumps(installs.blocked_files(installs.closure("dualenc", set(extras)))))
        _BLOCKED[key] = path
    return _BLOCKED[key]


def run_as_installed(args, cwd, extras=("demo",), check=True):
    """Runs `dualenc ARGS` (args[0] == "dualenc") as the console script would on an install of dualenc[extras]
    alone: modules of every other installed distribution are unimportable (tests/as_installed.py)."""
    assert args[0] == "dualenc"
    env = {**ENV, "DUALENC_BLOCKED_FILES": str(blocked_files(set(extras), Path(cwd)))}
    if check:
        return run([sys.executable, LAUNCHER, *args[1:]], cwd, env=env)
    return subprocess.run([sys.executable, LAUNCHER, *args[1:]], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A folder where `dualenc demo` ran as README's first command runs it (default steps and seed), and its
    figures: dualenc-demo/model and dualenc-demo/data."""
    assert shutil.which("dualenc"), "the dualenc console script is installed with the package"
    folder = tmp_path_factory.mktemp("readme")
    figures = json.loads(run_as_installed(["dualenc", "demo", "--json"], folder).stdout)
    return folder, figures


def test_readme_shows_what_the_demo_prints(demo_folder):
    """README's demo table is the demo's output (the same seed gives the same figures), time aside, and the
    time it states is said with the machine it was measured on."""
    from dualenc import demo

    text = README.read_text()
    found = re.search(r"^```\n( +dualenc +chance\n.*?)^```", text[text.index(DEMO_COMMAND):], re.M | re.S)
    assert found, "README.md shows the demo's output in a ``` block after its command"
    shown = found.group(1)
    printed = demo.table(demo_folder[1])
    flat = lambda t: re.sub(r"in \d+(\.\d+)? s;", "in N s;", " ".join(t.split()))  # noqa: E731
    assert flat(shown) == flat(printed), f"README.md shows:\n{shown}\nthe demo prints:\n{printed}"
    seconds = float(re.search(r"trained \d+ steps in (\d+(?:\.\d+)?) s;", shown).group(1))
    assert re.search(rf"{seconds:g} s .*on 2 cores of ", " ".join(text.split())), "the machine of the timing"


def test_demo_writes_what_it_says(demo_folder):
    import dualenc
    from dualenc import plots as drawing
    from PIL import Image

    folder, first = demo_folder
    assert first["zero_shot_chance"] == 0.1 and first["held_out_images"] > 300
    assert first["unseen_template"] not in " ".join(dualenc.data.DIGIT_TEMPLATES)
    model = folder / first["model_dir"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(model))
    assert dualenc.load_config(model).vision.image_size == 16
    with Image.open(folder / first["picture"]) as picture:
        picture.load()  # decodes
        assert picture.size == tuple(round(v * drawing.DPI) for v in drawing.DEMO_SIZE)  # the matplotlib figure
    data = folder / first["data_dir"]
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    assert len({r["image"] for r in rows}) == first["held_out_images"] and (data / rows[-1]["image"]).is_file()
    assert (data / "labels.txt").read_text().split() == list(dualenc.data.DIGIT_WORDS)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(README line of the block's first code line, code) for each ```python block, in order."""
    blocks, start = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, code = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code)))
            start = None
        elif start is not None:
            code.append(line)
    assert start is None, f"README.md: the ```python block at line {start - 1} is never closed"
    return blocks


# A block compiles under README.md's own path and line numbers, so a traceback points into the README.
RUNNER = """
import sys
print(f"README.md: running the python block at line {LINE}", file=sys.stderr, flush=True)
exec(compile("\\n" * (LINE - 1) + CODE, README, "exec"), {"__name__": "__main__"})
"""


def test_each_readme_python_block_runs_alone(demo_folder):
    """Each block runs on its own, in a fresh interpreter, as someone pasting it would run it."""
    demo_folder = demo_folder[0]
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    if not (demo_folder / "dualenc-onnx").exists():  # README's Export command, whose folder a block reads
        run([sys.executable, "-m", "dualenc.cli", "export", "--model", "dualenc-demo/model", "--out", "dualenc-onnx",
             "--onnx"], demo_folder)
    for line, code in blocks:
        script = demo_folder / f"readme_block_{line}.py"
        script.write_text(f"LINE = {line!r}\nCODE = {code!r}\nREADME = {str(README)!r}\n{RUNNER}")
        run([sys.executable, script], demo_folder)


MODULES = ("train", "trainer", "data", "datasets", "index", "ann", "losses", "evaluate", "templates", "towers", "hub")
FILE_SUFFIXES = {"json", "jsonl", "csv", "tsv", "png", "txt", "safetensors", "faiss", "npz", "tar", "names", "py", "md"}


def readme_names(text: str) -> set[str]:
    """The Python names README.md writes: dualenc.X.Y anywhere, and MODULE.X (a dualenc module) in `code`."""
    names = set(re.findall(r"\bdualenc(?:\.[A-Za-z_]\w*)+", text))
    for span in re.findall(r"`([^`\n]+)`", text):
        for name in re.findall(rf"(?<![\w./-])((?:{'|'.join(MODULES)})(?:\.[A-Za-z_]\w*)+)", span):
            if name.rsplit(".", 1)[1] not in FILE_SUFFIXES:
                names.add("dualenc." + name)
    return {name for name in names if name.rsplit(".", 1)[1] not in FILE_SUFFIXES}


def resolve(name: str):
    """The object a dotted name names, importing its longest module prefix first."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(name)


def test_every_name_the_readme_uses_is_importable_as_written():
    names = readme_names(README.read_text())
    assert {"dualenc.data.Pipeline", "dualenc.train.fit", "dualenc.data.Batches"} <= names
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, "README.md names what does not exist: " + "; ".join(missing)
    with pytest.raises(AttributeError):
        resolve("dualenc.data.NoSuchPipeline")


def test_every_cli_example_runs_as_written(demo_folder):
    demo_folder = demo_folder[0]
    # search and merge read what embed wrote, interpolate what train wrote
    order = ["zero-shot", "embed", "search", "merge", "eval", "train", "interpolate", "prepare", "export"]
    assert set(EXAMPLES) == {"demo", "serve", *order}  # serve runs until stopped: tests/test_serve.py runs it
    flat = " ".join(README.read_text().replace("\\\n", " ").split())  # README.md may wrap them with backslashes
    missing = [name for name in [*order, "serve"] if " ".join(EXAMPLES[name].split()) not in flat]
    assert not missing, f"README.md does not show the --help example of {missing}"
    test_images = sorted((demo_folder / "dualenc-demo/data/images/test").iterdir())
    out = {name: run_as_installed(shlex.split(EXAMPLES[name]), demo_folder) for name in order}

    lines = out["zero-shot"].stdout.splitlines()  # "PATH: label p, label p, label p", one line per image
    assert [line.split(": ")[0] for line in lines] == [f"dualenc-demo/data/images/test/{p.name}" for p in test_images]
    assert all(len(line.split(", ")) == 3 for line in lines)

    assert (demo_folder / "digits.safetensors").is_file()
    assert f"wrote {len(test_images)} image embeddings" in out["embed"].stderr

    results = re.findall(r"^(.+):\n((?:\S+  dualenc-demo/data/images/test/\d+\.png\n)+)", out["search"].stdout, re.M)
    assert [(query, hits.count("\n")) for query, hits in results] == [
        ("a photo of the digit seven", 5), ("the number 3", 5)], out["search"].stdout
    assert (demo_folder / "digits-all.faiss").is_file() and "recall@10" in out["merge"].stderr

    metrics = json.loads((demo_folder / "dualenc-eval/metrics.json").read_text())
    assert metrics["images"] == len(test_images) and 0 <= metrics["i2t_R@1"] <= 1
    assert (demo_folder / "dualenc-eval/eval.png").stat().st_size > 0

    tuned = demo_folder / "dualenc-tuned"
    assert (tuned / "model.safetensors").is_file() and (tuned / "training.png").stat().st_size > 0
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [50, 100]
    assert "trained 100 steps" in out["train"].stdout

    import numpy as np
    from safetensors.numpy import load_file

    a, b, wise = (load_file(demo_folder / d / "model.safetensors") for d in ("dualenc-demo/model", "dualenc-tuned",
                                                                            "dualenc-wise"))
    assert set(wise) == set(a) and any(not np.array_equal(a[k], b[k]) for k in a)
    for k in a:
        np.testing.assert_allclose(wise[k], (a[k] + b[k]) / 2, atol=1e-6)

    manifest = json.loads((demo_folder / "dualenc-export/manifest.json").read_text())  # jax alone: no --onnx
    for side in ("image", "text"):
        assert (demo_folder / f"dualenc-export/{side}_encoder.jaxexport").stat().st_size > 0
    assert "wrote" in out["export"].stdout + out["export"].stderr and manifest


def test_a_command_needing_a_missing_extra_says_so_before_work(demo_folder):
    """README's first command installs dualenc[demo], and the demo and every --help example above ran with
    every other distribution unimportable (train once needed orbax-checkpoint, which only dualenc[checkpoint]
    gave, and failed after training). The same run without an extra fails, before any work, naming it."""
    import installs

    folder = demo_folder[0]
    assert {"orbax-checkpoint", "faiss-cpu", "array-record", "optax", "matplotlib"} <= installs.closure(
        "dualenc", {"demo"})
    proc = run_as_installed(["dualenc", "merge", "digits.safetensors", "--out", "no-faiss.safetensors", "--ann"],
                            folder, extras=("processing", "train", "data"), check=False)
    assert proc.returncode == 2 and "--ann needs faiss: pip install 'dualenc[search]'" in proc.stderr, proc.stderr
    assert not (folder / "no-faiss.safetensors").exists()


def test_the_clip_benchmark_commands_run_as_written(demo_folder):
    """README's "Evaluate like CLIP_benchmark" commands, on the install README's first command makes: one table,
    CLIP_benchmark's results files, and the zero-shot acc1 the demo itself measured on the same images."""
    folder, figures = demo_folder
    text = README.read_text().replace("\\\n", " ")
    section = text[text.index("## Evaluate like CLIP_benchmark"):text.index("## Scale-out")]
    commands = [line for line in section.splitlines() if line.startswith("dualenc eval --model dualenc-demo/model")]
    assert len(commands) == 2
    out = [run_as_installed(shlex.split(c), folder).stdout for c in commands]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in "\n".join(out).splitlines()
            if line.startswith("wds/")}
    assert set(rows) == {("wds/digits", "zeroshot_classification"), ("wds/digits-captions", "zeroshot_retrieval"),
                         ("wds/digits", "linear_probe")}
    assert float(rows["wds/digits", "zeroshot_classification"][0]) == pytest.approx(figures["zero_shot_accuracy"],
                                                                                   abs=5e-5)
    written = sorted(p.name for p in (folder / "dualenc-benchmark").glob("*.json"))
    assert sorted(n.split("__")[0] for n in written) == ["wds_digits", "wds_digits", "wds_digits-captions"]
    record = json.loads((folder / "dualenc-benchmark" / written[-1]).read_text())
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
