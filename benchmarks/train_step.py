"""python -m benchmarks.train_step: the CLIP train step in dualenc against open_clip's own step in PyTorch.

One set of random weights: open_clip draws its "ViT-B-16" (224 px, its text tower at 77 tokens), the weights
go to a folder in open_clip's hub layout and into dualenc through `load_pretrained`. The PyTorch side is
open_clip_train's step as train.py and main.py write it: model.train(), AdamW with weight decay on the >= 2-d
params that are not norms, biases or the logit scale, cosine schedule, zero_grad, forward, ClipLoss, backward,
clip_grad_norm_, step, logit scale clamped at log 100. dualenc: `make_train_step` with `default_optimizer`
(the same betas, eps, decay, clipping and schedule). float32, one batch of tokenized captions and random
pixels; each case first checks that both sides compute the same loss from the same weights, then times them
in turns (benchmarks.common.interleaved) and reports medians and images/s, and the median CPU seconds
the process burns per step (all threads: steadier than wall time on a shared machine).

Cases: "clip" (both towers trained; "stacked": the same with dualenc's stacked layer layout), "lit" (vision
locked: dualenc with the cache of pooled image features and without it, against open_clip's
`lock_image_tower()`), "patch-dropout" (`--patch-dropout`, FLIP; open_clip
with the same rate in its vision config), "accum" (`--accum-steps K` micro-batches of one global batch:
dualenc's exact accumulation against open_clip's `--accum-freq K` path). `--profile` adds per-part times of
each tower's forward and backward and of dualenc's optimizer update, and the float32 matmul peaks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dualenc  # noqa: E402
from benchmarks.common import block, interleaved, machine, matmul_peak, torch_matmul_peak, write_results  # noqa

CASES = ("clip", "stacked", "lit", "patch-dropout", "accum")
LR, WEIGHT_DECAY, BETAS, EPS, CLIP_NORM, TOTAL_STEPS = 1e-4, 0.1, (0.9, 0.98), 1e-6, 1.0, 1000
TINY_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                            "head_width": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
WORDS = ("a photo of the small large red blue dog cat on in with two people street car tree house water "
         "sitting standing next to near white black man woman plate food table field grass sky").split()


def open_clip_module():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torchvision_shim

    torchvision_shim.install()
    import open_clip

    return open_clip


class Weights:
    """open_clip's model config and one random set of its weights, in a folder in open_clip's hub layout: read
    into dualenc with load_pretrained and into a fresh open_clip model on each call (nothing held between)."""

    def __init__(self, size: str, seed: int = 0):
        import torch
        from safetensors.torch import save_file

        oc = open_clip_module()
        torch.manual_seed(seed)
        if size == "B16":
            model = oc.create_model("ViT-B-16", pretrained=None, output_dict=True)
            self.cfg = oc.get_model_config("ViT-B-16")
        else:
            model = oc.CLIP(**TINY_CFG, output_dict=True)
            self.cfg = TINY_CFG
        self.size, self.root = size, tempfile.mkdtemp(prefix=f"dualenc-bench-train-{size}-")
        with open(os.path.join(self.root, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": self.cfg, "preprocess_cfg": {}}, f)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(self.root, "open_clip_model.safetensors"))
        self.config = self.params()[0]

    def params(self):
        """(config, params) through dualenc.load_pretrained."""
        return dualenc.load_pretrained(self.root)

    def torch_model(self, patch_dropout: float = 0.0):
        """A fresh open_clip model holding the weights, in train mode."""
        from safetensors.torch import load_file

        oc = open_clip_module()
        if self.size == "B16":
            model = oc.create_model("ViT-B-16", pretrained=None, output_dict=True,
                                    force_patch_dropout=patch_dropout or None)
        else:
            cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "patch_dropout": patch_dropout}}
            model = oc.CLIP(**cfg, output_dict=True)
        model.load_state_dict(load_file(os.path.join(self.root, "open_clip_model.safetensors")))
        return model.train()


def batch(weights: Weights, n: int, seed: int = 0) -> dict:
    """n captions of 4 to 40 words through open_clip's tokenizer (77 tokens), and random normal pixels."""
    oc = open_clip_module()
    rng = np.random.default_rng(seed)
    captions = [" ".join(rng.choice(WORDS, int(rng.integers(4, 41)))) for _ in range(n)]
    size = weights.cfg["vision_cfg"]["image_size"]
    return {"input_ids": oc.get_tokenizer("ViT-B-16")(captions).numpy(),
            "pixel_values": rng.standard_normal((n, 3, size, size)).astype(np.float32)}


class TorchStep:
    """open_clip_train's train_one_epoch step (fp32, no grad scaler) with main.py's AdamW groups and schedule."""

    def __init__(self, model, data: dict, *, locked: bool = False, accum_steps: int = 1):
        import torch
        from open_clip_train.scheduler import cosine_lr

        oc = open_clip_module()
        if locked:  # LiT, as main.py's --lock-image; the projection trains, as dualenc's locked tower's does
            model.lock_image_tower()
            model.visual.proj.requires_grad_(True)
        named = list(model.named_parameters())
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
              "weight_decay": WEIGHT_DECAY}], lr=LR, betas=BETAS, eps=EPS)
        self.scheduler = cosine_lr(self.optimizer, LR, 0, TOTAL_STEPS)
        self.model, self.loss, self.accum_steps = model, oc.ClipLoss(), accum_steps
        self.images, self.texts = (torch.from_numpy(data[k]) for k in ("pixel_values", "input_ids"))
        self.count, self.parts = 0, {"forward": [], "backward": [], "optimizer": []}

    def __call__(self) -> float:
        import torch

        model, clock = self.model, [time.perf_counter()]
        self.scheduler(self.count)
        self.optimizer.zero_grad()
        if self.accum_steps == 1:
            out = model(self.images, self.texts)
            total = sum(self.loss(**out, output_dict=True).values())
            clock.append(time.perf_counter())
            total.backward()
        else:  # train.py's accum_freq path: features of every micro-batch without grad, then each again with
            k = self.accum_steps
            images, texts = self.images.chunk(k), self.texts.chunk(k)
            features = {}
            with torch.no_grad():
                for i, t in zip(images, texts):
                    out = model(i, t)
                    for key in ("logit_scale", "logit_bias"):
                        out.pop(key, None)
                    for key, value in out.items():
                        features.setdefault(key, []).append(value)
            clock.append(time.perf_counter())
            for j in range(k):
                out = model(images[j], texts[j])
                scale = {"logit_scale": out.pop("logit_scale")}
                inputs = {key: torch.cat(v[:j] + [out[key]] + v[j + 1:]) for key, v in features.items()}
                total = sum(self.loss(**inputs, **scale, output_dict=True).values())
                total.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        clock.append(time.perf_counter())
        for name, a, b in zip(self.parts, clock, clock[1:]):
            self.parts[name].append(b - a)
        self.count += 1
        return float(total.detach())


class OursStep:
    """dualenc's make_train_step on the same weights and batch (the batch placed on the device once)."""

    def __init__(self, weights: Weights, data: dict, *, locked=(), cached=False, layer_loop=True, **options):
        optimizer = dualenc.train.default_optimizer(LR, total_steps=TOTAL_STEPS, warmup_steps=0,
                                                    weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM, b1=BETAS[0],
                                                    b2=BETAS[1], eps=EPS)
        params = weights.params()[1]
        self.state = dualenc.train.init_state(params, optimizer, locked=locked, layer_loop=layer_loop)
        self.step = dualenc.train.make_train_step(weights.config, optimizer, locked=locked, cached=cached,
                                                  **options)
        inputs = {"input_ids": data["input_ids"].astype(np.int32), "pixel_values": data["pixel_values"]}
        if cached:
            features = dualenc.train.tower_features(params, weights.config, "vision",
                                                    {"pixel_values": data["pixel_values"]},
                                                    batch_size=len(data["pixel_values"]))
            inputs = {"input_ids": inputs["input_ids"], "image_features": features}
        self.batch = {k: jnp.asarray(v) for k, v in inputs.items()}
        self.optimizer = optimizer

    def __call__(self) -> float:
        self.state, metrics = self.step(self.state, self.batch)
        return float(block(metrics["loss"]))


def first_steps(sides: dict) -> dict:
    """Each side's first call (dualenc: trace + compile + step) timed, and the losses of two steps."""
    out = {"first_call_s": {}, "loss_step_1": {}, "loss_step_2": {}}
    for name, fn in sides.items():
        start = time.perf_counter()
        out["loss_step_1"][name] = fn()
        out["first_call_s"][name] = time.perf_counter() - start
        out["loss_step_2"][name] = fn()
    return out


def compare(title: str, sides: dict, reference: str, n: int, repeats: int, *, check: tuple = (),
            tolerance: float = 1e-4) -> dict:
    """First steps, the loss check between the sides named in check, then the interleaved timing."""
    out = {"case": title, **first_steps(sides)}
    for name in sides:
        if not np.isfinite(out["loss_step_1"][name]):
            raise RuntimeError(f"{title}: {name}'s loss is not finite")
    if check:
        diff = abs(out["loss_step_1"][check[0]] - out["loss_step_1"][check[1]])
        out["loss_step_1_abs_diff"] = diff
        if diff > tolerance:
            raise RuntimeError(f"{title}: the losses differ by {diff:.3g} (> {tolerance}): {out['loss_step_1']}")
    print(f"{title}: first steps {out['first_call_s']}, losses {out['loss_step_1']}", flush=True)
    cpu = {name: [] for name in sides}  # CPU seconds of the whole process (every thread) per call

    def counted(name):
        def run():
            start = time.process_time()
            sides[name]()
            cpu[name].append(time.process_time() - start)
        return run

    seconds = interleaved({name: counted(name) for name in sides}, repeats, warmup=0)
    cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    out.update(seconds=seconds, images_per_s={k: n / t for k, t in seconds.items()},
               ratio_vs_open_clip={k: seconds[reference] / t for k, t in seconds.items() if k != reference},
               cpu_seconds=cpu, cpu_ratio_vs_open_clip={k: cpu[reference] / t for k, t in cpu.items()
                                                        if k != reference})
    print(json.dumps(out), flush=True)
    return out


def clip_case(weights: Weights, data: dict, repeats: int, layer_loop: bool = True) -> dict:
    n = len(data["input_ids"])
    ours = "dualenc" if layer_loop else "dualenc stacked"
    sides = {ours: OursStep(weights, data, layer_loop=layer_loop), "open_clip": TorchStep(weights.torch_model(), data)}
    out = compare(f"CLIP train step {weights.size} batch {n} x 77 tokens, float32, "
                  f"{'per-layer params' if layer_loop else 'stacked params (lax.scan)'}", sides, "open_clip", n,
                  repeats, check=(ours, "open_clip"))
    out["open_clip_parts_s"] = {k: float(np.median(v[2:])) for k, v in sides["open_clip"].parts.items()}
    return out


def lit_case(weights: Weights, data: dict, repeats: int) -> dict:
    n = len(data["input_ids"])
    sides = {"dualenc cached": OursStep(weights, data, locked=("vision",), cached=True),
             "dualenc": OursStep(weights, data, locked=("vision",)),
             "open_clip": TorchStep(weights.torch_model(), data, locked=True)}
    return compare(f"LiT step {weights.size} batch {n} x 77 tokens, vision locked, float32", sides, "open_clip", n,
                   repeats, check=("dualenc cached", "open_clip"))


def patch_dropout_case(weights: Weights, data: dict, repeats: int, rate: float) -> dict:
    n = len(data["input_ids"])
    sides = {"dualenc": OursStep(weights, data, patch_dropout=rate),
             "open_clip": TorchStep(weights.torch_model(patch_dropout=rate), data)}
    return compare(f"CLIP train step {weights.size} batch {n}, patch_dropout {rate} (random patches: losses "
                   f"differ)", sides, "open_clip", n, repeats)


def accum_case(weights: Weights, data: dict, repeats: int, k: int) -> dict:
    n = len(data["input_ids"])
    sides = {"dualenc": OursStep(weights, data, accum_steps=k), "open_clip": TorchStep(weights.torch_model(), data,
                                                                                      accum_steps=k)}
    return compare(f"CLIP train step {weights.size} batch {n} in {k} micro-batches of {n // k}", sides, "open_clip",
                   n, repeats, check=("dualenc", "open_clip"))


def profile_parts(weights: Weights, data: dict, repeats: int) -> dict:
    """Each tower's forward and forward + backward alone (a scalar of its pooled output), in dualenc (per-layer
    and stacked params) and in open_clip, and dualenc's optimizer update alone; medians of interleaved runs."""
    import optax
    import torch

    config, fns = weights.config, {}
    params = weights.params()[1]
    layouts = {"": params, " stacked": dualenc.stack_layers(params)}
    inputs = {"vision": {"pixel_values": jnp.asarray(data["pixel_values"])},
              "text": {"input_ids": jnp.asarray(data["input_ids"].astype(np.int32))}}
    for side in ("vision", "text"):
        def scalar(params, x, side=side):
            return jnp.sum(dualenc.model.run_tower(params, config, side, x, pooled=True).pooler_output ** 2)

        forward, backward = jax.jit(scalar), jax.jit(jax.grad(scalar))
        for tag, params in layouts.items():
            fns[f"dualenc{tag} {side} forward"] = lambda f=forward, p=params, x=inputs[side]: block(f(p, x))
            fns[f"dualenc{tag} {side} forward + backward"] = lambda f=backward, p=params, x=inputs[side]: block(
                f(p, x))
    model = weights.torch_model()
    images, texts = torch.from_numpy(data["pixel_values"]), torch.from_numpy(data["input_ids"])
    for side, encode, x in (("vision", model.visual, images), ("text", model.encode_text, texts)):
        def forward(encode=encode, x=x):
            with torch.no_grad():
                encode(x)

        def backward(encode=encode, x=x):
            model.zero_grad(set_to_none=True)
            (encode(x) ** 2).sum().backward()

        fns[f"open_clip {side} forward"], fns[f"open_clip {side} forward + backward"] = forward, backward
    step = OursStep(weights, {k: v[:2] for k, v in data.items()})
    optimizer, state = step.optimizer, step.state
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), state.trainable)

    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(1, 2))
    holder = [state.opt_state, state.trainable]

    def run_update():
        holder[1], holder[0] = update(grads, holder[0], holder[1])
        block(holder[1])

    fns["dualenc optimizer update"] = run_update
    return interleaved(fns, repeats)


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="B16", choices=("B16", "tiny"), help="tiny: a 2-layer model, to check")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="clip,stacked,lit", help=f"comma-separated among {','.join(CASES)}")
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="adds the patch-dropout case at this rate")
    parser.add_argument("--accum-steps", type=int, default=1, help="adds the accum case with K micro-batches")
    parser.add_argument("--profile", action="store_true",
                        help="per-tower forward and backward times on both sides, and the matmul peaks")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "results-cpu-train-step.json"))
    parser.add_argument("--case-json", help=argparse.SUPPRESS)  # the per-case child process writes here
    args = parser.parse_args(argv)
    selected = [c for c in args.cases.split(",") if c]
    if set(selected) - set(CASES + ("profile",)):
        parser.error(f"unknown cases {sorted(set(selected) - set(CASES))}; choose among {CASES}")
    if args.patch_dropout and "patch-dropout" not in selected and not args.case_json:
        selected.append("patch-dropout")
    if args.accum_steps > 1 and "accum" not in selected and not args.case_json:
        selected.append("accum")
    if "patch-dropout" in selected and not 0 < args.patch_dropout < 1:
        parser.error("the patch-dropout case needs --patch-dropout in (0, 1)")
    if "accum" in selected and (args.accum_steps < 2 or args.batch % args.accum_steps):
        parser.error("the accum case needs --accum-steps >= 2 dividing --batch")
    import torch

    torch.set_num_threads(os.cpu_count())
    if args.case_json:  # a child: one case (or the profile), its figures to case_json
        weights = Weights(args.size)
        data = batch(weights, args.batch)
        case = selected[0]
        if case in ("clip", "stacked"):
            out = clip_case(weights, data, args.repeats, layer_loop=case == "clip")
        elif case == "lit":
            out = lit_case(weights, data, args.repeats)
        elif case == "patch-dropout":
            out = patch_dropout_case(weights, data, args.repeats, args.patch_dropout)
        elif case == "accum":
            out = accum_case(weights, data, args.repeats, args.accum_steps)
        else:
            out = {"case": f"parts {args.size} batch {args.batch}", "seconds": profile_parts(weights, data,
                                                                                            args.repeats),
                   "matmul_peak_gflops": {"jnp.dot float32": matmul_peak(3)["float32"],
                                          "torch float32": torch_matmul_peak(3)}}
        shutil.rmtree(weights.root, ignore_errors=True)
        with open(args.case_json, "w") as f:
            json.dump(out, f)
        return 0
    results = {"machine": machine(), "torch_num_threads": torch.get_num_threads(), "argv": sys.argv[1:],
               "load_before": load_average(), "cases": []}
    common = ["--size", args.size, "--batch", str(args.batch), "--repeats", str(args.repeats),
              "--patch-dropout", str(args.patch_dropout), "--accum-steps", str(args.accum_steps)]
    for case in selected + (["profile"] if args.profile else []):  # one process each: bounded memory
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, "-m", "benchmarks.train_step", *common, "--cases", case,
                            "--case-json", out.name], check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            results["cases"].append(json.load(open(out.name)))
        results["cases"][-1]["load_after"] = load_average()
    results["load_after"] = load_average()
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
