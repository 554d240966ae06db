"""The benchmark cases: each returns a dict of figures (seconds are medians of interleaved runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dualenc
from benchmarks.common import (block, build, dualenc_config, forward_flops, hf_config, inputs, interleaved,
                               transformers_module)

FORWARD_STATIC = ("dtype", "pooled_only")


def _torch_forward(model, batch, autocast=None):
    import torch

    def run():
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            if autocast is None:
                return model(**tensors).logits_per_image
            with torch.autocast("cpu", dtype=autocast):
                return model(**tensors).logits_per_image
    return run


def _flax_forward(flax_model, batch):
    fn = jax.jit(lambda params, ids, px, mask: flax_model(ids, px, mask, params=params).logits_per_image)

    def run():
        return block(fn(flax_model.params, batch["input_ids"], batch["pixel_values"], batch["attention_mask"]))
    return run, fn


def forward(size: str, batch_size: int, length: int, *, repeats: int, peak: float | None = None,
            dtype: str = "float32") -> dict:
    """Contrastive forward throughput of dualenc, transformers PyTorch and (if installed) Flax, same weights."""
    import torch

    side = build(size, flax=dtype == "float32")
    batch = inputs(side.config, batch_size, length)
    jax_dtype = None if dtype == "float32" else jnp.dtype(dtype)
    fwd = jax.jit(dualenc.apply, static_argnames=FORWARD_STATIC)

    stacked = dualenc.stack_layers(side.params)  # load_pretrained's default is per-layer

    def ours(params, pooled_only=False):  # pooled_only: the same logits, the last layers on the first token
        return lambda: block(fwd(params, side.config, **batch, dtype=jax_dtype,
                                 pooled_only=pooled_only).logits_per_image)

    fns = {"dualenc": ours(side.params), "dualenc stacked": ours(stacked),
           "dualenc pooled_only": ours(side.params, True), "dualenc stacked pooled_only": ours(stacked, True),
           "torch": _torch_forward(side.torch_model, batch, None if dtype == "float32" else torch.bfloat16)}
    if side.flax_model is not None:
        fns["flax"], _ = _flax_forward(side.flax_model, batch)

    def as_numpy(x):
        return x.float().numpy() if hasattr(x, "float") else np.asarray(x, np.float32)

    # the reference is PyTorch in float32, also for reduced-precision runs
    reference = as_numpy(_torch_forward(side.torch_model, batch)())
    diffs = {name: float(np.max(np.abs(as_numpy(fn()) - reference))) for name, fn in fns.items()}
    times = interleaved(fns, repeats)
    flops = forward_flops(side.config, batch_size, batch_size, length)
    out = {"case": f"forward {size} batch {batch_size} x {length} tokens {dtype}", "flops": flops,
           "seconds": times, "logits_max_abs_diff_vs_torch": diffs,
           "gflops_per_s": {k: flops / t / 1e9 for k, t in times.items()},
           "torch_time_over": {k: times["torch"] / t for k, t in times.items() if k.startswith("dualenc")}}
    if peak:
        out["fraction_of_peak"] = {k: flops / t / 1e9 / peak for k, t in times.items()}
    return out


def compile_and_init(size: str = "B16", length: int = 32, batch_size: int = 8) -> dict:
    """Compile of the jitted forward (dualenc vs Flax), and random init against drawing that many normals."""
    side = build(size)
    out = {"case": f"compile and init {size}"}
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # XLA's one-time start-up, out of the first timing below
    compiles = {"dualenc": [], "flax": []} if side.flax_model is not None else {"dualenc": []}
    for n in (batch_size, batch_size - 1, batch_size - 2):  # new shapes: a real compile each time
        shaped = inputs(side.config, n, length)
        start = time.perf_counter()
        jax.jit(dualenc.apply).lower(side.params, side.config, **shaped).compile()
        compiles["dualenc"].append(time.perf_counter() - start)
        if side.flax_model is not None:
            _, fn = _flax_forward(side.flax_model, shaped)
            start = time.perf_counter()
            fn.lower(side.flax_model.params, shaped["input_ids"], shaped["pixel_values"],
                     shaped["attention_mask"]).compile()
            compiles["flax"].append(time.perf_counter() - start)
    out["compile_forward_s"] = {k: float(np.median(v)) for k, v in compiles.items()}
    out["compile_forward_each_s"] = compiles  # the first includes one-time tracing machinery
    n = dualenc.num_params(side.params)
    # The floor: drawing n normals with jax.random.normal, in 16M chunks (one 200M draw runs 3x slower per
    # number than 16M ones here: its counters no longer fit in cache).
    chunk = 1 << 24
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    draw = jax.jit(lambda key: [jax.random.normal(k, (m,), jnp.float32)
                                for k, m in zip(jax.random.split(key, len(sizes)), sizes)])
    timings = {}
    for label, fn in (("dualenc.init", lambda k: dualenc.init(k, side.config)), ("jax.random.normal", draw)):
        block(fn(jax.random.key(1)))
        timings[label] = {"warm_s": interleaved({"x": lambda: block(fn(jax.random.key(2)))}, 3, warmup=0)["x"]}
    # First calls in fresh processes: in this one, loading the Flax model already compiled its init's kernels.
    timings["dualenc.init"]["first_call_s"] = _fresh_init(size, "dualenc")
    if side.flax_model is not None:
        timings["flax init"] = {"first_call_s": _fresh_init(size, "flax")}
    out.update(params=n, init=timings,
               init_over_normal_warm=timings["dualenc.init"]["warm_s"] / timings["jax.random.normal"]["warm_s"])
    return out


def _in_fresh_process(statement: str) -> str:
    """Runs `statement` (with this module imported as `cases`) in a new Python; returns its last output line."""
    code = f"import sys; sys.path.insert(0, {os.getcwd()!r}); from benchmarks import cases; {statement}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def _fresh_init(size: str, who: str) -> float:
    """Seconds of the first random init (trace, compile, run) in a new process, imports excluded."""
    return float(_in_fresh_process(f"print(cases._init_child({size!r}, {who!r}))"))


def _init_child(size: str, who: str) -> float:
    if who == "flax":
        config = hf_config(size)
        start = time.perf_counter()
        block(transformers_module().FlaxVisionTextDualEncoderModel(config, seed=3).params)
    else:
        config = dualenc_config(size)
        start = time.perf_counter()
        block(dualenc.init(jax.random.key(3), config))
    return time.perf_counter() - start


def train_step_compile(size: str = "B16", length: int = 32, batch_size: int = 8) -> dict:
    side = build(size, flax=False)
    batch = inputs(side.config, batch_size, length)
    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=100)
    state = dualenc.train.init_state(side.params, optimizer)
    step = dualenc.train.make_train_step(side.config, optimizer, donate=False)
    start = time.perf_counter()
    block(step(state, batch)[1])
    return {"case": f"train step first call (trace + compile + 1 step) {size}", "seconds": time.perf_counter() - start}


def lit_step(size: str = "B16", batch_size: int = 8, length: int = 32, *, repeats: int) -> dict:
    """LiT (locked vision, tuned text) step per pair: dualenc with and without the cache, torch frozen vision."""
    import torch

    side = build(size, flax=False)
    batch = inputs(side.config, batch_size, length)
    optimizer = dualenc.train.default_optimizer(1e-4, total_steps=1000)
    states, steps, batches = {}, {}, {}
    features = dualenc.train.tower_features(side.params, side.config, "vision",
                                            {"pixel_values": batch["pixel_values"]}, batch_size=batch_size)
    for name, cached, dtype in (("dualenc cached", True, None), ("dualenc", False, None),
                                ("dualenc cached bf16", True, jnp.bfloat16)):
        states[name] = dualenc.train.init_state(side.params, optimizer, locked=("vision",))
        steps[name] = dualenc.train.make_train_step(side.config, optimizer, locked=("vision",), cached=cached,
                                                    dtype=dtype)
        batches[name] = ({k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": features}
                         if cached else batch)

    def ours(name):
        def run():
            states[name], metrics = steps[name](states[name], batches[name])
            block(metrics["loss"])
        return run

    model = side.torch_model.train()
    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}

    def theirs(autocast=None):
        def step():
            torch_opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                with torch.no_grad():
                    pooled = model.vision_model(pixel_values=tensors["pixel_values"]).pooler_output
                image = model.visual_projection(pooled)
                text = model.text_projection(model.text_model(input_ids=tensors["input_ids"],
                                                              attention_mask=tensors["attention_mask"]).pooler_output)
            image, text = image.float(), text.float()
            image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
            logits = model.logit_scale.exp() * text @ image.T
            labels = torch.arange(len(logits))
            loss = (torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            torch_opt.step()
        return step

    times = interleaved({"dualenc cached": ours("dualenc cached"), "dualenc": ours("dualenc"), "torch": theirs(),
                         "dualenc cached bf16": ours("dualenc cached bf16"),
                         "torch autocast bf16": theirs(torch.bfloat16)}, repeats)
    per_pair = {k: t / batch_size for k, t in times.items()}
    return {"case": f"LiT step {size} batch {batch_size} x {length} tokens (locked vision)",
            "seconds_per_pair": per_pair,
            "speedup_vs_torch_float32": {k: times["torch"] / t for k, t in times.items() if k.startswith("dualenc")},
            "bf16_speedup_vs_torch_bf16": times["torch autocast bf16"] / times["dualenc cached bf16"],
            "cache_speedup": times["dualenc"] / times["dualenc cached"]}


def encode_images(size: str = "B16", n: int = 256, batch_size: int = 32, *, repeats: int = 2) -> dict:
    """encode_images over n generated 256x256 images (host preprocessing included), with transformers beside."""
    import torch

    side = build(size, flax=False)
    processor = dualenc.ImageProcessor(size={"height": side.config.vision.image_hw[0],
                                             "width": side.config.vision.image_hw[1]})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]
    tf = transformers_module()
    hf_processor = tf.ViTImageProcessor(size={"height": side.config.vision.image_hw[0],
                                              "width": side.config.vision.image_hw[1]})

    def theirs():
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                px = hf_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
                side.torch_model.get_image_features(pixel_values=px)

    times = interleaved({"dualenc": lambda: dualenc.encode_images(side.params, side.config, processor, images,
                                                                  batch_size=batch_size, progress=False),
                         "torch": theirs}, repeats)
    return {"case": f"encode {n} images {size} batch {batch_size}", "images_per_s": {k: n / t for k, t in
                                                                                     times.items()},
            "speedup_vs_torch": times["torch"] / times["dualenc"]}


def peak_memory(size: str = "B16", batch_size: int = 8, length: int = 32) -> dict:
    """Peak resident memory of a process that builds the model and runs one forward (each framework alone)."""
    out = {}
    for who in ("dualenc", "torch"):
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent into the child.
        out[who] = int(_in_fresh_process(
            f"cases._memory_child({size!r}, {batch_size}, {length}, {who!r}); "
            f"print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")) / 1024
    return {"case": f"peak RSS, build + one forward, {size} batch {batch_size}", "MiB": out}


def _memory_child(size, batch_size, length, who):
    import torch

    config = dualenc_config(size)
    batch = inputs(config, batch_size, length)
    if who == "torch":
        model = transformers_module().VisionTextDualEncoderModel(hf_config(size)).eval()
        with torch.inference_mode():
            model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    else:
        params = dualenc.init(jax.random.key(0), config)
        block(jax.jit(dualenc.apply)(params, config, **batch).logits_per_image)


def demo(steps: int = 2000) -> dict:
    """The full `dualenc demo` run, timed end to end in a fresh process."""
    import json
    import shutil
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="dualenc-demo-")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dualenc.cli", "demo", "--steps", str(steps), "--json", "--out",
                           out_dir], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    figures = json.loads(done.stdout)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"case": f"dualenc demo ({steps} steps)", "wall_s": wall,
            **{k: figures[k] for k in ("zero_shot_accuracy", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5",
                                       "train_seconds")}}
