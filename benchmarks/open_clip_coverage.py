"""python -m benchmarks.open_clip_coverage [--json FILE] [--no-build]: which of open_clip's own architectures and
pretrained tags dualenc reads.

Walks open_clip's shipped model configs (`open_clip.list_models()`) and pretrained tags (`list_pretrained()`).
For each architecture it asks dualenc's open_clip reader for the config (formats.open_clip.config_from_dict): read,
or refused with the ConfigError naming the field. For each one read (unless --no-build) it builds a shrunken copy
in open_clip (every transformer 1 layer, widths 64, the image grid 2 x 2 patches, the vocabulary kept) with random
weights, saves it in open_clip's local-dir layout, loads it with dualenc, and compares the image and text
embeddings on random inputs (max abs difference; matched when under 1e-4). A tower open_clip builds through timm or
Hugging Face is shrunk only where the shrinking is safe without changing its architecture; otherwise the read
config alone is reported. Prints a summary and, per architecture, its tags and outcome. Not part of the tests.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TOLERANCE = 1e-4


def _open_clip():
    import torchvision_shim  # this machine's torchvision is CUDA-only (ENVIRONMENT.md); harmless elsewhere

    torchvision_shim.install()
    import open_clip

    return open_clip


def shrink(cfg: dict) -> dict | None:
    """A small copy of an open_clip model config with the same architecture, or None where shrinking it would
    change the architecture (towers built by timm or Hugging Face from their names)."""
    cfg = copy.deepcopy(cfg)
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if v.get("timm_model_name") or t.get("hf_model_name"):
        return None
    cfg["embed_dim"] = 32
    if isinstance(v.get("layers"), (list, tuple)):  # ModifiedResNet: one block a stage, width 16
        v.update(layers=[1] * len(v["layers"]), width=16, image_size=64)
        v.pop("head_width", None)
    else:
        patch = v.get("patch_size", 16)
        v.update(layers=1, width=64, head_width=32, image_size=2 * patch)
    t.update(layers=1, width=64, heads=2, context_length=min(t.get("context_length", 77), 16))
    if v.get("attentional_pool"):  # CoCa's pooler: as wide as embed_dim
        v.update(attn_pooler_heads=2, attn_pooler_queries=4)
    if cfg.get("multimodal_cfg") is not None:  # CoCa's captioning decoder (not read by dualenc): kept small
        cfg["multimodal_cfg"] = {**cfg["multimodal_cfg"], "layers": 1, "width": 32, "heads": 2,
                                 "context_length": t["context_length"], "attn_pooler_heads": 2}
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(usage=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-build", action="store_true", help="read the configs only")
    args = parser.parse_args(argv)
    open_clip = _open_clip()
    from open_clip.factory import get_model_config

    from dualenc.errors import ConfigError
    from dualenc.formats import open_clip as reader

    tags = collections.Counter(name for name, _ in open_clip.list_pretrained())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in open_clip.list_models():
            cfg = get_model_config(name)
            row = {"architecture": name, "pretrained_tags": tags.get(name, 0)}
            try:
                reader.config_from_dict({"model_cfg": cfg, "preprocess_cfg": {}})
                row["reads"] = True
            except (ConfigError, TypeError, ValueError) as e:
                row.update(reads=False, refused=str(e).splitlines()[0])
            if row["reads"] and not args.no_build:
                try:
                    row.update(_build(open_clip, name, cfg, folder))
                except Exception as e:  # a shrunken build or load that fails is a finding, reported
                    row.update(built=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    read = [r for r in rows if r["reads"]]
    matched = [r for r in read if r.get("matched")]
    total_tags = sum(r["pretrained_tags"] for r in rows)
    summary = {
        "architectures": len(rows), "read": len(read), "matched_when_built": len(matched),
        "pretrained_tags": total_tags, "tags_read": sum(r["pretrained_tags"] for r in read),
        "refused_by_reason": collections.Counter(_reason(r["refused"]) for r in rows if not r["reads"]),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0


def _build(open_clip, name: str, cfg: dict, folder: str) -> dict:
    """Builds the shrunken model (open_clip.CLIP / CustomTextCLIP from the config), saves it, loads it with dualenc
    and compares the normalised embeddings."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import dualenc

    small = shrink(cfg)
    if small is None:
        return {"built": False, "why": "tower built by timm / Hugging Face from its name: not shrunk"}
    torch.manual_seed(0)
    kwargs = {k: v for k, v in small.items() if k not in ("custom_text",)}
    kind = open_clip.CoCa if small.get("multimodal_cfg") is not None else open_clip.CustomTextCLIP \
        if small.get("custom_text") else open_clip.CLIP
    model = kind(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = os.path.join(folder, name.replace("/", "_"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": small, "preprocess_cfg": {}}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dualenc.UnusedWeightsWarning)  # CoCa's decoder, named and skipped
        config, params = dualenc.load_pretrained(path)
    size = small["vision_cfg"]["image_size"]
    pixels = torch.randn(2, 3, size, size)
    length = small["text_cfg"]["context_length"]
    tokens = torch.randint(1, 400, (2, length))
    # open_clip's end-of-text id (the largest id of a smaller vocabulary, CLIPA's): argmax pooling finds it
    tokens[:, length // 2] = min(49407, small["text_cfg"].get("vocab_size", 49408) - 1)
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        ref_text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    image = np.asarray(dualenc.model.normalize(dualenc.get_image_features(params, config, pixels.numpy())))
    ids = tokens.numpy().astype(np.int32)
    text = np.asarray(dualenc.model.normalize(dualenc.get_text_features(params, config, ids, np.ones_like(ids))))
    diff = float(max(np.abs(image - ref_image).max(), np.abs(text - ref_text).max()))
    return {"built": True, "max_abs_diff": diff, "matched": diff < TOLERANCE}


def _reason(message: str) -> str:
    """The field a refusal names (its first quoted field), to group the refusals."""
    import re

    found = re.search(r"field '([^']+)'", message)
    return found.group(1) if found else message[:60]


if __name__ == "__main__":
    sys.exit(main())
