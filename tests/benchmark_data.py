"""Small datasets in CLIP_benchmark's webdataset layout, made from the two real photos scikit-learn ships, and a
tiny open_clip model with random weights in its local-dir layout (for tests that run the clip-benchmark package)."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

# Class names and how each class recolours its photo crops (a tint multiplied in, then a channel order).
CLASSES = ("red temple", "green temple", "blue temple", "red flower", "green flower", "blue flower", "grey temple")
_TINTS = {"red": (1.0, 0.55, 0.5), "green": (0.5, 1.0, 0.55), "blue": (0.55, 0.5, 1.0), "grey": (0.7, 0.7, 0.7)}
TEMPLATES = ("a photo of a {c}.", "a blurry photo of the {c}.", "itap of a {c}.")
CAPTION_WORDS = ("a", "photo", "of", "the", "temple", "flower", "red", "green", "blue", "grey", "bright", "dark",
                 "close", "crop", "with", "sky", "petals")


def photos():
    """The two photos scikit-learn ships (china.jpg, flower.jpg), as uint8 (427, 640, 3) arrays."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {"temple": china, "flower": flower}


def crop(rng, photo, size=48):
    """A random square crop of `photo`, between 1/4 and 1/2 of its height, resized to size x size."""
    h, w, _ = photo.shape
    side = int(rng.integers(h // 4, h // 2))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    return Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)


def recolour(image, tint, rng):
    a = np.asarray(image, np.float32) * np.asarray(_TINTS[tint], np.float32) * rng.uniform(0.8, 1.2)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(image, ext):
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
               **({"lossless": True} if ext == "webp" else {}))
    return buf.getvalue()


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(root, split, samples, shards=2):
    """samples: (key, {ext: bytes}) in order, cut into `shards` tars ROOT/split/{0..}.tar, with nshards.txt."""
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s}.tar"), "w") as tar:
            for key, members in samples[s * per:(s + 1) * per]:
                for ext, data in members.items():
                    _member(tar, f"{key}.{ext}", data)
    with open(os.path.join(folder, "nshards.txt"), "w") as f:
        f.write(f"{shards}\n")


def classification_set(root, per_class=(6, 4, 3), seed=0, classes=CLASSES, shards=2):
    """A classification dataset: `classes` (each a tint and a photo), splits train / val / test with
    per_class images each, images in webp, png and jpg in turn; classnames.txt, templates and dataset_type.txt."""
    rng, pics, exts = np.random.default_rng(seed), photos(), ("webp", "png", "jpg")
    for split, n in zip(("train", "val", "test"), per_class):
        samples = []
        for i in range(n * len(classes)):
            label = i % len(classes)
            tint, what = classes[label].split()
            image = recolour(crop(rng, pics[what]), tint, rng)
            ext = exts[i % 3]
            samples.append((f"s{i:06d}", {ext: encode(image, ext), "cls": str(label).encode()}))
        write_split(root, split, samples, shards)
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    with open(os.path.join(root, "dataset_type.txt"), "w") as f:
        f.write("classification\n")
    return root


def retrieval_set(root, n_images=14, seed=1, shards=2):
    """A retrieval dataset: split test, each image with 1 to 5 random captions (newline-separated .txt)."""
    rng, pics = np.random.default_rng(seed), photos()
    samples = []
    for i in range(n_images):
        what = ("temple", "flower")[i % 2]
        image = recolour(crop(rng, pics[what]), ("red", "green", "blue", "grey")[i % 4], rng)
        captions = [" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(3, 9))))
                    for _ in range(int(rng.integers(1, 6)))]
        samples.append((f"r{i:05d}", {"jpg": encode(image, "jpg"), "txt": "\n".join(captions).encode()}))
    write_split(root, "test", samples, shards)
    with open(os.path.join(root, "dataset_type.txt"), "w") as f:
        f.write("retrieval\n")
    return root


def tiny_open_clip(folder, seed=0, embed_dim=16, image_size=32, steps=90):
    """A tiny open_clip CLIP in open_clip's local-dir layout (open_clip_config.json and
    open_clip_model.safetensors): open_clip loads it as `local-dir:FOLDER`, dualenc as FOLDER.

    Random weights, then `steps` of contrastive training on crops of the photos captioned with their class
    prompts, so that its zero-shot predictions differ between images (a random model predicts one class for
    all) and its scores are not near-ties."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (30 s against 4 s under a loaded suite)
    torch.manual_seed(seed)
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    try:
        if steps:
            _fit(model, open_clip.get_tokenizer("ViT-B-32"), image_size, steps, seed)
    finally:
        torch.set_num_threads(threads)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    return folder


def _fit(model, tokenizer, image_size, steps, seed):
    import torch
    import torch.nn.functional as F

    rng, pics = np.random.default_rng(seed + 100), photos()
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        labels = rng.permutation(len(CLASSES))
        images = []
        for label in labels:
            tint, what = CLASSES[label].split()
            a = np.asarray(recolour(crop(rng, pics[what], image_size), tint, rng), np.float32) / 255
            images.append(torch.from_numpy(a).permute(2, 0, 1))
        x = (torch.stack(images) - mean) / std
        texts = tokenizer([TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(c=CLASSES[i]) for i in labels])
        image, text, scale = model(x, texts[:, :model.context_length])
        logits = scale * image @ text.T
        target = torch.arange(len(labels))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def accuracy(output, target, topk=(1,)):
    """clip_benchmark.metrics.zeroshot_classification.accuracy, the same arithmetic without its float() of a
    1-element array, which numpy 2.4 refuses (ENVIRONMENT.md): the tests' stand-in for it."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def run_clip_benchmark(main, args, out):
    """`main` (clip_benchmark.cli.main, or a command wrapping it) on `eval ARGS --output OUT` in this process,
    with `accuracy` standing in for its own; returns the results JSON it wrote."""
    import sys

    from clip_benchmark.metrics import zeroshot_classification

    saved, argv = zeroshot_classification.accuracy, sys.argv
    zeroshot_classification.accuracy = accuracy
    sys.argv = ["clip_benchmark", "eval", *map(str, args), "--output", str(out)]
    try:
        main()
    finally:
        zeroshot_classification.accuracy, sys.argv = saved, argv
    with open(out) as f:
        return json.load(f)


# CLIP_benchmark's settings for every test run: no mixed precision on CPU, no worker processes, small batches.
COMMON = ("--pretrained", "", "--no_amp", "--num_workers", "0", "--batch_size", "8", "--recall_k", "1", "5", "10",
          "--quiet")
