"""python -m benchmarks.families [--repeats N] [--only NAME ...] [--json FILE]: the forward of each family issue 26
added, dualenc beside its PyTorch reference on the same random weights, at batch 1 and 8, in one process.

Each family is built at a real released size with random weights by its reference (open_clip from its own shipped
model config, timm building the timm towers by name; transformers' ChineseCLIPModel), written in that reference's
layout and read by dualenc.load_pretrained: the converters are part of what runs. The forward is the contrastive one
(a batch of images and as many texts, to the logits): dualenc's jitted `dualenc.apply` (per-layer params, as
load_pretrained gives them) against the reference in eval mode under torch.no_grad. Medians of interleaved runs;
the largest logit difference is reported beside the times as a check that both computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dualenc  # noqa: E402
from benchmarks.common import block, interleaved, machine, transformers_module, write_results  # noqa: E402

# key -> (family, open_clip architecture: its shipped config; None for the transformers family)
FAMILIES = {
    "resnet": ("ModifiedResNet", "RN50"),
    "convnext": ("timm ConvNeXt", "convnext_base"),
    "eva02": ("timm EVA02", "EVA02-B-16"),
    "siglip_vit": ("timm SigLIP ViT", "ViT-B-16-SigLIP"),
    "pe_core": ("timm PE-Core", "PE-Core-B-16"),
    "vitamin": ("timm ViTamin", "ViTamin-B"),
    "xlm_roberta": ("Hugging Face XLM-R text", "xlm-roberta-base-ViT-B-32"),
    "chinese_clip": ("transformers Chinese-CLIP (ViT-B/16, BERT-base)", None),
}


def _open_clip():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torchvision_shim

    torchvision_shim.install()
    import open_clip

    return open_clip


def _xlm_roberta_base(root: str) -> str:
    """A local folder with xlm-roberta-base's config (no weights, no tokenizer: open_clip builds the tower from the
    config with random weights, and the benchmark feeds token ids)."""
    folder = os.path.join(root, "xlm-roberta-base")
    transformers_module().XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5).save_pretrained(folder)
    return folder


def build_open_clip(architecture: str, root: str):
    """(reference logits function, dualenc config, params, image size, context length, vocabulary size)."""
    import torch
    from safetensors.torch import save_file

    open_clip = _open_clip()
    from open_clip.factory import get_model_config
    cfg = json.loads(json.dumps(get_model_config(architecture)))
    text = cfg["text_cfg"]
    if text.get("hf_model_name"):
        text["hf_model_name"] = text["hf_tokenizer_name"] = _xlm_roberta_base(root)
        text["hf_model_pretrained"] = False
    torch.manual_seed(0)
    kind = open_clip.CustomTextCLIP if cfg.get("custom_text") or text.get("hf_model_name") else open_clip.CLIP
    model = kind(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = os.path.join(root, architecture)
    os.makedirs(path)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "open_clip_model.safetensors"))
    config, params = dualenc.load_pretrained(path)

    def reference(pixels, ids, mask):
        with torch.no_grad():
            image = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(ids)), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
            if getattr(model, "logit_bias", None) is not None:
                logits = logits + model.logit_bias
        return logits.numpy()

    size = cfg["vision_cfg"].get("image_size", 224)
    vocab = 250002 if text.get("hf_model_name") else text.get("vocab_size", 49408)
    return reference, config, params, size, text.get("context_length", 77), vocab


def build_chinese_clip(root: str):
    import torch

    _open_clip()  # the torchvision shim, before transformers imports torchvision
    tf = transformers_module()
    torch.manual_seed(0)
    hf_config = tf.ChineseCLIPConfig(text_config=dict(vocab_size=21128), vision_config=dict(patch_size=16),
                                     projection_dim=512)
    model = tf.ChineseCLIPModel(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = os.path.join(root, "chinese_clip")
    model.save_pretrained(path)
    config, params = dualenc.load_pretrained(path)

    def reference(pixels, ids, mask):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        pixel_values=torch.from_numpy(pixels))
        return out.logits_per_image.numpy()

    return reference, config, params, 224, 52, 21128


def inputs(batch: int, size: int, length: int, vocab: int, seed: int = 0):
    """Random pixels and full-length token rows ending on the vocabulary's last id (CLIP's end-of-text, found by its
    argmax pooling), ids 5 and up (no padding, start or end ids inside)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, min(vocab - 1, 20000), (batch, length))
    ids[:, -1] = vocab - 1
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32), ids.astype(np.int64), np.ones_like(ids)


def forward(family: str, architecture: str | None, batches=(1, 8), repeats: int = 5) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as root:
        built = build_chinese_clip(root) if architecture is None else build_open_clip(architecture, root)
        reference, config, params, size, length, vocab = built
        run = jax.jit(dualenc.apply)
        for batch in batches:
            pixels, ids, mask = inputs(batch, size, length, vocab)
            ours = np.asarray(run(params, config, input_ids=ids, attention_mask=mask, pixel_values=pixels)
                              .logits_per_image)
            diff = float(np.abs(ours - reference(pixels, ids, mask)).max())
            times = interleaved({
                "dualenc": lambda: block(run(params, config, input_ids=ids, attention_mask=mask,
                                             pixel_values=pixels).logits_per_image),
                "reference": lambda: reference(pixels, ids, mask)}, repeats)
            row = {"family": family, "architecture": architecture or "ChineseCLIPModel", "batch": batch,
                   "image_size": size, "context_length": length, "dualenc_s": times["dualenc"],
                   "reference_s": times["reference"], "speedup": times["reference"] / times["dualenc"],
                   "max_abs_logit_diff": diff, "torch_threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(usage=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (medians)")
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES), help="families to run (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = {"machine": machine(), "cases": []}
    for key, (family, architecture) in FAMILIES.items():
        if not args.only or key in args.only:
            results["cases"] += forward(family, architecture, repeats=args.repeats)
    if args.json:
        write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
