"""Timing, FLOP counting, machine facts and the side-by-side model builders shared by the benchmark cases."""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import dualenc


def write_results(path: str, results: dict) -> None:
    """Writes a benchmark's results as JSON (through a temporary file) and says where."""
    import json

    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in turns (a, b, a, b, ...) so drift hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def block(x):
    return jax.block_until_ready(x)


def matmul_peak(repeats: int = 5) -> dict[str, float]:
    """The float32 (and bfloat16) GFLOP/s of large jnp.dot calls; the best median over a few sizes."""
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        best = 0.0
        for n in (2048, 3072, 4096):
            a = jnp.asarray(np.random.default_rng(0).random((n, n)), dtype)
            dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
            t = interleaved({"dot": lambda: block(dot(a, a))}, repeats)["dot"]
            best = max(best, 2 * n ** 3 / t / 1e9)
        out[jnp.dtype(dtype).name] = best
    return out


def torch_matmul_peak(repeats: int = 5) -> float:
    import torch

    best = 0.0
    for n in (2048, 3072, 4096):
        a = torch.rand(n, n)
        t = interleaved({"dot": lambda: a @ a}, repeats)["dot"]
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def forward_flops(config: dualenc.DualEncoderConfig, n_images: int, n_texts: int, length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of the contrastive forward."""
    def encoder(c, tokens):
        d, i = c.hidden_size, c.intermediate_size
        per_layer = 2 * tokens * (4 * d * d + 2 * d * i) + 4 * tokens * tokens * d
        return c.num_hidden_layers * per_layer

    v, t = config.vision, config.text
    ph, pw = v.patch_hw
    vision = encoder(v, v.num_patches + 1) + 2 * v.num_patches * v.num_channels * ph * pw * v.hidden_size
    vision += 2 * v.hidden_size * (v.hidden_size + config.projection_dim)
    text = encoder(t, length) + 2 * t.hidden_size * (t.hidden_size + config.projection_dim)
    return n_images * vision + n_texts * text


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    import importlib.metadata

    for name in ("torch", "transformers", "flax"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


# ------------------------------------------------------------------------------------------------ models

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SIZES = {
    # ViT-B/16 at 224 px + BERT-base
    "B16": (dict(), dict(), 512),
    # ViT-S/16 at 96 px + a MiniLM-sized BERT (384 wide, 6 layers)
    "small": (dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, image_size=96),
              dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536), 256),
    # under 1M params, as in the tests
    "tiny": (dict(**TINY, image_size=30, patch_size=10), dict(**TINY, vocab_size=99, max_position_embeddings=64),
             16),
}


def transformers_module():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def has_flax_model() -> bool:
    try:
        tf = transformers_module()
        import flax  # noqa: F401

        return hasattr(tf, "FlaxVisionTextDualEncoderModel")
    except ImportError:
        return False


@dataclasses.dataclass
class SideBySide:
    """One set of random weights in dualenc, transformers' PyTorch model and (when installed) its Flax model."""

    config: dualenc.DualEncoderConfig
    params: dict
    torch_model: object
    flax_model: object | None
    directory: str


def hf_config(size: str):
    """transformers' VisionTextDualEncoderConfig for one of SIZES."""
    tf = transformers_module()
    vision_kw, text_kw, projection_dim = SIZES[size]
    return tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        tf.ViTConfig(**vision_kw), tf.BertConfig(**text_kw), projection_dim=projection_dim)


def dualenc_config(size: str) -> dualenc.DualEncoderConfig:
    """The same model as hf_config(size), as a dualenc config."""
    vision_kw, text_kw, projection_dim = SIZES[size]
    return dualenc.DualEncoderConfig(dualenc.ViTConfig(**vision_kw), dualenc.BertConfig(**text_kw),
                                     projection_dim=projection_dim)


def build(size: str, seed: int = 0, flax: bool = True) -> SideBySide:
    import torch

    tf = transformers_module()
    config = hf_config(size)
    torch.manual_seed(seed)
    model = tf.VisionTextDualEncoderModel(config).eval()
    directory = tempfile.mkdtemp(prefix=f"dualenc-bench-{size}-")
    model.save_pretrained(directory)
    config, params = dualenc.load_pretrained(directory)
    flax_model = None
    if flax and has_flax_model():
        flax_model = tf.FlaxVisionTextDualEncoderModel.from_pretrained(directory, from_pt=True)
    return SideBySide(config, params, model, flax_model, directory)


def inputs(config: dualenc.DualEncoderConfig, n: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    v = config.vision
    return dict(input_ids=rng.integers(1, config.text.vocab_size, (n, length)).astype(np.int64),
                attention_mask=np.ones((n, length), np.int64),
                pixel_values=rng.standard_normal((n, v.num_channels, *v.image_hw)).astype(np.float32))
