"""python -m benchmarks.eval_stream [--sizes 5000 50000] [--json FILE]: `dualenc eval --benchmark` streaming,
its progress bar, and compiled programs reused across datasets.

For each size, writes a zero-shot classification set in CLIP_benchmark's webdataset layout
(dualenc.benchmark.export: random 16x16 PNGs, 1000 made-up class names, a few templates), then runs
`dualenc eval --model M --benchmark ROOT --no-figure --out DIR` in a fresh process (the command's own code, in
process) started from benchmarks.embed's small launcher, and reads its wall time, peak resident memory (VmHWM)
and the "N programs compiled" note on its stderr. The model is benchmarks.embed's tiny random ViT + BERT with
512-dim projections, so held embeddings (2 KiB an image) would show in the peak; a second fresh process per
size rebuilds the arrays the command keeps for its metrics from random values and traces them (`breakdown`).

Then: the same command under a pseudo-terminal (stderr a tty, as a person runs it) over a few thousand images,
checking a tqdm bar is drawn; and one command over five datasets (classification sets of different sizes and
class counts, and a retrieval set), recording each one's compile count and, from jax_log_compiles, the
programs it lowered. Not part of the tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.embed import LAUNCHER, PROJECTION_DIM, ROOT, make_model, peak_memory

N_CLASSES = 1000
TEMPLATES = ("a photo of a {c}.", "a blurry photo of the {c}.", "a drawing of a {c}.")
# the datasets of the compile-reuse run, in the order given: (name, images, classes; 0 classes = retrieval)
REUSE_SETS = (("cls300x10", 300, 10), ("cls1000x100", 1000, 100), ("cls3000x1000", 3000, 1000),
              ("cls700x250", 700, 250), ("ret500", 500, 0))
CAPTIONS_PER_IMAGE = 2
PROGRESS_IMAGES = 3000
NOTE = re.compile(r"dualenc eval: (\S+) (\S+): (?:([\d,]+) images, )?(\d+) programs compiled")
COMPILING = re.compile(r"Compiling (\S+) with global shapes and types (.*?)\. Argument mapping")
BAR = re.compile(r"images:\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")


def class_names(n: int, seed: int = 0) -> list[str]:
    """n distinct made-up two-word class names ("vokari tesh")."""
    import numpy as np

    rng, syllables, names = np.random.default_rng(seed), "ka to ri ve su mo la ne shi pu da gor tesh vin".split(), []
    seen = set()
    while len(names) < n:
        word = lambda k: "".join(rng.choice(syllables, k))  # noqa: E731
        name = f"{word(3)} {word(2)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_dataset(root: str, n: int, classes: int, seed: int = 0) -> float:
    """A test split of n random 16x16 PNGs in CLIP_benchmark's layout: labels of `classes` classes, or captions
    (retrieval) when classes is 0. Returns the seconds taken."""
    import numpy as np

    from dualenc.benchmark import export

    start = time.perf_counter()
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            target = int(rng.integers(classes)) if classes else [f"caption {j} of image {i}"
                                                                 for j in range(CAPTIONS_PER_IMAGE)]
            yield f"s{i:07d}", image, target

    export.write_split(root, "test", samples())
    if classes:
        export.write_metadata(root, classnames=class_names(classes, seed), templates=TEMPLATES)
    else:
        export.write_metadata(root, retrieval=True)
    return time.perf_counter() - start


def child(model: str, out: str, batch_size: int, roots: list[str]) -> dict:
    """Runs `dualenc eval --benchmark ROOTS` in this process, jax logging each compile; its time and peak RSS."""
    import jax

    from dualenc import cli

    jax.config.update("jax_log_compiles", True)
    start = time.perf_counter()
    code = cli.main(["eval", "--model", model, "--benchmark", *roots, "--no-figure", "--out", out,
                     "--batch-size", str(batch_size)])
    seconds = time.perf_counter() - start
    return {"exit": code, "seconds": seconds, **peak_memory()}


def breakdown(n: int, batch_size: int) -> dict:
    """What `dualenc eval` holds for n images of N_CLASSES classes, rebuilt from random values in this (fresh)
    process and traced by tracemalloc (which counts numpy's buffers), as dualenc.benchmark.run builds it: the
    embedding batches and their concatenation (encode_split), the score matrix, then the metrics over it
    (metrics.classification_metrics, and the top-1 predictions the command keeps for its figure). MiB and
    seconds; the peaks are of the traced bytes, each phase's peak counted from its start."""
    import tracemalloc
    import warnings

    import numpy as np

    from dualenc.benchmark import metrics

    warnings.simplefilter("ignore")  # random scores predict classes that no row has
    rng, mib = np.random.default_rng(0), lambda b: round(b / 2 ** 20, 1)
    tracemalloc.start()
    parts = [rng.standard_normal((min(batch_size, n - i), PROJECTION_DIM), dtype=np.float32)
             for i in range(0, n, batch_size)]
    tracemalloc.reset_peak()
    images = np.concatenate(parts)
    gathered = tracemalloc.get_traced_memory()[1]
    del parts
    labels = rng.integers(0, N_CLASSES, n)
    scores = images @ rng.standard_normal((PROJECTION_DIM, N_CLASSES), dtype=np.float32)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    metrics.classification_metrics(scores, labels, N_CLASSES)
    metrics.top_k(scores, 1)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"images": n, "embeddings_gathered_peak_MiB": mib(gathered), "embeddings_and_scores_MiB": mib(held),
            "metrics_peak_MiB": mib(peak), "metrics_over_held_MiB": mib(peak - held),
            "metrics_seconds": round(seconds, 2), **peak_memory()}


def parse_stderr(stderr: str) -> list[dict]:
    """Per dataset, in order: its name, task, images, "programs compiled" and those programs as jax logged them
    (name and the tail of its argument types)."""
    found, programs = [], []
    for line in stderr.splitlines():
        m = COMPILING.search(line)
        if m:
            programs.append({"program": m[1], "argument_types_tail": m[2][-200:]})
            continue
        m = NOTE.search(line)
        if m:
            count = int(m[4])
            # the count's programs are the last logged; any before them were lowered before counting began
            # (the first dataset's: loading the model, one small program per param shape)
            found.append({"dataset": m[1], "task": m[2], "images": int(m[3].replace(",", "")) if m[3] else None,
                          "programs_compiled": count, "programs": programs[len(programs) - count:],
                          "lowered_before_counting": max(len(programs) - count, 0)})
            programs = []
    return found


_launcher = None


def _run_child(args: list[str]) -> tuple[dict, str]:
    """(the child's JSON line, its stderr): `python -m benchmarks.eval_stream ARGS` started by the launcher."""
    global _launcher
    if _launcher is None:
        _launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_child_env(), cwd=ROOT)
    _launcher.stdin.write("\0".join([sys.executable, "-m", "benchmarks.eval_stream", *args]) + "\n")
    _launcher.stdin.flush()
    code, stdout, stderr = ast.literal_eval(_launcher.stdout.readline())
    if code != 0:
        raise RuntimeError(stderr[-3000:])
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _child_env() -> dict:
    return {**os.environ, "DUALENC_COMPILATION_CACHE": "off", "XLA_FLAGS": ""}


def under_tty(args: list[str], columns: int = 100) -> tuple[int, str, str]:
    """(exit code, stdout, what it wrote to stderr) of `python -m benchmarks.eval_stream ARGS` with its stderr a
    pseudo-terminal of `columns` columns (stdout a pipe)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.eval_stream", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=_child_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every end of the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(), stdout, b"".join(chunks).decode(errors="replace")


def progress_check(model: str, root: str, out: str, batch_size: int) -> dict:
    code, stdout, tty = under_tty(["--child", model, out, str(batch_size), root])
    bars = BAR.findall(tty)
    last = bars[-1] if bars else None
    return {"images": PROGRESS_IMAGES, "exit": code, "stderr_is_tty": True,
            "bar_drawn": bool(bars), "bar_updates": len(bars), "carriage_returns": tty.count("\r"),
            "last_bar": None if last is None else f"{last[0]}% {last[1]}/{last[2]}",
            "reached_total": last is not None and last[1] == last[2] == str(PROGRESS_IMAGES),
            "last_bar_text": _last_bar_text(tty)}


def _last_bar_text(tty: str) -> str | None:
    parts = [p.strip() for p in re.split(r"[\r\n]", tty) if p.strip().startswith("images:")]
    return parts[-1] if parts else None


def run(sizes: list[int], batch_size: int) -> dict:
    work = tempfile.mkdtemp(prefix="dualenc-bench-eval-")
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpu_count": os.cpu_count()}, "projection_dim": PROJECTION_DIM,
               "batch_size": batch_size, "image_size": 16, "classes": N_CLASSES, "templates": len(TEMPLATES),
               "load_average_at_start": os.getloadavg(), "cases": []}
    try:
        model = make_model(work)
        baseline, _ = _run_child(["--baseline"])
        results["import_only_peak_rss_MiB"] = round(baseline["peak_rss_MiB"], 1)
        for n in sizes:
            root = os.path.join(work, f"wds_cls{n}")
            made = make_dataset(root, n, N_CLASSES)
            load = os.getloadavg()
            measured, stderr = _run_child(["--child", model, os.path.join(work, f"out-{n}"), str(batch_size), root])
            assert measured["exit"] == 0, measured
            (note,) = parse_stderr(stderr)
            case = {"images": n, "seconds": round(measured["seconds"], 2),
                    "images_per_second": round(n / measured["seconds"], 1),
                    "peak_rss_MiB": round(measured["peak_rss_MiB"], 1),
                    "ru_maxrss_MiB": round(measured["ru_maxrss_MiB"], 1),
                    "programs_compiled": note["programs_compiled"],
                    "programs": note["programs"],
                    "bar_drawn_with_stderr_a_pipe": bool(BAR.search(stderr)),
                    "embeddings_MiB": round(n * PROJECTION_DIM * 4 / 2 ** 20, 1),
                    "scores_MiB": round(n * N_CLASSES * 4 / 2 ** 20, 1),
                    "dataset_MiB": round(_size(root) / 2 ** 20, 1),
                    "writing_dataset_seconds": round(made, 1),
                    "load_average_before": load, "load_average_after": os.getloadavg()}
            parts, _ = _run_child(["--breakdown", str(n), str(batch_size)])
            case["breakdown"] = {k: round(v, 2) for k, v in parts.items() if k != "ru_maxrss_MiB"}
            print(json.dumps(case), flush=True)
            results["cases"].append(case)
            shutil.rmtree(root)

        roots = []
        for name, n, classes in REUSE_SETS:
            roots.append(os.path.join(work, f"wds_{name}"))
            make_dataset(roots[-1], n, classes, seed=len(roots))
        progress = progress_check(model, roots[[s[0] for s in REUSE_SETS].index("cls3000x1000")],
                                  os.path.join(work, "out-progress"), batch_size)
        print(json.dumps(progress), flush=True)
        results["progress"] = progress
        load = os.getloadavg()
        measured, stderr = _run_child(["--child", model, os.path.join(work, "out-reuse"), str(batch_size), *roots])
        assert measured["exit"] == 0, measured
        notes = parse_stderr(stderr)
        for note, (name, n, classes) in zip(notes, REUSE_SETS):
            note.update(classes=classes or None, captions=n * CAPTIONS_PER_IMAGE if not classes else None)
        results["compile_reuse"] = {"seconds": round(measured["seconds"], 2), "datasets": notes,
                                    "peak_rss_MiB": round(measured["peak_rss_MiB"], 1),
                                    "load_average_before": load, "load_average_after": os.getloadavg()}
        print(json.dumps([(d["dataset"], d["programs_compiled"]) for d in notes]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_stream", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000])
    parser.add_argument("--batch-size", type=int, default=32, help="dualenc eval's --batch-size (its default: 32)")
    parser.add_argument("--json", default="benchmarks/results-cpu-eval-stream.json")
    parser.add_argument("--child", nargs="+", metavar="MODEL OUT BATCH ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breakdown:
        print(json.dumps(breakdown(*args.breakdown)))
        return 0
    if args.baseline:
        import dualenc  # noqa: F401
        from dualenc import cli  # noqa: F401

        print(json.dumps(peak_memory()))
        return 0
    if args.child:
        model, out, batch, *roots = args.child
        print(json.dumps(child(model, out, int(batch), roots)))
        return 0
    start = time.perf_counter()
    _run_child(["--baseline"])  # starts the launcher before this process imports jax
    results = run(args.sizes, args.batch_size)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    from benchmarks.common import write_results  # (jax loads with it: only now, after measuring)

    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
