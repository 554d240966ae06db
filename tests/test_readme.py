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
ENV = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's shell has


def run(args, cwd, timeout=300):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    assert proc.returncode == 0, f"{shlex.join(map(str, args))} failed:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A folder where `dualenc demo` ran (briefly): dualenc-demo/model and dualenc-demo/data."""
    exe = shutil.which("dualenc")
    assert exe, "the dualenc console script is installed with the package"
    folder = tmp_path_factory.mktemp("readme")
    figures = json.loads(run([exe, "demo", "--steps", "30", "--seed", "0", "--json"], folder).stdout)
    return folder, figures


def test_demo_short_run_is_deterministic_and_writes_what_it_says(demo_folder, tmp_path):
    import dualenc
    from dualenc import figures as drawing
    from PIL import Image

    folder, first = demo_folder
    again = json.loads(run([shutil.which("dualenc"), "demo", "--steps", "30", "--seed", "0", "--json", "--out",
                            tmp_path / "again"], tmp_path).stdout)
    for key in ("zero_shot_accuracy", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "final_train_loss"):
        assert first[key] == again[key]
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


# Each block compiles under README.md's own path and line numbers, so a traceback points into the README.
RUNNER = """
import sys
namespace = {"__name__": "__main__"}
for line, code in BLOCKS:
    print(f"README.md: running the python block at line {line}", file=sys.stderr, flush=True)
    exec(compile("\\n" * (line - 1) + code, README, "exec"), namespace)
"""


def test_readme_python_blocks_run_top_to_bottom(demo_folder):
    demo_folder = demo_folder[0]
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    script = demo_folder / "readme_blocks.py"
    script.write_text(f"BLOCKS = {blocks!r}\nREADME = {str(README)!r}\n{RUNNER}")
    run([sys.executable, script], demo_folder)


def test_every_cli_example_runs_as_written(demo_folder):
    demo_folder = demo_folder[0]
    order = ["zero-shot", "embed", "search", "merge", "eval", "train", "prepare"]  # search and merge read what embed wrote
    assert set(EXAMPLES) == {"demo", *order}
    flat = " ".join(README.read_text().replace("\\\n", " ").split())  # README.md may wrap them with backslashes
    missing = [name for name in order if " ".join(EXAMPLES[name].split()) not in flat]
    assert not missing, f"README.md does not show the --help example of {missing}"
    test_images = sorted((demo_folder / "dualenc-demo/data/images/test").iterdir())
    out = {name: run(shlex.split(EXAMPLES[name]), demo_folder) for name in order}

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
