"""python -m benchmarks [--cases ...] [--repeats N] [--json FILE]: dualenc beside transformers, one process."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cases, clip, load, siglip  # noqa: E402
from benchmarks.common import machine, matmul_peak, torch_matmul_peak  # noqa: E402

ALL = ("peak", "forward", "bf16", "latency", "startup", "lit", "encode", "memory", "demo", "load", "clip", "siglip")


def run(selected, repeats: int) -> dict:
    results = {"machine": machine(), "cases": []}
    peak = None
    if "peak" in selected or "forward" in selected:
        peaks = matmul_peak(repeats)
        peak = peaks["float32"]
        results["matmul_peak_gflops"] = {"jnp.dot float32": peak, "jnp.dot bfloat16": peaks["bfloat16"],
                                         "torch float32": torch_matmul_peak(repeats)}
    add = results["cases"].append
    if "forward" in selected:
        for batch in (8, 1, 32):
            add(cases.forward("B16", batch, 32, repeats=repeats, peak=peak))
    if "bf16" in selected:
        add(cases.forward("B16", 8, 32, repeats=repeats, dtype="bfloat16"))
    if "latency" in selected:
        for size, length in (("small", 16), ("tiny", 16)):
            for batch in (1, 8):
                add(cases.forward(size, batch, length, repeats=max(repeats, 20)))
    if "startup" in selected:
        add(cases.compile_and_init())
        add(cases.train_step_compile())
    if "lit" in selected:
        add(cases.lit_step(repeats=repeats))
    if "encode" in selected:
        add(cases.encode_images())
    if "memory" in selected:
        add(cases.peak_memory())
    if "demo" in selected:
        add(cases.demo())
    if "clip" in selected:
        for variant in clip.VARIANTS:
            for batch in (1, 8):
                add(clip.forward(variant, batch, repeats=repeats))
    if "siglip" in selected:
        for naflex in (False, True):
            for batch in (1, 8):
                add(siglip.forward(batch, naflex, repeats=repeats))
    if "load" in selected:
        add(load.encode_many())
        add(load.train_long())
    return results


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def table(results: dict) -> str:
    lines = [f"machine: {results['machine'].get('cpu')} ({results['machine']['cpu_count']} cores), "
             f"jax {results['machine']['jax']}, torch {results['machine']['torch']}, "
             f"transformers {results['machine']['transformers']}, flax {results['machine']['flax']}"]
    if "matmul_peak_gflops" in results:
        lines.append("matmul peak GFLOP/s: " + _fmt(results["matmul_peak_gflops"]))
    for case in results["cases"]:
        lines.append(f"\n{case['case']}")
        for key, value in case.items():
            if key != "case":
                lines.append(f"  {key}: {_fmt(value)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--cases", default=",".join(ALL), help=f"comma-separated among {','.join(ALL)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="benchmark-results.json", help="where to write the results")
    args = parser.parse_args(argv)
    selected = [c for c in args.cases.split(",") if c]
    unknown = set(selected) - set(ALL)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose among {ALL}")
    started = time.time()
    results = run(selected, args.repeats)
    results["wall_seconds"] = time.time() - started
    print(table(results))
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
