"""Batched encoding: images and texts into L2-normalised embeddings, a jitted batch at a time split over this
process's devices, with a progress bar; unreadable images skipped and reported. Metrics on the embeddings are
dualenc.evaluate's."""

from __future__ import annotations

import functools
import itertools
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc import model
from dualenc.config import DualEncoderConfig
from dualenc.errors import DualEncError, InputError
from dualenc.processing.processor import image_inputs

PROGRESS_MIN_BATCHES = 4


@functools.partial(jax.jit, static_argnames=("dtype",))
def image_embeds(params, config, inputs: dict, dtype=None):
    """The normalised image embeddings of a batch of the image tower's inputs (pixel_values, or NaFlex's three
    arrays), jitted once for every caller that encodes (encode_images, the service's batcher)."""
    return model.normalize(model.get_image_features(params, config, **inputs, dtype=dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def text_embeds(params, config, input_ids, attention_mask, token_type_ids, dtype=None):
    """The normalised text embeddings of a batch of token ids (jitted once, as image_embeds)."""
    return model.normalize(model.get_text_features(params, config, input_ids, attention_mask, token_type_ids,
                                                   dtype=dtype))


def local_mesh(devices: Sequence | None = None) -> Mesh:
    """The one-axis ("data") mesh a batch is split over: `devices`, default jax.local_devices(), this process's
    own (under jax.distributed each process encodes its inputs alone, with no collective between processes)."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    if not devices:
        raise InputError("devices is empty: give at least one device")
    return _mesh(devices)


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object), ("data",))


def replicate(params, devices: Sequence | None = None):
    """params placed whole on every device of local_mesh(devices). The encoders do it on each call, as a no-op
    for params placed so already: place them once with this for several calls."""
    return jax.device_put(params, NamedSharding(local_mesh(devices), P()))


def _placed(params, devices) -> tuple[Any, NamedSharding]:
    """(params replicated over the mesh, the sharding that splits a batch's rows over it)."""
    mesh = local_mesh(devices)
    return jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data"))


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _progress(total: int | None, batch_size: int, progress: bool | None, desc: str):
    """A tqdm bar for long inputs when stderr is a terminal (or when asked), else None."""
    if progress is None:
        long = total is None or total > PROGRESS_MIN_BATCHES * batch_size
        progress = long and sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=desc.removesuffix("s") or "item", file=sys.stderr)


def _stream(batches: Iterator[Any], prepare: Callable[[Any], tuple], bar) -> Iterator[tuple[Any, np.ndarray]]:
    """Runs `prepare` on the host for batch k+1 while the device computes batch k (async dispatch); yields
    (tag, rows) per batch, `prepare` returning (rows, launch, tag)."""
    pending = None
    for batch in batches:
        n, launch, tag = prepare(batch)
        del batch  # its raw inputs (image bytes) are not held while the next batch is assembled
        if not n:
            continue
        result = launch()  # dispatched asynchronously; the next batch is prepared meanwhile
        if pending is not None:
            yield pending[2], np.asarray(pending[1])[:pending[0]].astype(np.float32)
            if bar is not None:
                bar.update(pending[0])
        pending = (n, result, tag)
    if pending is not None:
        yield pending[2], np.asarray(pending[1])[:pending[0]].astype(np.float32)
        if bar is not None:
            bar.update(pending[0])
    if bar is not None:
        bar.close()


def _run(batches: Iterator[Any], prepare: Callable[[Any], tuple], bar) -> np.ndarray | None:
    outputs = [rows for _, rows in _stream(batches, prepare, bar)]
    return np.concatenate(outputs) if outputs else None


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


def pad_rows(arrays: dict, rows: int) -> dict:
    """Each array (n, ...) padded to `rows` rows by repeating its last row, so every padding row is a valid input
    (a NaFlex image keeps a mask and a patch grid that agree; a text keeps a token to attend to)."""
    return {k: v if len(v) >= rows else np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])
            for k, v in arrays.items()}


def device_rows(batch_size: int, devices: int | None = None) -> int:
    """batch_size rounded up to a multiple of `devices` (default jax.local_device_count()), so that every device
    gets as many rows of a batch."""
    _check_batch_size(batch_size)
    devices = jax.local_device_count() if devices is None else devices
    return -(-batch_size // devices) * devices


def batch_rows(total: int | None, batch_size: int, devices: int | None = None) -> int:
    """Rows per batch: batch_size, or for fewer items the power of two that holds them (one image is not
    padded to 32), which still bounds the number of shapes compiled; either rounded up to a multiple of the
    `devices` the batch is split over (default jax.local_device_count(); see device_rows)."""
    rows = device_rows(batch_size, devices)
    if total is None or total >= rows:
        return rows
    return min(rows, device_rows(1 << max(total - 1, 0).bit_length(), devices))


def encode_images(params, config: DualEncoderConfig, processor, images: Iterable, *, batch_size: int = 32,
                  dtype=None, progress: bool | None = None, skipped: list | None = None,
                  devices: Sequence | None = None) -> np.ndarray:
    """L2-normalised image embeddings for any number of images.

    Args:
      processor: a Processor, ImageProcessor or NaFlexImageProcessor (whose patch sequences, masks and grids go
        to the NaFlex vision tower); each batch of images goes through it on the host.
      images: a list or any iterable (also a generator too large for memory) of PIL images, paths or arrays.
      batch_size: every batch has this shape (the last one is padded), so the forward compiles once; fewer
        images than that (in a list) are padded only to the next power of two. Rounded up to a multiple of the
        number of devices (batch_rows).
      dtype: compute dtype of the matmuls (None: float32; jnp.bfloat16); params stay float32, and the
        embeddings are float32 whatever it is.
      progress: show a progress bar; default when the input is long and stderr is a terminal.
      skipped: a list to collect the images that cannot be read instead of raising: (index, message) pairs are
        appended, and the rows returned are the readable images' only, in order. Without it the first
        unreadable image raises an error naming its index among all the images.
      devices: the devices each batch's rows are split over (local_mesh; default this process's), params
        replicated on each (once per call; a no-op for params from replicate()).

    Returns:
      float32 (n_images, projection_dim), or (n_readable, projection_dim) with `skipped`.
    """
    parts = [rows for _, rows in stream_images(params, config, processor, images, batch_size=batch_size, dtype=dtype,
                                               progress=progress, skipped=skipped, devices=devices)]
    return np.concatenate(parts) if parts else np.zeros((0, config.projection_dim), np.float32)


def stream_images(params, config: DualEncoderConfig, processor, images: Iterable, *, batch_size: int = 32,
                  dtype=None, progress: bool | None = None, skipped: list | None = None,
                  devices: Sequence | None = None, total: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """encode_images batch by batch, for inputs too large to hold their embeddings in memory.

    Arguments as encode_images'; an iterable without a length (a generator) is always cut into batches of
    exactly `batch_size` rows, and `total` may say how many images it holds (for the progress bar only).

    Yields:
      (positions int64 (n,), embeddings float32 (n, projection_dim)) per batch: the positions in `images` of
      the rows (with `skipped`, the unreadable images' are absent; they are appended to `skipped` before the
      batch holding them is yielded).
    """
    _check_batch_size(batch_size)
    params, rows_split = _placed(params, devices)
    known = len(images) if hasattr(images, "__len__") else None
    batch_size = batch_rows(known, batch_size, rows_split.mesh.size)
    total = known if known is not None else total
    seen = [0]

    def prepare(batch):
        start, seen[0] = seen[0], seen[0] + len(batch)
        failures = None if skipped is None else []
        try:
            inputs = image_inputs(processor, batch)
        except (DualEncError, OSError, ValueError):
            inputs = _readable_inputs(processor, batch, start, failures)
        if failures:
            skipped.extend(failures)
        if inputs is None:
            return 0, None, None
        bad = {i for i, _ in failures or ()}
        positions = np.asarray([i for i in range(start, start + len(batch)) if i not in bad], np.int64)
        n = len(inputs["pixel_values"])
        inputs["pixel_values"] = np.asarray(inputs["pixel_values"], np.float32)
        inputs = jax.device_put(pad_rows(inputs, batch_size), rows_split)
        return n, lambda: image_embeds(params, config, inputs, dtype=dtype), positions

    yield from _stream(_batches(images, batch_size), prepare, _progress(total, batch_size, progress, "images"))


def _readable_inputs(processor, batch: list, start: int, skipped: list | None) -> dict | None:
    """A batch that failed as a whole, one image at a time: the unreadable ones are named by their index among
    all images and raised (skipped None) or collected; returns the readable ones' inputs, or None."""
    rows = []
    for j, image in enumerate(batch):
        try:
            rows.append(image_inputs(processor, [image]))
        except (DualEncError, OSError, ValueError) as e:
            message = str(e) or type(e).__name__
            if message.startswith("image 0"):  # the processor numbers its own one-image batch
                message = f"image {start + j}" + message[len("image 0"):]
            if skipped is None:
                raise type(e)(message) from None
            skipped.append((start + j, message))
    if not rows:
        return None
    return {k: np.concatenate([row[k] for row in rows]) for k in rows[0]}


def length_buckets(max_length: int, smallest: int = 8) -> tuple[int, ...]:
    """Padded sequence lengths: powers of two from `smallest`, and max_length itself."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return tuple(buckets) + (max_length,)


def encode_texts(params, config: DualEncoderConfig, tokenizer, texts: Iterable[str], *, batch_size: int = 64,
                 max_length: int | None = None, dtype=None, progress: bool | None = None,
                 devices: Sequence | None = None) -> np.ndarray:
    """L2-normalised text embeddings for any number of texts.

    Each batch is padded to `batch_size` rows and to the smallest length bucket (powers of two up to
    max_length) that holds its longest text, so there is one compilation per bucket, not per batch. A text
    tower that pools the last position (SigLIP, SigLIP 2) gets every text padded to max_length instead, as it
    was trained: a shorter padding would give other embeddings.

    Args:
      tokenizer: a Processor or Tokenizer.
      texts: a list or any iterable of strings.
      max_length: truncation length; default the tokenizer's.
      batch_size, dtype, devices: as encode_images'.

    Returns:
      float32 (n_texts, projection_dim).
    """
    _check_batch_size(batch_size)
    params, rows_split = _placed(params, devices)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    max_length = max_length or tokenizer.max_length
    padding = config.text_padding
    buckets = (max_length,) if padding == "max_length" else length_buckets(max_length)
    total = len(texts) if hasattr(texts, "__len__") else None
    batch_size = batch_rows(total, batch_size, rows_split.mesh.size)
    pad_id = tokenizer.pad_token_id or 0

    def prepare(batch):
        enc = tokenizer(batch, max_length=max_length, padding=padding)
        length = next(b for b in buckets if b >= enc["input_ids"].shape[1])
        arrays = {}
        for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if name not in enc:  # CLIP-style tokenizers give no token types, SigLIP's hub ones no mask
                arrays[name] = None
                continue
            a = np.asarray(enc[name], np.int32)
            padded = np.full((batch_size, length), fill, np.int32)
            padded[:a.shape[0], :a.shape[1]] = a
            arrays[name] = padded
        if arrays["attention_mask"] is not None:
            arrays["attention_mask"][len(batch):, 0] = 1  # padding rows attend to one token, not to none
        arrays = jax.device_put(arrays, rows_split)
        return len(batch), lambda: text_embeds(params, config, arrays["input_ids"], arrays["attention_mask"],
                                                arrays["token_type_ids"], dtype=dtype), None

    out = _run(_batches(texts, batch_size), prepare, _progress(total, batch_size, progress, "texts"))
    return np.zeros((0, config.projection_dim), np.float32) if out is None else out
