"""python -m benchmarks.linear_probe [--rows 10000] [--repeats 1] [--torch]: CLIP_benchmark's linear probe in dualenc.

Times dualenc.benchmark.linear_probe.linear_probe on random features (--rows train rows, a fifth as many
validation and test rows, --dim 512, --classes 1000, CLIP_benchmark's defaults: 10 epochs, batch 64, lr 0.1):
one fit on the train rows (first call, with its compile, and warm), and the whole protocol with a validation
split (the weight-decay sweep's fits, then the final fit on train + validation, then the test metrics).
--torch also times one fit of CLIP_benchmark's own train() (PyTorch, on CPU) on the same rows, in a fresh
process without jax (torch's threads beside XLA's slow it down: 53 s against 20-31 s alone, measured).
Medians of --repeats; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def features(rows: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)

    def split(n):
        labels = rng.permutation(np.arange(n) % classes)
        return (means[labels] + 3 * rng.normal(size=(n, dim))).astype(np.float32), labels

    return split(rows), split(rows // 5), split(rows // 5)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_fit(rows: int, dim: int, classes: int, epochs: int, batch_size: int) -> float:
    """One fit of CLIP_benchmark's train() on CPU (its .cuda() calls keep the tensors where they are), after one
    warm-up epoch; run in a process of its own."""
    import torch
    from clip_benchmark.metrics import linear_probe as cb

    (x, y), _, _ = features(rows, dim, classes)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    torch.nn.Module.cuda = torch.Tensor.cuda = lambda self, *a, **k: self
    dataset = cb.FeatureDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    cb.train(loader, dim, classes, 1e-4, 0.1, 1, False, "cpu", 0)
    return _seconds(lambda: cb.train(loader, dim, classes, 1e-4, 0.1, epochs, False, "cpu", 0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--torch", action="store_true", help="also time one fit of CLIP_benchmark's train()")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = [str(v) for v in (args.rows, args.dim, args.classes, args.epochs, args.batch_size)]
    if args.torch_child:
        print(json.dumps(torch_fit(args.rows, args.dim, args.classes, args.epochs, args.batch_size)))
        return {}
    from dualenc.benchmark import linear_probe as lp

    (xt, yt), (xv, yv), (xs, ys) = features(args.rows, args.dim, args.classes)
    xt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    draws = lp.draw("numpy", 0, len(xt), args.dim, args.classes, args.epochs)

    def fit():
        lp.fit_linear(xt, yt, args.classes, 1e-4, lr=0.1, epochs=args.epochs, batch_size=args.batch_size,
                      draws=draws)

    out = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "epochs": args.epochs,
           "batch_size": args.batch_size, "steps_per_fit": args.epochs * -(-args.rows // args.batch_size),
           "fit_first_s": _seconds(fit)}
    out["fit_warm_s"] = statistics.median(_seconds(fit) for _ in range(args.repeats))
    times, result, fits, fit_linear = [], None, [], lp.fit_linear
    lp.fit_linear = lambda *a, **k: fits.append(len(a[0])) or fit_linear(*a, **k)  # counts the protocol's fits
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = lp.linear_probe(xt, yt, xs, ys, xv, yv, epochs=args.epochs, batch_size=args.batch_size)
        times.append(time.perf_counter() - start)
    lp.fit_linear = fit_linear
    out["protocol_s"] = statistics.median(times)
    out["protocol_fits"] = len(fits) // args.repeats
    out["result"] = result
    if args.torch:
        child = [sys.executable, os.path.abspath(__file__), "--torch-child"] + [
            f"--{k}={v}" for k, v in zip(("rows", "dim", "classes", "epochs", "batch-size"), shape)]
        out["clip_benchmark_fit_s"] = statistics.median(
            json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            for _ in range(args.repeats))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
