"""python -m benchmarks.patch_dropout [--batch 8] [--repeats 5] [--step own|dualenc]: the train step of a
ViT-B/16 CLIP (224 px, CLIP's base text tower) on CPU in float32, without patch dropout and with it (FLIP).

One jitted step per rate: value_and_grad of the CLIP loss over both towers (the vision tower called with
patch_dropout and a fresh patch_key each step) and the house AdamW update (dualenc.train.default_optimizer),
params and optimizer state donated. `--step dualenc` times dualenc.train.make_train_step(patch_dropout=p)
instead. The rates run in turns (p0, p1, p0, p1, ...) so that other work on the machine hits them alike;
medians and their ratio are reported. Random weights; texts of 32 tokens, as the other train cases.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clip_b16():
    import dualenc

    vision = dualenc.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, image_size=224, patch_size=16)
    text = dualenc.CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=8, vocab_size=49408, max_position_embeddings=77)
    return dualenc.DualEncoderConfig(vision, text, projection_dim=512, model_type="clip")


def own_step(config, optimizer, rate: float):
    """(params, opt_state, batch, key) -> (params, opt_state, loss), jitted, params and state donated."""
    import jax
    import optax

    from dualenc import losses, model

    def loss_fn(params, batch, key):
        flags = {"patch_dropout": rate, "patch_key": key} if rate else {}
        vision = model.run_tower(params, config, "vision", batch, pooled=True, **flags)
        text = model.run_tower(params, config, "text", batch, pooled=True)
        image_embeds = model.normalize(model.project(params, "vision", vision.pooler_output))
        text_embeds = model.normalize(model.project(params, "text", text.pooler_output))
        return losses.clip_loss(text_embeds, image_embeds, params["logit_scale"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def runner(kind: str, config, params, batch, rate: float):
    """A no-argument function that runs one train step (blocking) at patch dropout `rate`."""
    import jax
    import jax.numpy as jnp

    import dualenc

    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=1000)
    if kind == "dualenc":
        step = dualenc.train.make_train_step(config, optimizer, patch_dropout=rate)
        holder = [dualenc.train.init_state(params, optimizer)]

        def run():
            holder[0], metrics = step(holder[0], batch)
            jax.block_until_ready(metrics)
        return run
    step = own_step(config, optimizer, rate)
    fresh = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    holder = [fresh, optimizer.init(fresh), 0]

    def run():
        params_, state, count = holder
        params_, state, loss = step(params_, state, batch, jax.random.fold_in(jax.random.key(1), count))
        holder[:] = [params_, state, count + 1]
        jax.block_until_ready(loss)
    return run


def measure(batch: int, rates: list[float], repeats: int, kind: str, length: int = 32) -> dict:
    import jax
    import numpy as np

    import dualenc
    from benchmarks.common import interleaved
    from dualenc.towers import vit

    config = clip_b16()
    params = dualenc.init(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.text.vocab_size - 1, (batch, length)).astype(np.int32)
    ids[:, -1] = config.text.vocab_size - 1  # the end-of-text token (the highest id) pools
    data = dict(input_ids=jax.numpy.asarray(ids), attention_mask=jax.numpy.ones((batch, length), np.int32),
                pixel_values=jax.numpy.asarray(rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)))
    fns, compile_s = {}, {}
    for rate in rates:
        name = f"p={rate}"
        fns[name] = runner(kind, config, params, data, rate)
        start = time.perf_counter()
        fns[name]()  # trace, compile and the first step
        compile_s[name] = time.perf_counter() - start
        print(f"{name}: first call {compile_s[name]:.1f} s", flush=True)
    del params
    steps = {name: [] for name in fns}

    def timed(name, fn):  # also the CPU seconds of every thread of this process: steadier on a shared machine
        def run():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            steps[name].append((time.perf_counter() - start, time.process_time() - cpu))
        return run

    medians = interleaved({name: timed(name, fn) for name, fn in fns.items()}, repeats, warmup=1)
    patches = config.vision.num_patches
    rows = []
    for rate, name in zip(rates, fns):
        wall, cpu = zip(*steps[name][-repeats:])
        rows.append({"patch_dropout": rate, "tokens": 1 + (vit.kept_count(rate, patches) if rate else patches),
                     "median_s": medians[name], "median_cpu_s": float(np.median(cpu)), "steps_s": wall,
                     "steps_cpu_s": cpu, "first_call_s": compile_s[name]})
    for row in rows:
        row["vs_p0"] = row["median_s"] / rows[0]["median_s"]
        row["cpu_vs_p0"] = row["median_cpu_s"] / rows[0]["median_cpu_s"]
        print(f"p={row['patch_dropout']}: {row['tokens']} vision tokens, median {row['median_s']:.3f} s "
              f"({row['vs_p0']:.3f}x of p={rows[0]['patch_dropout']}), CPU {row['median_cpu_s']:.2f} s "
              f"({row['cpu_vs_p0']:.3f}x)", flush=True)
    return {"model": "ViT-B/16 224 px + CLIP base text tower (random weights)", "dtype": "float32",
            "batch": batch, "text_length": length, "repeats": repeats, "step": kind, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rates", default="0,0.5", help="patch dropout rates, comma-separated (the first is the "
                                                         "baseline)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step", default="own", choices=("own", "dualenc"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results-cpu-patch-dropout.json"))
    args = parser.parse_args()
    from benchmarks.common import machine, write_results

    results = measure(args.batch, [float(r) for r in args.rates.split(",")], args.repeats, args.step)
    write_results(args.out, {"machine": machine(), **results})


if __name__ == "__main__":
    main()
