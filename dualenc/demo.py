"""`dualenc demo`: train a small dual encoder from scratch on the embedded digits, evaluate it, save it."""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

import dualenc
from dualenc import data, trainer

# Prompts for the held-out evaluation: the first phrasing never appears in training captions.
EVAL_TEMPLATES = ("a drawing of the number {}", "a photo of the digit {}")
IMAGE_SIZE = 16
MAX_LENGTH = 16


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
    """Held-out zero-shot accuracy and class-level retrieval; returns (figures, probs, image embeds, class embeds)."""
    classes = list(data.DIGIT_WORDS)
    image_embeds = dualenc.encode_images(params, config, processor, test_set.images, batch_size=128)
    classifier = dualenc.zero_shot_classifier(params, config, processor, classes, EVAL_TEMPLATES)
    top, probs = dualenc.zero_shot_predict(image_embeds, classifier, k=len(classes))
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
    order = np.argsort(top, axis=1)
    class_probs = np.take_along_axis(probs, order, axis=1)  # (n, classes) in class order
    return figures, class_probs, image_embeds, classifier


def draw(path: str, images, labels, class_probs, image_embeds, classifier, n: int = 20):
    """A PNG: held-out images with their top predicted caption, and their similarity to each class prompt."""
    from PIL import Image, ImageDraw

    cell, cols = 72, 5
    rows = (n + cols - 1) // cols
    heat_cell = 18
    width = cols * cell + 40 + 10 * heat_cell + 20
    height = max(rows * (cell + 16), 30 + n * heat_cell) + 40
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 4), "held-out digits: top zero-shot caption", fill="black")
    for i in range(n):
        x, y = (i % cols) * cell, 20 + (i // cols) * (cell + 16)
        canvas.paste(Image.fromarray(np.asarray(images[i])).resize((cell - 12, cell - 12), Image.NEAREST), (x + 6, y))
        guess = int(np.argmax(class_probs[i]))
        ok = guess == int(labels[i])
        pen.text((x + 6, y + cell - 10), f"{data.DIGIT_WORDS[guess]} {class_probs[i, guess]:.2f}",
                 fill=(0, 130, 0) if ok else (200, 0, 0))
    sims = np.asarray(image_embeds[:n]) @ np.asarray(classifier)  # (n, classes)
    lo, hi = float(sims.min()), float(sims.max())
    left = cols * cell + 40
    pen.text((left, 4), "image x class-prompt similarity", fill="black")
    for j, word in enumerate(data.DIGIT_WORDS):
        pen.text((left + j * heat_cell + 4, 18), str(j), fill="black")
    for i in range(n):
        for j in range(sims.shape[1]):
            t = (sims[i, j] - lo) / max(hi - lo, 1e-9)
            color = (int(255 * t), int(80 + 100 * (1 - abs(t - 0.5) * 2)), int(255 * (1 - t)))
            x0, y0 = left + j * heat_cell, 32 + i * heat_cell
            pen.rectangle([x0, y0, x0 + heat_cell - 2, y0 + heat_cell - 2], fill=color)
    tmp = path + ".tmp"
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def run(out: str, steps: int, seed: int, quiet: bool = False) -> dict:
    """Trains, evaluates and saves; returns the figures."""
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    train_set, processor, config, params = build(os.path.join(out, "vocab"), seed)
    test_set = data.load_digits("test", seed=0, image_size=IMAGE_SIZE)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def progress(step, metrics):
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                acc=f"{float(metrics['accuracy_i2t']):.2f}")

    run_config = trainer.TrainConfig(steps=steps, batch_size=64, learning_rate=1e-3, seed=seed,
                                     max_length=MAX_LENGTH)
    params, last = trainer.fit(config, params, train_set, processor, run_config, callback=progress)
    if bar is not None:
        bar.close()
    trained = time.perf_counter() - started
    figures, class_probs, image_embeds, classifier = evaluate(params, config, processor, test_set)
    model_dir = os.path.join(out, "model")
    dualenc.save_pretrained(model_dir, config, params, processor=processor)
    picture = os.path.join(out, "demo.png")
    draw(picture, test_set.images, test_set.labels, class_probs, image_embeds, classifier)
    figures.update(steps=steps, seed=seed, final_train_loss=last.get("loss"), train_seconds=round(trained, 1),
                   total_seconds=round(time.perf_counter() - started, 1), model_dir=model_dir, picture=picture)
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
                 f"{figures['model_dir']}, picture {figures['picture']}")
    return "\n".join(lines)
