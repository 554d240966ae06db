"""python -m benchmarks.gpu: the GPU cases (bf16 forward throughput beside PyTorch, train-step MFU, LiT step).

Nothing in the test suite needs a GPU; this runs where one is at hand and writes its figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dualenc  # noqa: E402
from benchmarks.common import block, build, forward_flops, inputs, interleaved, machine  # noqa: E402


def bf16_peak(n: int = 8192, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.bfloat16)
    dot = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    t = interleaved({"dot": lambda: block(dot(a))}, repeats, warmup=2)["dot"]
    return 2 * n ** 3 / t / 1e12


def forward_case(side, batch_size: int, length: int, dtype: str, repeats: int) -> dict:
    import torch

    batch = inputs(side.config, batch_size, length)
    jax_dtype = None if dtype == "float32" else jnp.bfloat16
    fwd = jax.jit(dualenc.apply, static_argnames="dtype")
    on_device = {k: jnp.asarray(v) for k, v in batch.items()}
    model = side.torch_model.cuda().eval()
    tensors = {k: torch.from_numpy(v).cuda() for k, v in batch.items()}

    def theirs():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != "float32"):
            out = model(**tensors).logits_per_image
        torch.cuda.synchronize()
        return out

    times = interleaved({"dualenc": lambda: block(fwd(side.params, side.config, **on_device,
                                                          dtype=jax_dtype).logits_per_image),
                         "torch": theirs}, repeats, warmup=3)
    flops = forward_flops(side.config, batch_size, batch_size, length)
    return {"case": f"GPU forward B16 batch {batch_size} x {length} {dtype}",
            "images_per_s": {k: batch_size / t for k, t in times.items()},
            "tflops": {k: flops / t / 1e12 for k, t in times.items()},
            "speedup_vs_torch": times["torch"] / times["dualenc"]}


def train_case(side, batch_size: int, length: int, repeats: int, peak_tflops: float, locked=(), cached=False,
               layer_loop: bool = False):
    batch = {k: jnp.asarray(v) for k, v in inputs(side.config, batch_size, length).items()}
    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=1000)
    state = dualenc.train.init_state(side.params, optimizer, locked=locked, layer_loop=layer_loop)
    if cached:
        features = dualenc.train.tower_features(side.params, side.config, "vision",
                                                {"pixel_values": np.asarray(batch["pixel_values"])},
                                                batch_size=batch_size, dtype=jnp.bfloat16)
        batch = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": jnp.asarray(features)}
    step = dualenc.train.make_train_step(side.config, optimizer, locked=locked, cached=cached, dtype=jnp.bfloat16)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        block(metrics["loss"])

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = interleaved({"step": run}, repeats, warmup=2)["step"]
    fwd = forward_flops(side.config, batch_size, batch_size, length)
    if not locked:
        flops = 3 * fwd
    else:  # the locked vision tower runs forward only (or not at all, cached); the text tower fwd + bwd
        text = forward_flops(side.config, 0, batch_size, length)
        flops = 3 * text + (0 if cached else fwd - text)
    return {"case": f"GPU train step bf16 B16 batch {batch_size} x {length} locked={list(locked)} cached={cached} "
                    f"layer_loop={layer_loop}",
            "seconds": seconds, "pairs_per_s": batch_size / seconds, "model_tflops": flops / seconds / 1e12,
            "mfu_vs_measured_bf16_peak": flops / seconds / 1e12 / peak_tflops, "first_call_s": first}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument("--json", default="benchmark-gpu.json")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--skip-forward", type=int, default=0, help="skip the first N forward cases")
    parser.add_argument("--skip-train", type=int, default=0, help="skip the first N train cases")
    parser.add_argument("--layer-loop", action="store_true", help="train with per-layer params (no scan)")
    args = parser.parse_args(argv)
    results = {"machine": machine(), "cases": []}
    peak = bf16_peak()
    results["bf16_matmul_peak_tflops"] = peak
    side = build("B16", flax=False)
    side.params = jax.device_put(side.params)
    jobs = [lambda b=b, d=d: forward_case(side, b, 32, d, args.repeats)
            for b, d in ((32, "float32"), (32, "bfloat16"), (256, "bfloat16"))][args.skip_forward:]
    jobs += [lambda lk=lk, c=c: train_case(side, args.train_batch, 32, args.repeats, peak, lk, c, args.layer_loop)
             for lk, c in (((), False), (("vision",), True))][args.skip_train:]
    for job in jobs:
        try:
            results["cases"].append(job())
        except Exception as e:  # keep the other figures when one case fails (e.g. out of memory)
            results["cases"].append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(results["cases"][-1]), flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
