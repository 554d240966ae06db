"""python -m benchmarks.embed [--sizes 10000 100000] [--json FILE]: `dualenc embed` throughput and peak memory.

For each size, generates that many 16x16 PNG images in nested folders (as img2dataset lays them out), then runs
`dualenc embed` over them in a fresh subprocess (the command's own code, in process) and reads that process's
peak resident memory. The model is a tiny random ViT + BERT with 512-dim projections, so the embeddings
themselves (2 KiB an image) would show in the peak if they were held. Not part of the tests.

The peak is the child's own: VmHWM from /proc/self/status, which starts anew at exec. Linux's ru_maxrss does
not: a child keeps the high-water mark of the process it was forked from, so a child of this (large) parent
reported at least the parent's size. Where /proc is missing, each child is started from a small launcher
process, whose children's ru_maxrss starts from the launcher's few MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROJECTION_DIM = 512
IMAGES_PER_FOLDER = 10_000


def make_model(folder: str) -> str:
    import jax

    import dualenc
    from dualenc import data

    data.write_vocab(os.path.join(folder, "vocab"), ["a photo of a red square"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(os.path.join(folder, "vocab"), max_length=8))
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**size, image_size=16, patch_size=4),
                                       dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                                          max_position_embeddings=8), projection_dim=PROJECTION_DIM)
    path = os.path.join(folder, "model")
    dualenc.save_pretrained(path, config, dualenc.init(jax.random.key(0), config), processor=processor)
    return path


def make_images(folder: str, n: int) -> float:
    """n random 16x16 PNGs in folders of IMAGES_PER_FOLDER; returns the seconds taken."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = os.path.join(folder, f"{i // IMAGES_PER_FOLDER:05d}")
        if i % IMAGES_PER_FOLDER == 0:
            os.makedirs(sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(sub, f"{i:09d}.png"))
    return time.perf_counter() - start


def child(model: str, images: str, out: str, batch_size: int) -> dict:
    """Runs `dualenc embed` in this process; its time and this process's peak RSS."""
    from dualenc import cli

    start = time.perf_counter()
    code = cli.main(["embed", "--model", model, "--images", images, "--out", out, "--batch-size", str(batch_size)])
    seconds = time.perf_counter() - start
    return {"exit": code, "seconds": seconds, **peak_memory()}


def peak_memory() -> dict:
    """This process's peak resident memory in MiB since its exec (VmHWM), and ru_maxrss beside it."""
    found = {"ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    found["peak_rss_MiB"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    found.setdefault("peak_rss_MiB", found["ru_maxrss_MiB"])
    return found


def run(sizes: list[int], batch_size: int) -> dict:
    work = tempfile.mkdtemp(prefix="dualenc-bench-embed-")
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpu_count": os.cpu_count()}, "projection_dim": PROJECTION_DIM,
               "batch_size": batch_size, "image_size": 16, "cases": []}
    try:
        model = make_model(work)
        baseline = _child_json(["--baseline"])  # the interpreter, jax and dualenc imported: no images
        results["import_only_peak_rss_MiB"] = round(baseline["peak_rss_MiB"], 1)
        results["import_only_ru_maxrss_MiB"] = round(baseline["ru_maxrss_MiB"], 1)
        for n in sizes:
            images = os.path.join(work, f"images-{n}")
            made = make_images(images, n)
            out = os.path.join(work, f"index-{n}.safetensors")
            measured = _child_json(["--child", model, images, out, str(batch_size)])
            assert measured["exit"] == 0, measured
            from dualenc.search import index

            written = index.open_index(out)
            case = {"images": n, "written": written.count, "seconds": round(measured["seconds"], 2),
                    "images_per_second": round(n / measured["seconds"], 1),
                    "peak_rss_MiB": round(measured["peak_rss_MiB"], 1),
                    "ru_maxrss_MiB": round(measured["ru_maxrss_MiB"], 1),
                    "embeddings_MiB_if_held": round(n * PROJECTION_DIM * 4 / 2 ** 20, 1),
                    "index_file_MiB": round(os.path.getsize(out) / 2 ** 20, 1),
                    "generating_images_seconds": round(made, 1)}
            print(json.dumps(case), flush=True)
            results["cases"].append(case)
            shutil.rmtree(images)
            os.remove(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


# Started first, while this process is small: it starts each measured child, so that a child's ru_maxrss (which
# counts the pages of the process it was forked from) starts from the launcher's size, not this process's.
LAUNCHER = ("import subprocess, sys\n"
            "for line in sys.stdin:\n"
            "    p = subprocess.run(line.rstrip('\\n').split('\\0'), capture_output=True, text=True)\n"
            "    print(repr((p.returncode, p.stdout, p.stderr)), flush=True)\n")
_launcher = None


def _child_json(args: list[str]) -> dict:
    global _launcher
    import ast

    if _launcher is None:
        env = {**os.environ, "DUALENC_COMPILATION_CACHE": "off", "XLA_FLAGS": ""}
        _launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
    _launcher.stdin.write("\0".join([sys.executable, "-m", "benchmarks.embed", *args]) + "\n")
    _launcher.stdin.flush()
    code, stdout, stderr = ast.literal_eval(_launcher.stdout.readline())
    proc = subprocess.CompletedProcess(args, code, stdout, stderr)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embed", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", default="benchmarks/results-cpu-embed.json")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "IMAGES", "OUT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        import dualenc  # noqa: F401
        from dualenc import cli  # noqa: F401

        print(json.dumps(peak_memory()))
        return 0
    if args.child:
        model, images, out, batch = args.child
        print(json.dumps(child(model, images, out, int(batch))))
        return 0
    start = time.perf_counter()
    _child_json(["--baseline"])  # starts the launcher before this process imports jax
    results = run(args.sizes, args.batch_size)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    from benchmarks.common import write_results  # (jax loads with it: only now, after measuring)

    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
