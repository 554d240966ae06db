"""python -m benchmarks.open_clip_coverage [--json FILE] [--no-build]: which of open_clip's own architectures and
pretrained tags dualenc reads.

Walks open_clip's shipped model configs (`open_clip.list_models()`) and pretrained tags (`list_pretrained()`).
For each architecture it asks dualenc's open_clip reader for the config (formats.open_clip.config_from_dict): read,
or refused with the ConfigError naming the field. For each one read (unless --no-build) it builds a shrunken copy
in open_clip (every transformer 1 layer, widths 64, the image grid 2 x 2 patches, the vocabulary kept) with random
weights, saves it in open_clip's local-dir layout, loads it with dualenc, and compares the image and text
embeddings on random inputs (max abs difference; matched when under 1e-4).
A tower open_clip builds through timm (vision_cfg.timm_model_name) keeps its timm class and the name's own options:
timm.create_model is patched, for that build, to call the name's own entrypoint with smaller sizes (one block a
stage or one transformer block, width 64, a 2 x 2 grid), and dualenc's row for that name (open_clip_timm.CONVNEXT /
SIGLIP_VIT, open_clip_eva.EVA, open_clip_vitamin.VITAMIN) is replaced by the same shrunken architecture for the
build and the load, then restored. A Hugging Face text tower (text_cfg.hf_model_name) is a tiny config.json of the
same model_type in a temporary folder, with the named model's options as dualenc's table of hub configs
(open_clip_hf.KNOWN, KNOWN_FACEBOOK) records them and small sizes; its token ids end in the model's eos and pad
ids, with the padding masked. Prints a summary and, per architecture, its tags and outcome. Not part of the tests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TOLERANCE = 1e-4
WIDTH = 64  # every shrunken transformer's width (timm's and Hugging Face's too)


def _open_clip():
    import torchvision_shim  # this machine's torchvision is CUDA-only (ENVIRONMENT.md); harmless elsewhere

    torchvision_shim.install()
    import open_clip

    return open_clip


def shrink(cfg: dict, folder: str = "") -> tuple[dict, dict | None]:
    """(a small copy of an open_clip model config with the same architecture, the shrunken timm tower's patch or
    None). A timm tower's patch (`timm_tower`) holds the keyword arguments its entrypoint gets and dualenc's
    shrunken row; a Hugging Face text tower's tiny config.json is written in `folder`."""
    cfg = copy.deepcopy(cfg)
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    cfg["embed_dim"] = 32
    timm = timm_tower(v["timm_model_name"]) if v.get("timm_model_name") else None
    if timm is not None:
        v["image_size"] = timm["image_size"]
        if timm["same_width"]:  # timm_proj "none": the trunk's pooled output is the embedding
            cfg["embed_dim"] = WIDTH
    elif isinstance(v.get("layers"), (list, tuple)):  # ModifiedResNet: one block a stage, width 16
        v.update(layers=[1] * len(v["layers"]), width=16, image_size=64)
        v.pop("head_width", None)
    else:
        patch = v.get("patch_size", 16)
        v.update(layers=1, width=WIDTH, head_width=32, image_size=2 * patch)
    if t.get("hf_model_name"):
        t.update(hf_model_name=hf_text_folder(t["hf_model_name"], folder), hf_model_pretrained=False,
                 context_length=16)
        t["hf_tokenizer_name"] = t["hf_model_name"]  # not read by the comparison (token ids are made here)
    else:
        t.update(layers=1, width=WIDTH, heads=2, context_length=min(t.get("context_length", 77), 16))
    if t.get("proj_type") == "none":  # the text tower's output is the embedding
        cfg["embed_dim"] = t["width"]
    if v.get("attentional_pool"):  # CoCa's pooler: as wide as embed_dim
        v.update(attn_pooler_heads=2, attn_pooler_queries=4)
    if cfg.get("multimodal_cfg") is not None:  # CoCa's captioning decoder (not read by dualenc): kept small
        cfg["multimodal_cfg"] = {**cfg["multimodal_cfg"], "layers": 1, "width": 32, "heads": 2,
                                 "context_length": t["context_length"], "attn_pooler_heads": 2}
    return cfg, timm


def timm_tower(name: str) -> dict:
    """How a timm name of dualenc's tables shrinks: {"kwargs": what its own timm entrypoint gets on top of open_clip's
    (its other options kept), "table" and "row": dualenc's table holding the name and the shrunken architecture,
    "image_size", "same_width": whether embed_dim must be the trunk's width}."""
    from dualenc.formats import open_clip_eva, open_clip_timm, open_clip_vitamin

    vit = dict(embed_dim=WIDTH, depth=1, num_heads=2)
    if name in open_clip_timm.CONVNEXT:  # no position table: 64 px gives the last stage 2 x 2
        depths, _, eps = open_clip_timm.CONVNEXT[name]
        depths, dims = (1,) * len(depths), (8, 16, 24, 32)
        return dict(kwargs=dict(depths=depths, dims=dims), table=open_clip_timm.CONVNEXT, row=(depths, dims, eps),
                    image_size=64, same_width=False)
    if name in open_clip_timm.SIGLIP_VIT:
        patch, _, _, _, ratio, tanh, _ = open_clip_timm.SIGLIP_VIT[name]
        return dict(kwargs=dict(vit, img_size=2 * patch), table=open_clip_timm.SIGLIP_VIT,
                    row=(patch, WIDTH, 1, 2, ratio, tanh, 2 * patch), image_size=2 * patch, same_width=True)
    if name in open_clip_eva.EVA:  # rotary ref_feat_shape, pool heads, norms, MLP kind: the name's own
        arch = open_clip_eva.EVA[name]
        row = arch._replace(width=WIDTH, depth=1, heads=2, image_size=2 * arch.patch)
        return dict(kwargs=dict(vit, img_size=row.image_size), table=open_clip_eva.EVA, row=row,
                    image_size=row.image_size, same_width=False)
    if name in open_clip_vitamin.VITAMIN:  # its MbConv stem and stages (VitCfg) shrunk too: stride 16, 32 px
        row = open_clip_vitamin.VITAMIN[name]._replace(stem=8, stages=(8, 16), stage_depths=(1, 1), width=WIDTH,
                                                       depth=1, heads=2, image_size=32)
        embed_cfg = dataclasses.replace(_vitamin_embed_cfg(name), embed_dim=(*row.stages, WIDTH),
                                        depths=(*row.stage_depths, 1), stem_width=row.stem)
        return dict(kwargs=dict(vit, img_size=32, embed_cfg=embed_cfg), table=open_clip_vitamin.VITAMIN, row=row,
                    image_size=32, same_width=False)
    raise ValueError(f"timm name {name!r} is in none of dualenc's tables")


def _vitamin_embed_cfg(name: str):
    """The VitCfg (MbConv stem and stages) timm's entrypoint for a vitamin_* name builds with."""
    import timm
    from timm.models import vitamin

    real = vitamin._create_vitamin
    vitamin._create_vitamin = lambda variant, pretrained=False, embed_cfg=None, **kw: embed_cfg
    try:
        return timm.models.model_entrypoint(name)()
    finally:
        vitamin._create_vitamin = real


@contextlib.contextmanager
def shrunken_timm(name: str, tower: dict):
    """timm.create_model building `name` with the tower's smaller sizes, and dualenc's row for `name` the shrunken
    architecture, for the duration; both restored after."""
    import timm

    real, table = timm.create_model, tower["table"]

    def create_model(model_name, pretrained=False, **kw):
        return real(model_name, pretrained=pretrained, **({**kw, **tower["kwargs"]} if model_name == name else kw))

    old = table[name]
    timm.create_model, table[name] = create_model, tower["row"]
    try:
        yield
    finally:
        timm.create_model, table[name] = real, old


def hf_text_folder(name: str, folder: str) -> str:
    """A folder in `folder` holding a tiny config.json of the Hugging Face model `name`'s model_type, with its
    options (dualenc's record of its hub config.json) and 1 layer, width 64, 2 heads: XLM-RoBERTa / RoBERTa
    (hidden_size ...) or M2M100 (d_model ...; its decoder, built by transformers and dropped by open_clip, too)."""
    import transformers

    from dualenc.formats import open_clip_hf

    known = open_clip_hf.KNOWN.get(name.removeprefix("FacebookAI/")) or \
        open_clip_hf.KNOWN_FACEBOOK.get(name.removeprefix("facebook/"))
    if known is None:
        raise ValueError(f"hf_model_name {name!r}: no record of its config to shrink")
    options = dict(known)
    model_type = options.pop("model_type")
    if model_type == "m2m_100":
        options.update(d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96)
    else:
        options.update(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96)
    path = os.path.join(folder, "hf-" + name.replace("/", "_"))
    transformers.AutoConfig.for_model(model_type, **options).save_pretrained(path)
    return path


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

    small, timm = shrink(cfg, folder)
    with shrunken_timm(small["vision_cfg"]["timm_model_name"], timm) if timm else contextlib.nullcontext():
        torch.manual_seed(0)
        kwargs = {k: v for k, v in small.items() if k not in ("custom_text",)}
        hf = small["text_cfg"].get("hf_model_name")
        kind = open_clip.CoCa if small.get("multimodal_cfg") is not None else open_clip.CustomTextCLIP \
            if small.get("custom_text") or hf else open_clip.CLIP
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
    tokens, mask = _tokens(small["text_cfg"], model)
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        ref_text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    image = np.asarray(dualenc.model.normalize(dualenc.get_image_features(params, config, pixels.numpy())))
    ids = tokens.numpy().astype(np.int32)
    text = np.asarray(dualenc.model.normalize(dualenc.get_text_features(params, config, ids, mask)))
    diff = float(max(np.abs(image - ref_image).max(), np.abs(text - ref_text).max()))
    return {"built": True, "max_abs_diff": diff, "matched": diff < TOLERANCE}


def _tokens(t: dict, model):
    """Random token ids (batch 2) valid for the text tower and the attention mask that goes with them. open_clip's own
    tower: ids in [1, 400) with its end-of-text id (the largest id of a smaller vocabulary, CLIPA's) in the middle,
    where argmax pooling finds it; mask all ones. A Hugging Face tower: bos first, eos, then pad ids (open_clip
    masks the pad id) in the first row; the mask is where the ids are not the pad id."""
    import numpy as np
    import torch

    length = t["context_length"]
    if not t.get("hf_model_name"):
        tokens = torch.randint(1, 400, (2, length))
        tokens[:, length // 2] = min(49407, t.get("vocab_size", 49408) - 1)
        return tokens, np.ones(tokens.shape, np.int32)
    c = model.text.config
    specials = {c.pad_token_id, c.bos_token_id, c.eos_token_id}
    tokens = torch.randint(max(specials) + 2, min(400, c.vocab_size), (2, length))
    tokens[:, 0], tokens[0, length // 2], tokens[1, -1] = c.bos_token_id, c.eos_token_id, c.eos_token_id
    tokens[0, length // 2 + 1:] = c.pad_token_id
    return tokens, (tokens != c.pad_token_id).numpy().astype(np.int32)


def _reason(message: str) -> str:
    """The field a refusal names (its first quoted field), to group the refusals."""
    import re

    found = re.search(r"field '([^']+)'", message)
    return found.group(1) if found else message[:60]


if __name__ == "__main__":
    sys.exit(main())
