"""Under load: encode 10,000 generated images and train 1,000 steps on a tiny model; memory must stay flat."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

import dualenc
from dualenc import data
from dualenc.train import loop as trainer


def rss_mib() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _tiny_model(vocab_size: int = 64):
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(**size, image_size=16, patch_size=4),
        text=dualenc.BertConfig(**size, vocab_size=vocab_size, max_position_embeddings=16), projection_dim=16)
    return config, dualenc.init(jax.random.key(0), config)


def encode_many(n: int = 10_000, batch_size: int = 64) -> dict:
    config, params = _tiny_model()
    processor = dualenc.ImageProcessor(size={"height": 16, "width": 16})
    samples = []

    def images():
        rng = np.random.default_rng(0)
        for i in range(n):
            if i % 1000 == 0:
                samples.append(round(rss_mib(), 1))
            yield rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)

    start = time.perf_counter()
    embeds = dualenc.encode_images(params, config, processor, images(), batch_size=batch_size, progress=False)
    return {"case": f"encode_images over {n} generated images (tiny model, streamed)", "images": len(embeds),
            "seconds": time.perf_counter() - start, "rss_MiB_every_1000": samples,
            "rss_growth_after_first_2000_MiB": samples[-1] - samples[2]}


def train_long(steps: int = 1000) -> dict:
    dataset = data.load_digits("test", image_size=16)
    directory = tempfile.mkdtemp(prefix="dualenc-load-")
    data.write_vocab(directory, dataset.captions)
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(directory, max_length=16))
    config, params = _tiny_model(processor.tokenizer.vocab_size)
    samples = []

    def watch(step, metrics):
        if step % 100 == 0:
            samples.append(round(rss_mib(), 1))

    start = time.perf_counter()
    _, last = trainer.fit(config, params, dataset, processor,
                          trainer.TrainConfig(steps=steps, batch_size=32, max_length=16, checkpoint_every=250),
                          checkpoint_dir=os.path.join(directory, "ckpt"), callback=watch)
    return {"case": f"{steps} training steps, tiny model, checkpoint every 250", "seconds": time.perf_counter() - start,
            "final_loss": last["loss"], "rss_MiB_every_100_steps": samples,
            "rss_growth_after_step_200_MiB": samples[-1] - samples[1]}
