"""python -m benchmarks.init [--size B16] [--repeats 3]: the first call of dualenc.init beside drawing as many normals.

Each measurement runs in a fresh Python (imports excluded), so it includes tracing, compiling and running:
`dualenc.init(key, config)` of the size's VisionTextDualEncoder config (B16: ViT-B/16 + BERT-base), against
`jax.random.normal` drawing the same count of float32 normals in 16M chunks (one jitted call; its second,
warm call is reported too). Medians of `--repeats` processes of each, run in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 1 << 24


def _child(size: str, what: str, count: int) -> str:
    import time

    import jax
    import jax.numpy as jnp

    import dualenc
    from benchmarks.common import dualenc_config

    config = dualenc_config(size)
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # XLA's one-time start-up, out of both timings
    if what == "init":
        start = time.perf_counter()
        jax.block_until_ready(dualenc.init(jax.random.key(3), config))
    else:
        sizes = [CHUNK] * (count // CHUNK) + ([count % CHUNK] if count % CHUNK else [])
        start = time.perf_counter()
        draw = jax.jit(lambda key: [jax.random.normal(k, (m,), jnp.float32)
                                    for k, m in zip(jax.random.split(key, len(sizes)), sizes)])
        jax.block_until_ready(draw(jax.random.key(3)))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(draw(jax.random.key(4)))
        return json.dumps({"seconds": first, "warm_s": time.perf_counter() - start})
    return json.dumps({"seconds": time.perf_counter() - start})


def _count(size: str) -> int:
    """How many numbers the size's init draws, from the shapes (in the parent: no trace cached in a child)."""
    import math

    import jax

    import dualenc
    from benchmarks.common import dualenc_config

    shapes = jax.eval_shape(lambda: dualenc.init(jax.random.key(0), dualenc_config(size)))
    return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))


def _fresh(size: str, what: str, count: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); from benchmarks import init; "
            f"print(init._child({size!r}, {what!r}, {count}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(size: str = "B16", repeats: int = 3) -> dict:
    import numpy as np

    times = {"init": [], "normal": [], "normal_warm": []}
    count = _count(size)
    for _ in range(repeats):
        for what in ("init", "normal"):
            out = _fresh(size, what, count)
            times[what].append(out["seconds"])
            if "warm_s" in out:
                times["normal_warm"].append(out["warm_s"])
    init, normal, warm = (float(np.median(times[k])) for k in ("init", "normal", "normal_warm"))
    return {"case": f"first-call init {size}", "params": count, "init_first_call_s": init,
            "normal_first_call_s": normal, "normal_warm_s": warm, "ratio": init / normal,
            "ratio_to_warm_draw": init / warm, "each_s": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="B16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    out = run(args.size, args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
