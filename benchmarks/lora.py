"""python -m benchmarks.lora [--rank 8]: what LoRA trains and keeps beside a full fine-tune of a ViT-B/16 CLIP.

Counts from jax.eval_shape (nothing is allocated): the params, the adapters of each LoRA setting, and AdamW's
state (two moments per trained number, dualenc.train.clipped_adamw) for each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import dualenc  # noqa: E402
from dualenc import lora  # noqa: E402
from dualenc.train import clipped_adamw  # noqa: E402


def clip_b16() -> dualenc.DualEncoderConfig:
    """transformers' CLIPConfig default sizes (ViT-B/32's) with 16-pixel patches: ViT-B/16 CLIP."""
    return dualenc.DualEncoderConfig(dualenc.CLIPVisionConfig(patch_size=16), dualenc.CLIPTextConfig(),
                                     projection_dim=512, model_type="clip")


def counts(config: dualenc.DualEncoderConfig, rank: int) -> dict:
    params = jax.eval_shape(lambda: dualenc.init(jax.random.key(0), config))
    full = lora.count(params)
    adam = lora.count(jax.eval_shape(clipped_adamw(1e-3).init, params))
    out = {"model": "ViT-B/16 CLIP", "params": full, "full fine-tune": {"trained": full, "adamw_state": adam}}
    for targets in ("attention", "mlp", "both"):
        spec = lora.LoRA(rank=rank, alpha=2 * rank, targets=targets)
        adapters = jax.eval_shape(lambda spec=spec: lora.init(jax.random.key(0), params, config, spec))
        state = lora.count(jax.eval_shape(clipped_adamw(1e-3).init, adapters))
        out[f"rank {rank}, {targets}, both towers"] = {"trained": lora.count(adapters), "adamw_state": state,
                                                       "state_ratio": state / adam}
    return out


def merge_time(config: dualenc.DualEncoderConfig, rank: int, repeats: int = 5) -> dict:
    """Seconds of one jitted lora.merge of every attention and MLP kernel (per-layer params), median of
    `repeats` after a warm-up: what a LoRA train step adds to its forward before the towers run."""
    import time

    import numpy as np

    params = dualenc.init(jax.random.key(0), config)
    spec = lora.LoRA(rank=rank, alpha=2 * rank, targets="both")
    adapters = lora.init(jax.random.key(1), params, config, spec)
    merge = jax.jit(lora.merge)
    jax.block_until_ready(merge(params, adapters, spec))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(merge(params, adapters, spec))
        times.append(time.perf_counter() - start)
    return {"merge_seconds": float(np.median(times)), "device": str(jax.devices()[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--time", action="store_true", help="also time one jitted merge (allocates the model)")
    args = parser.parse_args()
    out = counts(clip_b16(), args.rank)
    if args.time:
        out["merge"] = merge_time(clip_b16(), args.rank)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
