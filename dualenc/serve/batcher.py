"""Batching for the service: the inputs of requests arriving together are queued per tower (text, image) and run
together in a few fixed batch sizes (padded with dualenc.encode.pad_rows), their rows split over every local
device, so the programs compiled stay few whatever the mix of requests; each request gets its own rows back.

Inputs are prepared (tokenized, decoded and resized) in the requests' own threads; one worker thread per tower
takes whatever is queued, up to the largest batch size, while the previous batch runs; when the last batch held
rows of several requests, it first waits up to COLLECT_S for the batch to fill."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dualenc import encode
from dualenc.errors import DualEncError, InputError
from dualenc.processing import EncodedImage
from dualenc.processing.processor import image_inputs

BATCH_SIZES = (1, 8, 32, 64)
COLLECT_S = 0.002  # how long a batch waits for more rows while requests arrive together (the last batch held several)
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one per program built for new shapes


class Stopping(Exception):
    """The service is shutting down and takes no new work."""


def batch_sizes(max_batch: int, devices: int) -> tuple[int, ...]:
    """The padded batch sizes: those of BATCH_SIZES up to max_batch, and max_batch, each rounded up to a
    multiple of the devices (encode.device_rows)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
    return tuple(sorted({encode.device_rows(b, devices) for b in BATCH_SIZES + (max_batch,) if b <= max_batch}))


class _Job:
    """One request's rows for one tower: their arrays, the embeddings as they come back, its future."""

    def __init__(self, arrays: dict, n: int, dims: int):
        self.arrays, self.n = arrays, n
        self.out = np.empty((n, dims), np.float32)
        self.taken = self.done = 0
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class _Tower(threading.Thread):
    """A worker thread: takes the queued rows of its tower, up to the largest batch size, and runs them."""

    def __init__(self, name: str, run, sizes: tuple[int, ...], batching: bool, metrics):
        super().__init__(name=f"dualenc-serve-{name}", daemon=True)
        self.tower, self.run_batch, self.sizes, self.batching, self.metrics = name, run, sizes, batching, metrics
        self.queue: collections.deque[_Job] = collections.deque()
        self.ready = threading.Condition()
        self.closing = False
        self.together = False  # the last batch ran rows of several requests

    def submit(self, job: _Job) -> None:
        with self.ready:
            if self.closing:
                raise Stopping("the service is stopping")
            self.queue.append(job)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closing = True
            self.ready.notify()

    def pending(self) -> int:
        with self.ready:
            return sum(job.n - job.taken for job in self.queue)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """(job, first row, rows) pieces filling at most the largest batch size; with batching off, one job's."""
        pieces, rows, limit = [], 0, self.sizes[-1]
        with self.ready:
            while not self.queue and not self.closing:
                self.ready.wait()
            if self.batching and self.together:
                deadline = time.monotonic() + COLLECT_S
                while not self.closing and sum(job.n - job.taken for job in self.queue) < limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.ready.wait(left)
            if self.batching:
                limit = self._batch_rows(sum(job.n - job.taken for job in self.queue))
            while self.queue and rows < limit:
                job = self.queue[0]
                if job.taken == 0 and not job.future.set_running_or_notify_cancel():
                    self.queue.popleft()  # its request timed out or left before any row ran
                    continue
                take = min(job.n - job.taken, limit - rows)
                pieces.append((job, job.taken, take))
                job.taken += take
                rows += take
                if job.taken == job.n:
                    self.queue.popleft()
                if not self.batching:
                    break
            self.together = len(pieces) > 1
        return pieces

    def _batch_rows(self, queued: int) -> int:
        """Rows for the next batch of `queued`: all of them up to the second batch size (padded to a size), else
        the largest size they fill, unpadded (the rest go in the next batch, which starts when this one ends):
        a compute-bound model wastes no work on padding."""
        if queued >= self.sizes[-1]:
            return self.sizes[-1]
        if len(self.sizes) < 2 or queued <= self.sizes[1]:
            return queued
        return max(s for s in self.sizes if s <= queued)

    def run(self) -> None:
        while True:
            pieces = self._take()
            if not pieces:
                return  # closing, and nothing left
            rows = sum(take for _, _, take in pieces)
            size = next(s for s in self.sizes if s >= rows)
            try:
                embeds = self.run_batch(pieces, size)
            except Exception as e:  # noqa: BLE001 (handed to each request, whose handler logs it)
                for job, _, _ in pieces:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.batch(self.tower, rows, size)
            at = 0
            for job, start, take in pieces:
                job.out[start:start + take] = embeds[at:at + take]
                at += take
                job.done += take
                if job.done == job.n and not job.future.done():
                    job.future.set_result(job.out)


class Batcher:
    """A model's two towers behind per-tower queues.

    Args:
      params, config, processor: the model (params are replicated on every device once).
      dtype: the matmuls' compute dtype (None: float32; jnp.bfloat16).
      max_batch: the largest batch run (rows; rounded up to a multiple of the devices).
      batching: False runs each request's rows alone (no rows of two requests in one batch).
      metrics: a dualenc.serve.metrics.Metrics for batch sizes and compile counts.
      devices: the devices each batch is split over (default this process's).
    """

    def __init__(self, params, config, processor, *, dtype=None, max_batch: int = 64, batching: bool = True,
                 metrics=None, devices: Sequence | None = None):
        mesh = encode.local_mesh(devices)
        self.config, self.dtype, self.metrics = config, dtype, metrics
        self.params = encode.replicate(params, devices)
        self.rows_split = NamedSharding(mesh, P("data"))
        self.sizes = batch_sizes(max_batch, mesh.size)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = self.tokenizer.max_length
        self.padding = config.text_padding
        self.lengths = (self.max_length,) if self.padding == "max_length" else encode.length_buckets(self.max_length)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.towers = {"text": _Tower("text", self._run_texts, self.sizes, batching, metrics),
                       "image": _Tower("image", self._run_images, self.sizes, batching, metrics)}
        self._compiling = {tower: tower.tower for tower in self.towers.values()}
        jax.monitoring.register_event_duration_secs_listener(self._on_lowering)
        for tower in self.towers.values():
            tower.start()

    def _on_lowering(self, event: str, duration: float, **kwargs) -> None:
        if event == LOWERING_EVENT and self.metrics is not None:
            name = self._compiling.get(threading.current_thread())
            if name is not None:
                self.metrics.compiled(name)

    # ----------------------------------------------------------------------------------- in the requests' threads

    def prepare_texts(self, texts: Sequence[str]) -> tuple[dict, list[int]]:
        """The text tower's arrays for texts (padded to the longest of them, or to max_length where the tower
        pools the last position) and each text's token count."""
        enc = self.tokenizer(list(texts), max_length=self.max_length, padding=self.padding)
        arrays = {name: None if name not in enc else np.asarray(enc[name], np.int32)
                  for name in ("input_ids", "attention_mask", "token_type_ids")}
        ids = arrays["input_ids"]
        tokens = arrays["attention_mask"].sum(1) if arrays["attention_mask"] is not None else \
            (ids != self.pad_id).sum(1)
        return arrays, [int(t) for t in tokens]

    def prepare_images(self, images: Sequence[bytes], names: Sequence[str]) -> dict:
        """The image tower's arrays for encoded images (read as `dualenc embed` reads files); an image that cannot
        be read is an InputError whose message starts with its name."""
        rows = []
        for data, name in zip(images, names):
            try:
                rows.append(image_inputs(self.processor, [EncodedImage(name, data)]))
            except (DualEncError, OSError, ValueError) as e:
                message = str(e) or type(e).__name__
                raise InputError(message.replace("image 0 ", "", 1)) from None
        return {k: np.concatenate([np.asarray(row[k]) for row in rows]) for k in rows[0]}

    def submit(self, tower: str, arrays: dict) -> concurrent.futures.Future:
        """Queues prepared rows; the future gives their embeddings, float32 (n, projection_dim)."""
        n = len(next(a for a in arrays.values() if a is not None))
        job = _Job(arrays, n, self.config.projection_dim)
        self.towers[tower].submit(job)
        return job.future

    def pending(self) -> int:
        return sum(tower.pending() for tower in self.towers.values())

    def close(self, timeout: float | None = None) -> None:
        """Takes no more work, runs what is queued, and stops the workers."""
        for tower in self.towers.values():
            tower.close()
        for tower in self.towers.values():
            tower.join(timeout)
        jax.monitoring.unregister_event_duration_listener(self._on_lowering)

    # ----------------------------------------------------------------------------------- in the towers' threads

    def _run_images(self, pieces, size: int) -> np.ndarray:
        keys = pieces[0][0].arrays.keys()
        arrays = {k: np.concatenate([job.arrays[k][start:start + take] for job, start, take in pieces])
                  for k in keys}
        rows = len(arrays["pixel_values"])
        inputs = jax.device_put(encode.pad_rows(arrays, size), self.rows_split)
        return np.asarray(encode.image_embeds(self.params, self.config, inputs, dtype=self.dtype))[:rows]

    def _run_texts(self, pieces, size: int) -> np.ndarray:
        width = max(job.arrays["input_ids"].shape[1] for job, _, _ in pieces)
        length = next(b for b in self.lengths if b >= width)
        arrays = {}
        for name, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if pieces[0][0].arrays[name] is None:
                arrays[name] = None
                continue
            parts = []
            for job, start, take in pieces:
                a = job.arrays[name][start:start + take]
                parts.append(np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fill))
            arrays[name] = np.concatenate(parts)
        rows = len(arrays["input_ids"])
        present = {k: v for k, v in arrays.items() if v is not None}
        inputs = {**dict.fromkeys(arrays), **jax.device_put(encode.pad_rows(present, size), self.rows_split)}
        return np.asarray(encode.text_embeds(self.params, self.config, inputs["input_ids"],
                                                 inputs["attention_mask"], inputs["token_type_ids"], dtype=self.dtype))[:rows]
