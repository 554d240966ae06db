"""SigLIP forward: dualenc beside transformers' PyTorch SiglipModel (B/16 at 224) and Siglip2Model (NaFlex, a
batch of mixed aspect ratios), one set of random weights each, loaded through the converters."""

from __future__ import annotations

import tempfile

import jax
import numpy as np

import dualenc
from benchmarks.common import block, interleaved, transformers_module

LENGTH = 64  # SigLIP's text is padded to 64
B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def _save(model) -> str:
    directory = tempfile.mkdtemp(prefix="dualenc-bench-siglip-")
    model.save_pretrained(directory)
    return directory


def build(naflex: bool, seed: int = 0):
    """(dualenc config, params, transformers model) with the same random weights (non-zero logit scale and bias)."""
    import torch

    tf = transformers_module()
    torch.manual_seed(seed)
    if naflex:
        config = tf.Siglip2Config(text_config=tf.Siglip2TextConfig(**B16).to_dict(),
                                  vision_config=tf.Siglip2VisionConfig(**B16, patch_size=16, num_patches=256).to_dict())
        model = tf.Siglip2Model(config).eval()
    else:
        config = tf.SiglipConfig(text_config=tf.SiglipTextConfig(**B16).to_dict(),
                                 vision_config=tf.SiglipVisionConfig(**B16, image_size=224, patch_size=16).to_dict())
        model = tf.SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10)))
        model.logit_bias.fill_(-10.0)
    directory = _save(model)
    config, params = dualenc.load_pretrained(directory)
    return config, params, model


def images(batch: int, naflex: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if not naflex:
        return {"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    # Photos of several aspect ratios through the NaFlex processor, at most 256 patches of 16 px.
    sizes = [(480, 640), (640, 360), (300, 900), (512, 512), (200, 700), (720, 405), (333, 500), (800, 200)]
    photos = [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(batch)]
    return dict(dualenc.NaFlexImageProcessor(patch_size=16, max_num_patches=256)(photos))


def forward(batch: int, naflex: bool, *, repeats: int) -> dict:
    """Contrastive forward time of dualenc and transformers on the same weights and inputs."""
    import torch

    config, params, hf = build(naflex)
    rng = np.random.default_rng(1)
    x = {"input_ids": rng.integers(2, 32000, (batch, LENGTH)), **images(batch, naflex)}
    fwd = jax.jit(dualenc.apply, static_argnames=("dtype",))
    stacked = dualenc.stack_layers(params)

    def ours(p, dtype=None):
        return lambda: block(fwd(p, config, **x, dtype=dtype).logits_per_image)

    def transformers_run():
        with torch.inference_mode():
            return hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()}).logits_per_image

    fns = {"dualenc": ours(params), "dualenc stacked": ours(stacked),
           "dualenc bfloat16 (report)": ours(params, jax.numpy.bfloat16), "transformers": transformers_run}
    reference = transformers_run().numpy()
    diffs = {k: float(np.max(np.abs(np.asarray(fn()) - reference))) for k, fn in fns.items()}
    times = interleaved(fns, repeats)
    name = "SigLIP 2 NaFlex B/16 (256 patches, mixed aspect ratios)" if naflex else "SigLIP B/16 at 224"
    return {"case": f"{name} forward, batch {batch} x {LENGTH} tokens, float32", "seconds": times,
            "logits_max_abs_diff_vs_transformers": diffs,
            "transformers_time_over": {k: times["transformers"] / t for k, t in times.items() if "dualenc" in k}}
