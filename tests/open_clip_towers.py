"""What the tests of open_clip's towers share: a random open_clip model, its folder in open_clip's hub layout,
open_clip reading that folder back (its transform, its tokenizer, real photos), its outputs, and the zero-shot
command run on a saved dualenc folder against open_clip's probabilities."""

import contextlib
import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from dualenc import cli


def build(cfg, seed=0, scale=None):
    """open_clip's model for a model_cfg (CustomTextCLIP when cfg["custom_text"], else CLIP), in eval mode, every
    param random: scales (by default every 1-D '*weight': norms) 1 + N(0, 0.1), the rest N(0, 0.1) (biases, class
    tokens, positions, layer scales included); logit_scale 2.1, logit_bias -1.7 when the model has one.
    `scale(name, param)` overrides which params are scales."""
    import open_clip

    kind = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    extra = {"init_logit_bias": cfg["init_logit_bias"]} if "init_logit_bias" in cfg else {}
    model = kind(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False),
                 **extra).eval()
    scale = scale or (lambda name, p: p.ndim == 1 and name.endswith("weight"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + noise if scale(name, p) else noise)
        model.logit_scale.fill_(2.1)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-1.7)
    return model


def save(model, cfg, path, preprocess=None, files=None):
    """The model as open_clip's hub layout in `path` (open_clip_config.json, open_clip_model.safetensors), with the
    files of folder `files` (a tokenizer's) copied beside; returns the path as a string."""
    path.mkdir(parents=True, exist_ok=True)
    preprocess = {"resize_mode": "squash"} if preprocess is None else preprocess
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    for f in sorted(files.iterdir()) if files is not None else ():
        (path / f.name).write_bytes(f.read_bytes())
    return str(path)


def photos():
    """Three crops of scikit-learn's sample photos, of different sizes and aspect ratios."""
    china, flower = load_sample_images().images
    return [Image.fromarray(a) for a in (china[:200, :300], flower[100:400, 50:260], china[150:260, 300:420])]


def reference(model, path):
    """open_clip reading the saved folder: the model, the folder, open_clip's transform and tokenizer for it, the
    photos and open_clip's pixels for them."""
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms("local-dir:" + path)
    shots = photos()
    return dict(model=model, path=path, transform=transform, tokenizer=open_clip.get_tokenizer("local-dir:" + path),
                photos=shots, pixels=np.stack([transform(p).numpy() for p in shots]))


def open_clip_outputs(model, pixels, ids):
    """open_clip's raw image and text features, its logits (exp(scale) * cosine, + bias when it has one) and the
    timm trunk's features (None for a tower without a trunk)."""
    pixels, ids = torch.tensor(np.asarray(pixels)), torch.tensor(np.asarray(ids))
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        cosine = (image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).T
        logits = model.logit_scale.exp() * cosine
        if getattr(model, "logit_bias", None) is not None:
            logits = logits + model.logit_bias
        trunk = getattr(model.visual, "trunk", None)
        trunk = trunk.forward_features(pixels) if trunk is not None else None
    return dict(image=image, text=text, logits=logits, trunk=trunk)


def check_zero_shot_command(ref, folder, labels, tmp_path, capsys):
    """`dualenc zero-shot --json` on a saved folder, over the reference photos with the template "{}", gives open_clip's
    probabilities (softmax over the labels; sigmoid per label for a model with a logit bias) within 1e-5."""
    files = []
    for i, photo in enumerate(ref["photos"]):
        files.append(tmp_path / f"zero-shot-{i}.png")
        photo.save(files[-1])
    (tmp_path / "templates.txt").write_text("{}\n")
    capsys.readouterr()
    code = cli.main(["zero-shot", "--model", str(folder), "--labels", ",".join(labels), "--templates",
                     str(tmp_path / "templates.txt"), "--json", *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    ids = ref["tokenizer"](list(labels)).numpy()
    logits = open_clip_outputs(ref["model"], ref["pixels"], ids)["logits"]
    sigmoid = getattr(ref["model"], "logit_bias", None) is not None
    want = (torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)).numpy()
    results = json.loads(out)["results"]
    assert len(results) == len(files)
    for row, result in zip(want, results):
        np.testing.assert_allclose(result["probabilities"], [row[labels.index(n)] for n in result["labels"]],
                                   atol=1e-5)


@contextlib.contextmanager
def tiny_timm_names(table, rows, trunk, table_rows=None):
    """For the duration: timm.create_model builds `trunk(row, **kwargs)` for each name of `rows` (a test's tiny
    architectures; any other name as timm does), and dualenc's name table `table` holds `table_rows[name]` (default
    rows[name]) under it. open_clip passes timm only a name, so a tiny reference needs a name of its own in both."""
    import pytest
    import timm

    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if name not in rows:
            return real(name, pretrained=pretrained, **kwargs)
        model = trunk(rows[name], **kwargs)
        model.default_cfg = {}  # what timm's registry gives its models (open_clip reads it)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", create_model)
        for name, row in (table_rows or rows).items():
            patch.setitem(table, name, row)
        yield
