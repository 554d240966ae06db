"""python -m benchmarks.gpu: the GPU cases (bf16 forward throughput beside PyTorch, train-step MFU, LiT step).

Nothing in the test suite needs a GPU; this runs where one is at hand and writes its figures as JSON.
`--cases train-mfu` is the CLIP ViT-B/16 train step alone (open_clip's "ViT-B-16" shapes, 77-token texts,
random weights from dualenc.init: no PyTorch needed) in bfloat16 at the largest batch that fits, with and
without patch dropout and with gradient accumulation; `--size tiny` runs it on a 2-layer model (any backend,
CPU included) to check the code path.
"""

from __future__ import annotations

import argparse
import gc
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


CASES = ("forward", "train", "train-mfu")


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


# open_clip's model_configs/ViT-B-16.json, and a 2-layer model of the same kind to check the code path
CLIP_CFGS = {
    "B16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "tiny": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}},
}
MFU_BATCHES = {"B16": (1024, 768, 512, 384, 256, 192, 128, 64), "tiny": (64, 32, 16)}
# dense bf16 TFLOP/s from the vendors' data sheets, by a substring of jax's device_kind (first match)
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0),
                    ("L40S", 362.1), ("L4", 121.0), ("B200", 2250.0))


def spec_peak(kind: str) -> float | None:
    return next((tflops for name, tflops in SPEC_BF16_TFLOPS if name in kind), None)


def clip_batch(config, n: int, seed: int = 0) -> dict:
    """n texts in open_clip.tokenize's layout (start, 6 to 75 tokens, end, zeros) and random normal pixels."""
    rng = np.random.default_rng(seed)
    length, vocab = config.text.max_position_embeddings, config.text.vocab_size
    ids = np.zeros((n, length), np.int32)
    for row, k in enumerate(rng.integers(8, length + 1, n)):
        ids[row, 0], ids[row, 1:k - 1], ids[row, k - 1] = vocab - 2, rng.integers(1, vocab - 2, k - 2), vocab - 1
    v = config.vision
    return {"input_ids": jnp.asarray(ids),
            "pixel_values": jnp.asarray(rng.standard_normal((n, v.num_channels, *v.image_hw)), jnp.float32)}


def train_flops(config, batch_size: int, patch_dropout: float = 0.0) -> float:
    """Model FLOPs of a train step: 3x forward_flops; with patch dropout, the vision encoder on the kept tokens
    (the class token and kept_count of the patches; the terms are forward_flops's)."""
    from dualenc.towers.vit import kept_count

    flops = 3 * forward_flops(config, batch_size, batch_size, config.text.max_position_embeddings)
    if patch_dropout:
        v = config.vision

        def encoder(tokens):
            d, i = v.hidden_size, v.intermediate_size
            return v.num_hidden_layers * (2 * tokens * (4 * d * d + 2 * d * i) + 4 * tokens * tokens * d)

        kept = kept_count(patch_dropout, v.num_patches)
        flops -= 3 * batch_size * (encoder(v.num_patches + 1) - encoder(kept + 1))
    return flops


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def memory_probe(config, params, batch_size: int, bytes_limit: int) -> dict:
    """Compiled (not run) at batch_size: the step's fixed bytes (arguments but the batch) and bytes per pair,
    from XLA's memory_analysis, to skip the batch sizes over bytes_limit."""
    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=1000)
    state = jax.eval_shape(lambda: dualenc.train.init_state(params, optimizer))
    batch = jax.eval_shape(lambda: clip_batch(config, batch_size))
    step = dualenc.train.make_train_step(config, optimizer, dtype=jnp.bfloat16)
    start = time.perf_counter()
    m = step.lower(state, batch).compile().memory_analysis()
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(batch))
    fixed = m.argument_size_in_bytes - batch_bytes
    per_pair = (batch_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / batch_size
    return {"probe_batch": batch_size, "bytes_limit": bytes_limit, "fixed_bytes": fixed,
            "bytes_per_pair": per_pair, "compile_s": time.perf_counter() - start}


def mfu_step(config, params, batch_size: int, repeats: int, peak: float, spec: float | None, *,
             patch_dropout: float = 0.0, accum_steps: int = 1) -> dict:
    """One bf16 train step configuration timed (median of repeats after two warm-up steps)."""
    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=1000)
    holder = [dualenc.train.init_state(params, optimizer)]
    step = dualenc.train.make_train_step(config, optimizer, dtype=jnp.bfloat16, patch_dropout=patch_dropout,
                                         accum_steps=accum_steps)
    batch = clip_batch(config, batch_size)

    def run():
        holder[0], metrics = step(holder[0], batch)
        block(metrics["loss"])

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = interleaved({"step": run}, repeats, warmup=2)["step"]
    tflops = train_flops(config, batch_size, patch_dropout) / seconds / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    return {"case": f"GPU train-mfu bf16 CLIP batch {batch_size} x {config.text.max_position_embeddings} tokens "
                    f"patch_dropout={patch_dropout} accum_steps={accum_steps}",
            "batch": batch_size, "seconds": seconds, "pairs_per_s": batch_size / seconds, "model_tflops": tflops,
            "mfu_vs_measured_bf16_peak": tflops / peak, "mfu_vs_spec": tflops / spec if spec else None,
            "first_call_s": first, "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def train_mfu(size: str, repeats: int, peak: float) -> list[dict]:
    """The CLIP B/16 train step in bfloat16 at the largest batch of MFU_BATCHES that fits; then with
    patch_dropout=0.5 at that batch, and with accum_steps=4 at 4x that batch."""
    from dualenc.formats.open_clip import config_from_dict

    config = config_from_dict({"model_cfg": CLIP_CFGS[size]})
    params = jax.device_put(dualenc.init(jax.random.key(0), config))
    spec = spec_peak(jax.devices()[0].device_kind)
    candidates = MFU_BATCHES[size]
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on CPU
    probe = None if limit is None else memory_probe(config, params, candidates[-1], limit)
    if probe is not None:  # skip the sizes XLA's own count says cannot fit
        fits = [b for b in candidates if probe["fixed_bytes"] + b * probe["bytes_per_pair"] <= 0.95 *
                probe["bytes_limit"]]
        candidates = fits or candidates[-1:]
    rows, tried = [], []
    for b in candidates:
        try:
            rows.append(mfu_step(config, params, b, repeats, peak, spec))
            break
        except Exception as e:  # noqa: BLE001: out of memory at this size: the next one down
            if not out_of_memory(e):
                raise
            tried.append(b)
            gc.collect()
    if not rows:
        return [{"error": f"out of memory at every batch of {MFU_BATCHES[size]}", "probe": probe}]
    rows[0]["out_of_memory_at"], rows[0]["memory_probe"] = tried, probe
    print(json.dumps(rows[0]), flush=True)
    batch = rows[0]["batch"]
    for options, b in (({"patch_dropout": 0.5}, batch), ({"accum_steps": 4}, 4 * batch)):
        try:
            rows.append(mfu_step(config, params, b, repeats, peak, spec, **options))
        except Exception as e:  # noqa: BLE001: keep the other figures
            rows.append({"error": f"{options} batch {b}: {type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmark-gpu.json")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated among {','.join(CASES)} (default: all; with --size tiny, train-mfu)")
    parser.add_argument("--size", default="B16", choices=tuple(CLIP_CFGS),
                        help="the train-mfu model: B16 (open_clip's ViT-B-16) or tiny (2 layers, to check the path)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--skip-forward", type=int, default=0, help="skip the first N forward cases")
    parser.add_argument("--skip-train", type=int, default=0, help="skip the first N train cases")
    parser.add_argument("--layer-loop", action="store_true", help="train with per-layer params (no scan)")
    args = parser.parse_args(argv)
    selected = (args.cases or ("train-mfu" if args.size == "tiny" else ",".join(CASES))).split(",")
    if set(selected) - set(CASES):
        parser.error(f"unknown cases {sorted(set(selected) - set(CASES))}; choose among {CASES}")
    if args.size != "B16" and set(selected) - {"train-mfu"}:
        parser.error("--size applies to train-mfu only: pass --cases train-mfu")
    results = {"machine": machine(), "cases": []}
    peak = bf16_peak(8192 if args.size == "B16" else 1024)
    results["bf16_matmul_peak_tflops"] = peak
    results["bf16_spec_tflops"] = spec_peak(jax.devices()[0].device_kind)
    jobs = []
    if "forward" in selected or "train" in selected:
        side = build("B16", flax=False)
        side.params = jax.device_put(side.params)
        if "forward" in selected:
            jobs += [lambda b=b, d=d: forward_case(side, b, 32, d, args.repeats)
                     for b, d in ((32, "float32"), (32, "bfloat16"), (256, "bfloat16"))][args.skip_forward:]
        if "train" in selected:
            jobs += [lambda lk=lk, c=c: train_case(side, args.train_batch, 32, args.repeats, peak, lk, c,
                                                   args.layer_loop)
                     for lk, c in (((), False), (("vision",), True))][args.skip_train:]
    for job in jobs:
        try:
            results["cases"].append(job())
        except Exception as e:  # keep the other figures when one case fails (e.g. out of memory)
            results["cases"].append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(results["cases"][-1]), flush=True)
    if "train-mfu" in selected:
        start = time.perf_counter()
        results["cases"] += train_mfu(args.size, args.repeats, peak)
        results["train_mfu_wall_s"] = time.perf_counter() - start
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"bf16 matmul peak {peak:.4g} TFLOP/s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
