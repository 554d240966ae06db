"""Scale-out figures: input pipeline images/s, and what a training checkpoint costs the loop.

`python -m benchmarks.scale [--images 2000] [--json FILE]`

- pipeline: JPEG photos (256 x 256, from scikit-learn's sample images, cropped at random) in webdataset tars,
  prepared into ArrayRecord; images/s of CLIP preprocessing (224 x 224) + tokenizing through
  dualenc.data.Pipeline with 0 (threads in the process), 1 and 2 worker processes, against data.Batches
  (the earlier loader: one producer thread) over the same images as files. Medians of 3 passes of 20 batches
  of 64, after one warm batch.
- checkpoint: a BERT-base text tower trained beside a locked ViT-B/16 (LiT): time the loop is blocked by one
  save (orbax async: until save_state returns), the time until that save is committed, and orbax saving
  synchronously; against the earlier format (everything gathered, frozen tower included, one safetensors
  file written synchronously). Medians of 3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np

import dualenc
from dualenc import data, train
from dualenc.data import RecordSource, prepare
from dualenc.data.pipeline import Pipeline
from dualenc.train import checkpoint

BATCH, BATCHES, PASSES = 64, 20, 3


def _photos(count: int, folder: str) -> tuple[list[str], list[str]]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    tars, paths = [], []
    os.makedirs(os.path.join(folder, "files"), exist_ok=True)
    per_tar = 500
    for start in range(0, count, per_tar):
        tars.append(os.path.join(folder, f"{start // per_tar:05d}.tar"))
        with tarfile.open(tars[-1], "w") as tar:
            for i in range(start, min(start + per_tar, count)):
                photo = photos[i % len(photos)]
                y, x = rng.integers(0, photo.shape[0] - 256), rng.integers(0, photo.shape[1] - 256)
                out = io.BytesIO()
                Image.fromarray(photo[y:y + 256, x:x + 256]).save(out, "JPEG", quality=90)
                paths.append(os.path.join(folder, "files", f"{i:06d}.jpg"))
                with open(paths[-1], "wb") as f:
                    f.write(out.getvalue())
                for ext, payload in (("jpg", out.getvalue()), ("txt", f"a photo number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return tars, paths


def _rate(make_iter) -> float:
    rates = []
    for _ in range(PASSES):
        it = make_iter()
        next(it)  # warm: workers started, first batch decoded
        start = time.perf_counter()
        for _ in range(BATCHES):
            next(it)
        rates.append(BATCHES * BATCH / (time.perf_counter() - start))
        del it
    return float(np.median(rates))


def pipeline_case(count: int) -> dict:
    image_processor = dualenc.ImageProcessor(
        image_processor_type="CLIPImageProcessor", size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        do_center_crop=True)
    with tempfile.TemporaryDirectory() as folder:
        data.write_vocab(os.path.join(folder, "vocab"), [f"a photo number {i}" for i in range(10)])
        processor = dualenc.Processor(image_processor,
                                      dualenc.Tokenizer.from_pretrained(os.path.join(folder, "vocab"), max_length=16))
        tars, paths = _photos(count, folder)
        prepare(tars, os.path.join(folder, "prepared"))
        source = RecordSource(os.path.join(folder, "prepared"))
        out = {"images": count, "batch": BATCH, "image_size": 224, "cpu_count": os.cpu_count()}
        steps = PASSES * (BATCHES + 1) + 1
        for workers in (0, 1, 2):
            def make(workers=workers):
                return (b for _, b in Pipeline(source, processor, BATCH, steps=steps, workers=workers,
                                               process_index=0, process_count=1, max_length=16))
            out[f"pipeline_workers_{workers}_images_per_s"] = _rate(make)
        pairs = data.PairDataset(paths, [f"a photo number {i}" for i in range(count)], np.arange(count))
        out["batches_images_per_s"] = _rate(lambda: (b for _, b in data.Batches(pairs, processor, BATCH,
                                                                                 max_length=16)))
    return out


def checkpoint_case() -> dict:
    import jax

    config = dualenc.DualEncoderConfig(vision=dualenc.ViTConfig(), text=dualenc.BertConfig(), projection_dim=512)
    params = dualenc.init(jax.random.key(0), config)
    optimizer = train.default_optimizer(1e-4, total_steps=10)
    state = train.init_state(params, optimizer, locked=("vision",))
    sizes = {name: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
             for name, tree in (("trainable", state.trainable), ("frozen", state.frozen),
                                ("optimizer", state.opt_state))}
    times = {"orbax_async_blocked_s": [], "orbax_async_committed_s": [], "orbax_sync_s": [], "old_format_s": []}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(3):
            start = time.perf_counter()
            checkpoint.save_state(os.path.join(folder, "async"), state, {"i": i}, keep=1, wait=False)
            times["orbax_async_blocked_s"].append(time.perf_counter() - start)
            checkpoint.wait_for_save()
            times["orbax_async_committed_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.save_state(os.path.join(folder, "sync"), state, {"i": i}, keep=1, wait=True)
            times["orbax_sync_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.save_state(os.path.join(folder, "old"), state, {"i": i}, keep=1, format="safetensors")
            times["old_format_s"].append(time.perf_counter() - start)
        disk = {}
        for name in ("async", "old"):
            top = os.path.join(folder, name)
            disk[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(top) for f in fs)
    return {"state_bytes": sizes, "disk_bytes_orbax": disk["async"], "disk_bytes_old_format": disk["old"],
            **{k: float(np.median(v)) for k, v in times.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cases", default="pipeline,checkpoint")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = {}
    if "pipeline" in args.cases:
        results["pipeline"] = pipeline_case(args.images)
        print(json.dumps(results["pipeline"], indent=1), flush=True)
    if "checkpoint" in args.cases:
        results["checkpoint"] = checkpoint_case()
        print(json.dumps(results["checkpoint"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
