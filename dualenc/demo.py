"""`dualenc demo`: train a small dual encoder from scratch on the embedded digits, evaluate it, save it."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

import dualenc
from dualenc import data, files
from dualenc.train import loop as trainer
from dualenc import plots as drawing

# Prompts for the held-out evaluation: the first phrasing never appears in training captions.
EVAL_TEMPLATES = ("a drawing of the number {}", "a photo of the digit {}")
IMAGE_SIZE = 16
MAX_LENGTH = 16
LOG_EVERY = 200  # steps between plain progress lines when stderr is not a terminal
HISTORY_EVERY = 10  # training steps between the loss / accuracy points drawn in demo.png (and step 1)
BATCH_SIZE = 64


def in_batch_limits(labels, batch_size: int) -> dict:
    """What training can reach when every caption names only its image's class (its phrasing picked at random,
    whatever the image), as the digits' captions do.

    A batch holds `batch_size` distinct images drawn without replacement (dualenc.data.Pipeline); the n_c
    images of class c in it have captions that do not tell them apart. Of each class, about one pair can then be
    matched (by image or by text), and each row's contrastive loss is at least ln n_c (its own caption is any
    of the n_c alike). Returns {"classes": E[classes in a batch], "accuracy": that / batch_size (the in-batch
    accuracy ceiling), "loss": E[sum_c n_c ln n_c] / batch_size (the loss floor)}, over the hypergeometric n_c.
    """
    counts = [int(k) for k in np.unique(np.asarray(labels), return_counts=True)[1]]
    total = sum(counts)
    draws = math.comb(total, batch_size)
    classes = loss = 0.0
    for k in counts:
        classes += 1 - math.comb(total - k, batch_size) / draws
        loss += sum(math.comb(k, n) * math.comb(total - k, batch_size - n) / draws * n * math.log(n)
                    for n in range(2, min(k, batch_size) + 1))
    return {"classes": classes, "accuracy": classes / batch_size, "loss": loss / batch_size}


def build(vocab_dir: str, seed: int):
    """The demo's processor and a freshly initialised dual encoder (both towers from scratch)."""
    train_set = data.load_digits("train", seed=0, image_size=IMAGE_SIZE)
    data.write_vocab(vocab_dir, train_set.captions + [t.format(w) for t in EVAL_TEMPLATES for w in data.DIGIT_WORDS])
    processor = dualenc.Processor(
        dualenc.ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        dualenc.Tokenizer.from_pretrained(vocab_dir, max_length=MAX_LENGTH))
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(**size, image_size=IMAGE_SIZE, patch_size=4),
        text=dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                max_position_embeddings=MAX_LENGTH, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0),
        projection_dim=64)
    return train_set, processor, config, dualenc.init(jax.random.key(seed), config)


def evaluate(params, config, processor, test_set) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Held-out zero-shot accuracy and class-level retrieval.

    Returns (figures, predictions (n,), their probabilities (n,) at the model's own logit scale, and the
    cosine similarity (shown, classes) of the first images to each class's prompts).
    """
    classes = list(data.DIGIT_WORDS)
    image_embeds = dualenc.encode_images(params, config, processor, test_set.images, batch_size=128)
    classifier = dualenc.zero_shot_classifier(params, config, processor, classes, EVAL_TEMPLATES)
    top, probs = dualenc.zero_shot_predict(image_embeds, classifier, k=1, params=params)
    texts = [t.format(c) for t in EVAL_TEMPLATES for c in classes]
    text_embeds = dualenc.encode_texts(params, config, processor, texts)
    retrieval = dualenc.retrieval_metrics(image_embeds, text_embeds, ks=(1, 5), image_labels=test_set.labels,
                                          text_labels=np.tile(np.arange(len(classes)), len(EVAL_TEMPLATES)))
    figures = {
        "zero_shot_accuracy": float(np.mean(top[:, 0] == test_set.labels)),
        "zero_shot_chance": 1.0 / len(classes),
        **{k: v for k, v in retrieval.items() if "R@" in k},
        "held_out_images": len(test_set.images),
        "templates": list(EVAL_TEMPLATES),
        "unseen_template": EVAL_TEMPLATES[0],
    }
    similarity = image_embeds[:drawing.MAX_IMAGES] @ classifier
    return figures, top[:, 0], probs[:, 0], similarity


def export(folder: str, splits: dict) -> None:
    """Writes the digits as files the other subcommands read: images/<split>/NNNN.png, <split>.jsonl (one row
    per caption, with the image's label) and labels.txt (the class names), so every `dualenc COMMAND --help`
    example runs on them."""
    from PIL import Image

    for split, dataset in splits.items():
        os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
        names = [f"images/{split}/{i:04d}.png" for i in range(len(dataset.images))]
        for name, image in zip(names, dataset.images):
            Image.fromarray(np.asarray(image)).save(os.path.join(folder, name), format="PNG")
        rows = [json.dumps({"image": names[owner], "caption": caption,
                            "label": data.DIGIT_WORDS[int(dataset.labels[owner])]})
                for caption, owner in zip(dataset.captions, dataset.caption_image)]
        files.write_text_atomic(os.path.join(folder, f"{split}.jsonl"), "\n".join(rows) + "\n")
    files.write_text_atomic(os.path.join(folder, "labels.txt"), "\n".join(data.DIGIT_WORDS) + "\n")
    export_benchmark(folder, splits)


def export_benchmark(folder: str, splits: dict) -> None:
    """The digits in CLIP_benchmark's webdataset layout too (`dualenc eval --benchmark` reads them, and so does
    CLIP_benchmark itself): digits/ (classification: train and test, the class names and the held-out
    prompts) and digits-captions/ (retrieval: the test images with their captions)."""
    from dualenc.benchmark import export as wds

    classes = os.path.join(folder, "digits")
    for split, dataset in splits.items():
        wds.write_split(classes, split, ((f"{i:05d}", np.asarray(image), int(label))
                                         for i, (image, label) in enumerate(zip(dataset.images, dataset.labels))))
    wds.write_metadata(classes, classnames=data.DIGIT_WORDS, templates=[t.replace("{}", "{c}") for t in EVAL_TEMPLATES])
    test = splits["test"]
    captions = [[] for _ in test.images]
    for caption, owner in zip(test.captions, test.caption_image):
        captions[owner].append(caption)
    wds.write_split(os.path.join(folder, "digits-captions"), "test",
                    ((f"{i:05d}", np.asarray(image), texts) for i, (image, texts) in enumerate(zip(test.images, captions))))
    wds.write_metadata(os.path.join(folder, "digits-captions"), retrieval=True)


def run(out: str, steps: int, seed: int, quiet: bool = False) -> dict:
    """Trains, evaluates and saves; returns the figures."""
    drawing.require_matplotlib()  # before training, not after it
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    train_set, processor, config, params = build(os.path.join(out, "vocab"), seed)
    test_set = data.load_digits("test", seed=0, image_size=IMAGE_SIZE)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    history = []

    def progress(step, metrics):
        if step == 1 or step % HISTORY_EVERY == 0 or step == steps:
            i2t, t2i = float(metrics["accuracy_i2t"]), float(metrics["accuracy_t2i"])
            history.append({"kind": "train", "step": step, "loss": float(metrics["loss"]),
                            "accuracy": (i2t + t2i) / 2, "accuracy_i2t": i2t, "accuracy_t2i": t2i,
                            "grad_norm": float(metrics["grad_norm"]), "logit_scale": float(metrics["logit_scale"]),
                            **{k: float(metrics[k]) for k in ("learning_rate", "epoch") if k in metrics}})
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                acc=f"{float(metrics['accuracy_i2t']):.2f}")
        elif not quiet and (step % LOG_EVERY == 0 or step == steps):  # plain lines when stderr is not a terminal
            print(f"step {step}/{steps}  loss {float(metrics['loss']):.4f}  "
                  f"acc {float(metrics['accuracy_i2t']):.3f}", file=sys.stderr, flush=True)

    run_config = trainer.TrainConfig(steps=steps, batch_size=BATCH_SIZE, learning_rate=1e-3, seed=seed,
                                     max_length=MAX_LENGTH)
    params, last = trainer.fit(config, params, train_set, processor, run_config, callback=progress)
    if bar is not None:
        bar.close()
    trained = time.perf_counter() - started
    figures, predictions, probabilities, similarity = evaluate(params, config, processor, test_set)
    model_dir = os.path.join(out, "model")
    dualenc.save_pretrained(model_dir, config, params, processor=processor)
    export(os.path.join(out, "data"), {"train": train_set, "test": test_set})
    picture = os.path.join(out, "demo.png")
    limits = in_batch_limits(train_set.labels, BATCH_SIZE)
    why = (f"Why so low: a caption names only the digit (one of {len(data.DIGIT_TEMPLATES)} phrasings, picked at "
           f"random), so the {BATCH_SIZE} images of a batch hold about {BATCH_SIZE / limits['classes']:.0f} per "
           f"class with interchangeable captions, and about one pair per class can be matched: a ceiling of "
           f"{limits['classes']:.1f} classes / {BATCH_SIZE} = {limits['accuracy']:.2f} (dashed). The loss's floor, "
           f"{limits['loss']:.2f}, has the same cause. Held-out zero-shot accuracy is the measure.")
    drawing.demo(picture, headline=figures, images=test_set.images, labels=test_set.labels, predictions=predictions,
                 probabilities=probabilities, classnames=data.DIGIT_WORDS, similarity=similarity, history=history,
                 accuracy_ceiling=(limits["accuracy"], why))
    figures.update(steps=steps, seed=seed, final_train_loss=last.get("loss"), train_seconds=round(trained, 1),
                   total_seconds=round(time.perf_counter() - started, 1), model_dir=model_dir, picture=picture,
                   data_dir=os.path.join(out, "data"))
    return figures


def table(figures: dict) -> str:
    rows = [("held-out zero-shot accuracy", figures["zero_shot_accuracy"], figures["zero_shot_chance"])]
    for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        for k in (1, 5):
            rows.append((f"{name} recall@{k}", figures[f"{direction}_R@{k}"], figures[f"{direction}_chance_R@{k}"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'dualenc':>8}  {'chance':>8}"]
    lines += [f"{name:{width}}  {value:8.3f}  {chance:8.3f}" for name, value, chance in rows]
    lines.append(f"({figures['held_out_images']} held-out images; prompts {figures['templates']}, "
                 f"'{figures['unseen_template']}' never seen in training)")
    lines.append(f"trained {figures['steps']} steps in {figures['train_seconds']} s; model saved to "
                 f"{figures['model_dir']}, picture {figures['picture']}, images and caption files in "
                 f"{figures['data_dir']}")
    lines.append("next: `dualenc zero-shot --help` (and embed, search, train, eval): each example runs on these files")
    return "\n".join(lines)
