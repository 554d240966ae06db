"""CLIP forward: dualenc beside transformers' PyTorch CLIPModel and open_clip's CLIP, one set of weights.

The weights are drawn by open_clip, loaded into dualenc from open_clip's layout, and written by dualenc as a
transformers CLIPModel directory for transformers to load: the converters are part of what runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np

import dualenc
from benchmarks.common import block, interleaved, transformers_module

VARIANTS = {"B32": 32, "B16": 16}
CONTEXT = 77


def _open_clip():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torchvision_shim

    torchvision_shim.install()
    import open_clip

    return open_clip


def build(variant: str, seed: int = 0):
    """(dualenc config, params, transformers CLIPModel, open_clip CLIP) with the same random weights."""
    import torch
    from safetensors.torch import save_file

    open_clip = _open_clip()
    tf = transformers_module()
    cfg = {"embed_dim": 512, "quick_gelu": True,
           "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": VARIANTS[variant]},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    torch.manual_seed(seed)
    oc = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()
    root = tempfile.mkdtemp(prefix=f"dualenc-bench-clip-{variant}-")
    with open(os.path.join(root, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, os.path.join(root, "open_clip_model.safetensors"))
    config, params = dualenc.load_pretrained(root)
    hf_dir = os.path.join(root, "hf")
    dualenc.save_pretrained(hf_dir, config, params)
    hf = tf.CLIPModel.from_pretrained(hf_dir).eval()
    return config, params, hf, oc


def inputs(batch: int, seed: int = 0) -> dict:
    """open_clip.tokenize's layout (sot, words, eot, zeros) at 77 tokens, and normalised-looking pixels."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, CONTEXT), np.int64)
    for row in range(batch):
        n = int(rng.integers(8, CONTEXT))
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = 49406, rng.integers(1, 49400, n - 2), 49407
    return dict(input_ids=ids, attention_mask=(ids != 0).astype(np.int64) | (np.arange(CONTEXT) == 0),
                pixel_values=rng.standard_normal((batch, 3, 224, 224)).astype(np.float32))


def forward(variant: str, batch: int, *, repeats: int) -> dict:
    """Contrastive forward time of dualenc, transformers' CLIPModel and open_clip on the same weights."""
    import torch

    config, params, hf, oc = build(variant)
    x = inputs(batch)
    fwd = jax.jit(dualenc.apply, static_argnames=("pooled_only", "dtype"))
    stacked = dualenc.stack_layers(params)  # load_pretrained's default is per-layer

    def ours(p, pooled_only=False, dtype=None):
        return lambda: block(fwd(p, config, **x, pooled_only=pooled_only, dtype=dtype).logits_per_image)

    def transformers_run():
        with torch.inference_mode():
            return hf(input_ids=torch.from_numpy(x["input_ids"]), attention_mask=torch.from_numpy(x["attention_mask"]),
                      pixel_values=torch.from_numpy(x["pixel_values"])).logits_per_image

    def open_clip_run():
        with torch.inference_mode():
            return oc.get_logits(torch.from_numpy(x["pixel_values"]), torch.from_numpy(x["input_ids"]))[0]

    fns = {"dualenc": ours(params), "dualenc pooled_only": ours(params, True),
           "dualenc stacked": ours(stacked), "dualenc stacked pooled_only": ours(stacked, True),
           "dualenc bfloat16 (report)": ours(params, dtype=jax.numpy.bfloat16),
           "transformers": transformers_run, "open_clip": open_clip_run}
    reference = open_clip_run().numpy()
    diffs = {k: float(np.max(np.abs(np.asarray(fn()) - reference))) for k, fn in fns.items()}
    times = interleaved(fns, repeats)
    return {"case": f"CLIP ViT-{variant[0]}/{variant[1:]} forward, batch {batch} x {CONTEXT} tokens, float32",
            "seconds": times, "logits_max_abs_diff_vs_open_clip": diffs,
            "transformers_time_over": {k: times["transformers"] / t for k, t in times.items() if "dualenc" in k},
            "open_clip_time_over": {k: times["open_clip"] / t for k, t in times.items() if "dualenc" in k},
            "bfloat16_embeds_cosine_to_float32": _bf16_cosines(params, config, x)}


def _bf16_cosines(params, config, x) -> dict:
    """How close bfloat16 compute keeps the normalised embeddings: the least cosine to float32's, per tower."""
    f32 = dualenc.apply(params, config, **x)
    bf16 = dualenc.apply(params, config, **x, dtype=jax.numpy.bfloat16)
    return {side: float(np.min(np.sum(np.asarray(getattr(f32, side)) * np.asarray(getattr(bf16, side)), -1)))
            for side in ("image_embeds", "text_embeds")}
