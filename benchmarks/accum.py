"""python -m benchmarks.accum [--size small] [--batch 256]: peak memory of the compiled train step against the
number of micro-batches (exact gradient accumulation, dualenc.train.accumulate), for one global batch.

Nothing is run: the step is lowered on shapes alone (jax.ShapeDtypeStruct) and compiled for this machine's
CPU, and XLA's `memory_analysis()` gives what its buffers need: the arguments (params, optimizer state, batch),
the outputs, and the temporaries (activations kept for the backward pass, gradients). The peak is
arguments + outputs + temporaries - the outputs that alias donated arguments. Text at 32 tokens; the params
in the stacked layout (lax.scan over layers, which compiles fastest).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(size: str, batch: int, steps: list[int], loss: str) -> list[dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dualenc
    from benchmarks.common import dualenc_config

    config = dualenc_config(size)
    if loss == "siglip":
        config = dataclasses.replace(config, logit_scale_init_value=float(np.log(10)), logit_bias_init_value=-10.0)
    optimizer = dualenc.train.default_optimizer(1e-3, total_steps=100)
    state = jax.eval_shape(lambda: dualenc.train.init_state(
        dualenc.init(jax.random.key(0), config, stacked=True), optimizer, layer_loop=False))
    v = config.vision
    shapes = dict(input_ids=jax.ShapeDtypeStruct((batch, 32), jnp.int32),
                  attention_mask=jax.ShapeDtypeStruct((batch, 32), jnp.int32),
                  pixel_values=jax.ShapeDtypeStruct((batch, v.num_channels, *v.image_hw), jnp.float32))
    rows = []
    for k in steps:
        step = dualenc.train.make_train_step(config, optimizer, loss=loss, accum_steps=k)
        start = time.perf_counter()
        memory = step.lower(state, shapes).compile().memory_analysis()
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
        rows.append({"accum_steps": k, "micro_batch": batch // k, "peak_mib": peak / 2 ** 20,
                     "temp_mib": memory.temp_size_in_bytes / 2 ** 20,
                     "arguments_mib": memory.argument_size_in_bytes / 2 ** 20,
                     "compile_seconds": time.perf_counter() - start})
        print(f"K={k:2d} micro-batch {batch // k:4d}: peak {rows[-1]['peak_mib']:9.1f} MiB "
              f"(temporaries {rows[-1]['temp_mib']:9.1f}, arguments {rows[-1]['arguments_mib']:8.1f})", flush=True)
    for row in rows:
        row["peak_vs_k1"] = row["peak_mib"] / rows[0]["peak_mib"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="a size of benchmarks.common.SIZES")
    parser.add_argument("--batch", type=int, default=256, help="the global batch")
    parser.add_argument("--steps", default="1,2,4,8", help="micro-batch counts, comma-separated")
    parser.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results-cpu-accum.json"))
    args = parser.parse_args()
    from benchmarks.common import machine, write_results

    rows = measure(args.size, args.batch, [int(k) for k in args.steps.split(",")], args.loss)
    write_results(args.out, {"machine": machine(), "size": args.size, "batch": args.batch, "loss": args.loss,
                             "rows": rows})


if __name__ == "__main__":
    main()
