"""Training batches over a random-access source, on grain: a global order in O(1) memory, per-process rows.

The stream is a pure function of (seed, step). Global batch k holds the records at global positions
k*B .. (k+1)*B - 1; position p lies in epoch p // (N//B*B), and within it at a place that
`grain.experimental.index_shuffle` maps to a record (a seeded permutation of the N records computed one index
at a time, so no permutation is ever stored: 400M records cost nothing). Each epoch drops the B-remainder of
its permutation, as `drop_remainder` does. Process i of P reads, decodes and tokenizes only rows
i*B/P .. (i+1)*B/P - 1 of every global batch, so the union over processes is the one-process batch whatever P
is, and resuming at step s (on any number of processes) is exact: the pipeline's whole state is the step.

A record that cannot be used (corrupt, truncated, its image missing or unreadable) is replaced by the next
usable record of the same epoch's permutation, and counted: later rows never shift. Each batch carries the
counts of its rows ("_skipped"); dualenc.train.loop.fit adds them up over every process, reports them and stops
(TooManyReplaced) once more than MAX_REPLACED of the records drawn had to be replaced, after MIN_DRAWN draws.

Training augmentation (dualenc.processing.augment) draws each row's crop and colours from (seed, step, row), and
several sources mix with weights in one order (dualenc.data.mixing.Mixture): both keep the stream a function of
(seed, step). Decoding runs in grain worker processes (workers > 0: `mp_prefetch`) or in threads of this process (0).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Iterator

import numpy as np

from dualenc.errors import ConfigError, DataError, InputError
from dualenc.processing.augment import Augment, augment_pixels, generator, output_size
from dualenc.processing.processor import image_inputs

# Why a record was replaced; a batch carries the counts under "_skipped" (per row, in this order).
SKIP_REASONS = ("corrupt record", "missing image", "unreadable image", "path outside the data folder")
ROUNDS = 4  # index_shuffle's rounds (grain's own default for its global shuffle)
MAX_REPLACED = 0.1  # the share of the records drawn that may be replaced (fit's max_replaced default)
MIN_DRAWN = 1000  # records drawn before that share is judged (a few bad records early on are no trend)


def grain_module():
    try:
        import grain
    except ImportError:
        raise ImportError('the training input pipeline needs grain: pip install "dualenc[train]"') from None
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app, the defaults
        flags.FLAGS.mark_as_parsed()
    return grain


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain's worker_init_fn for the decoding worker processes: a worker ends when the process that started it
    is gone (SIGKILLed, say); grain's would wait for it for ever, holding their shared memory."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="dualenc-exit-with-parent",
                         daemon=True).start()


class PairSource:
    """An in-memory PairDataset (caption file over an image folder, or the digits) as a random-access source:
    item i is (image i: a path or an HWC array, its captions)."""

    def __init__(self, dataset):
        self.images = dataset.images
        owners = np.asarray(dataset.caption_image)
        order = np.argsort(owners, kind="stable")
        self._starts = np.searchsorted(owners[order], np.arange(len(self.images) + 1))
        self._order, self._captions = order, dataset.captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        rows = self._order[self._starts[i]:self._starts[i + 1]]
        return self.images[i], tuple(self._captions[j] for j in rows)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's permutation (a 32-bit mix of the run's seed and the epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
    """Which record sits at each global position: epochs of seeded permutations, the remainder dropped."""

    size: int  # records in the source
    batch_size: int  # global batch
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.batch_size > self.size:
            raise DataError(f"batch_size {self.batch_size} is more than the {self.size} records (distinct images) of "
                            f"the data, and a batch holds each at most once: lower batch_size to {self.size} or less")

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, place in that epoch's permutation) of a global position."""
        return divmod(position, self.batches_per_epoch * self.batch_size)

    def record(self, epoch: int, place: int) -> int:
        from grain.experimental import index_shuffle

        if self.size == 1:
            return 0
        return int(index_shuffle(place % self.size, max_index=self.size - 1, seed=epoch_seed(self.seed, epoch),
                                 rounds=ROUNDS))

    def batch(self, step: int) -> np.ndarray:
        """The records of global batch `step` (before any replacement of unusable ones)."""
        return np.array([self.record(*self.locate(step * self.batch_size + j)) for j in range(self.batch_size)])


class RecordReader:
    """A record's captions and vision inputs, from either kind of source item. Picklable, so grain can send it
    to its worker processes; raises Unusable (with one of SKIP_REASONS) for a record that cannot be used."""

    def __init__(self, source, processor, *, image_root: str | None = None, allow_outside: bool = False):
        from dualenc.data.mixing import Mixture

        self.source, self.processor = source, processor
        self.image_root = image_root if image_root is not None else getattr(source, "image_root", None)
        self.allow_outside = allow_outside
        # A mixture's records are read by its parts' readers, each with its own image root.
        self.parts = [RecordReader(part, processor, allow_outside=allow_outside) for part in source.parts] \
            if isinstance(source, Mixture) else None

    def read(self, record: int):
        """(image: a path, an array, or an EncodedImage; captions)."""
        if self.parts is not None:
            part, index = self.source.locate(record)
            return self.parts[part].read(index)
        item = self.source[record]
        if not isinstance(item, (bytes, bytearray, memoryview)):
            return item
        from dualenc.data.records import decode_record, record_image

        try:
            parsed = decode_record(bytes(item))
        except DataError:
            raise Unusable("corrupt record") from None
        image = record_image(parsed, f"record {record} ({parsed.key})", self.image_root,
                             allow_outside=self.allow_outside)
        if image is None:
            raise Unusable("path outside the data folder")
        return image, parsed.captions

    def vision(self, image, augment: Augment | None = None, rng: np.random.Generator | None = None) -> dict:
        """The vision tower's inputs for one image as `read` gives it, without the batch axis; with `augment`,
        its augmented pixel values drawn from `rng` (see dualenc.processing.augment)."""
        try:
            if isinstance(image, str) and not os.path.isfile(image):
                raise Unusable("missing image")
            if augment is not None:
                return {"pixel_values": augment_pixels(augment, self.processor, image, rng)}
            inputs = image_inputs(self.processor, [image])
        except (InputError, OSError, ValueError):
            raise Unusable("unreadable image") from None
        out = {k: v[0] for k, v in inputs.items()}
        out["pixel_values"] = out["pixel_values"].astype(np.float32, copy=False)
        return out


class Decoder:
    """Turns a global position into one training row: the record's vision inputs (or its cached features) and
    one of its captions, tokenized. Picklable (grain's worker processes).

    With `augment`, the image of the row at global position p is augmented with the draws of
    augment.generator(seed, p // batch_size, p % batch_size): the same pixels whatever the process or worker,
    and after a resume. With a mixture's order (dualenc.data.mixing.MixedOrder), each row also carries
    "_source": the part its record came from."""

    def __init__(self, reader: RecordReader, order: GlobalOrder, *, max_length: int | None = None,
                 features=None, augment: Augment | None = None):
        self.reader, self.order, self.max_length, self.features = reader, order, max_length, features
        self.augment = augment

    def __call__(self, position: int) -> dict:
        epoch, place = self.order.locate(position)
        skipped = np.zeros(len(SKIP_REASONS), np.int32)
        for attempt in range(self.order.size):
            record = self.order.record(epoch, place + attempt)
            try:
                image, captions = self.reader.read(record)
                if self.features is None and self.augment is None:
                    vision = self.reader.vision(image)
                elif self.features is None:
                    rng = generator(self.order.seed, *divmod(position, self.order.batch_size))
                    vision = self.reader.vision(image, self.augment, rng)
                else:
                    vision = {"image_features": self.features.row(record)}
                    if vision["image_features"] is None:
                        raise Unusable("unreadable image")
            except Unusable as e:
                skipped[SKIP_REASONS.index(e.reason)] += 1
                continue
            pick = np.random.default_rng([self.order.seed, epoch, record]).integers(1 << 31)
            tokens = self.reader.processor.tokenizer([captions[pick % len(captions)]], max_length=self.max_length,
                                                     padding="max_length")
            row = {k: np.asarray(v, np.int32)[0] for k, v in tokens.items()}
            row.update(vision)
            row.update({"_record": np.int64(record), "_skipped": skipped})
            if hasattr(self.order, "source_of"):
                row["_source"] = np.int32(self.order.source_of(record))
            return row
        raise DataError(f"no record of the {self.order.size} in the data source can be used "
                        f"(skipped: {dict(zip(SKIP_REASONS, skipped.tolist()))})")


class TooManyReplaced(DataError):
    """More of the records drawn could not be used (and were replaced by others) than a run allows.

    Attributes:
      step: the step by which they were drawn; drawn: records drawn (used and replaced) since the run started or
        resumed; replaced: {reason: count} of those replaced, over every process; limit: the share allowed.
    """

    def __init__(self, step: int, drawn: int, replaced: dict, limit: float, data: str = "the training data",
                 option: str = "max_replaced"):
        self.step, self.drawn, self.replaced, self.limit = step, drawn, dict(replaced), limit
        reason, count = max(self.replaced.items(), key=lambda kv: kv[1])
        total = sum(self.replaced.values())
        super().__init__(f"{data}: {total:,} of the {drawn:,} records drawn by step {step} ({total / drawn:.0%}) "
                         f"could not be used and were replaced by others, more than {option} {limit:g} allows; "
                         f"most often: {reason} ({count:,}): check the data, or raise {option}")

    def named(self, data: str, option: str) -> TooManyReplaced:
        """The same error naming the data and the option as the caller knows them (e.g. a command's)."""
        return TooManyReplaced(self.step, self.drawn, self.replaced, self.limit, data, option)


def check_replaced(step: int, drawn: int, replaced: dict, limit: float, data: str = "the training data") -> None:
    """Raises TooManyReplaced when, after at least MIN_DRAWN records drawn, more than `limit` of them were
    replaced ({reason: count})."""
    if drawn >= MIN_DRAWN and sum(replaced.values()) > limit * drawn:
        raise TooManyReplaced(step, drawn, {k: v for k, v in replaced.items() if v}, limit, data)


def data_fingerprint(source) -> str:
    """sha256 of what identifies training data, wherever it lies: a PairDataset's captions, which image each
    describes, and its images (paths relative to the folder holding them all, or pixels); a prepared folder's
    manifest (dualenc.data.RecordSource); a Mixture's parts (each as here), in order, and their weights; for any
    other source only its type and length."""
    from dualenc.data.mixing import Mixture

    if isinstance(source, Mixture):
        digest = hashlib.sha256(f"dualenc-mixture-1;parts:{len(source.sources)};".encode())
        for part, weight in zip(source.sources, source.weights):
            digest.update(f"{data_fingerprint(part)}:{weight!r};".encode())
        return digest.hexdigest()
    digest = hashlib.sha256(f"dualenc-data-1;records:{len(source)};".encode())
    if hasattr(source, "caption_image"):
        paths = [os.fspath(i) for i in source.images if isinstance(i, (str, os.PathLike))]
        paths = [p if os.path.isabs(p) else os.path.abspath(p) for p in paths]
        cut = os.path.commonprefix([min(paths), max(paths)]).rfind(os.sep) + 1 if paths else 0  # their folder
        relative = iter(paths)
        for image in source.images:
            if isinstance(image, (str, os.PathLike)):
                digest.update(b"path:" + os.fsencode(next(relative)[cut:]) + b";")
            else:
                array = np.ascontiguousarray(image)
                digest.update(f"array:{array.dtype}:{array.shape};".encode() + array.tobytes())
        for start in range(0, len(source.captions), 4096):
            digest.update("\0".join(source.captions[start:start + 4096]).encode("utf-8", "surrogatepass") + b"\1")
        digest.update(np.ascontiguousarray(source.caption_image, np.int64).tobytes())
    elif isinstance(getattr(source, "manifest", None), dict):
        digest.update(json.dumps(source.manifest, sort_keys=True).encode())
    else:
        digest.update(f"source:{type(source).__module__}.{type(source).__qualname__}".encode())
    return digest.hexdigest()


class Unusable(Exception):
    """A record that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Pipeline:
    """This process's share of every global training batch, from `start` (a step) on, through grain.

    Args:
      source: random access to records: `len(source)` and `source[i]`, each item either the bytes of a
        dualenc record (dualenc.data.RecordSource: webdataset shards or caption files converted by
        `dualenc prepare`) or an (image, captions) pair (PairSource over a PairDataset). A PairDataset is
        wrapped in a PairSource.
      processor: a Processor (image processor and tokenizer).
      batch_size: the global batch (split evenly over `process_count`).
      seed, max_length, features: see Decoder (features: a LiT cache, dualenc.data.FeatureCache).
      start, steps: global batches start .. steps - 1 are produced (steps None: without end).
      process_index, process_count: this process's place (default: jax's).
      workers: decoding worker processes (0: threads of this process).
      threads: decoding threads per worker (or of this process).
      augment: augment the training images (dualenc.processing.augment.Augment: a random resized crop to the
        processor's image size, colour jitter, grayscale), each row's draws a function of (seed, step, row)
        alone. Not with `features`, nor with a processor that has no fixed image size (NaFlex).
    Several sources drawn with weights: pass a dualenc.data.mixing.Mixture as `source` (each row then carries
    "_source", and `source_rows` counts the rows drawn from each part); `image_root` then stays None (each
    RecordSource has its own).
    """

    def __init__(self, source, processor, batch_size: int, *, seed: int = 0, max_length: int | None = None,
                 start: int = 0, steps: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, workers: int = 0, threads: int = 8, features=None,
                 image_root: str | None = None, allow_outside: bool = False, prefetch: int = 2,
                 augment: Augment | None = None):
        from dualenc.data.mixing import Mixture

        if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
            raise ConfigError("source must be a random-access data source (len() and [i])")
        if hasattr(source, "caption_image"):  # a PairDataset
            source = PairSource(source)
        if augment is not None:
            if not isinstance(augment, Augment):
                raise ConfigError(f"augment must be a dualenc.processing.augment.Augment, got "
                                  f"{type(augment).__name__}")
            if features is not None:
                raise ConfigError("augmentation cannot apply with the LiT cache (a locked, cached vision tower): "
                                  "the cached features were computed once from the unaugmented images; train "
                                  "without augmentation, or without the cache")
            output_size(processor)  # a ConfigError for a processor without a fixed image size
        mixture = isinstance(source, Mixture)
        if mixture and image_root is not None:
            raise ConfigError("image_root applies to one source; with a Mixture give each RecordSource its own "
                              "image_root")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ConfigError(f"the global batch of {batch_size} does not split over {process_count} processes")
        for name, value in (("workers", workers), ("threads", threads), ("start", start)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "threads" else 0):
                raise ConfigError(f"{name} must be a {'positive' if name == 'threads' else 'non-negative'} "
                                  f"integer, got {value!r}")
        self.order = source.order(batch_size, seed) if mixture else GlobalOrder(len(source), batch_size, seed)
        self.reader = RecordReader(source, processor, image_root=image_root, allow_outside=allow_outside)
        self.decoder = Decoder(self.reader, self.order, max_length=max_length, features=features, augment=augment)
        self.local_batch = batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.start, self.steps = start, steps
        self.workers, self.threads, self.prefetch = workers, threads, prefetch
        self.skipped = collections.Counter()
        self.source_rows = collections.Counter()  # a Mixture's part index -> rows of this process drawn from it
        self.step = start

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def epoch(self, step: int) -> float:
        """Epochs of data consumed after `step` global batches."""
        return step / self.order.batches_per_epoch

    def positions(self, step: int) -> range:
        """The global positions this process reads for global batch `step`."""
        first = step * self.order.batch_size + self.process_index * self.local_batch
        return range(first, first + self.local_batch)

    def _dataset(self):
        grain = grain_module()
        b, big, mine = self.local_batch, self.order.batch_size, self.process_index * self.local_batch
        stop = (self.steps if self.steps is not None else 1 << 40) * b
        ds = grain.MapDataset.range(self.start * b, max(stop, self.start * b))
        ds = ds.map(_Position(b, big, mine)).map(self.decoder).batch(b, drop_remainder=True)
        # Each element is a whole local batch, decoded by one thread: `threads` batches in flight, no more buffered.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.threads))
        if self.workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=self.prefetch),
                                worker_init_fn=exit_with_parent)
        return ds

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        """Yields (step, this process's rows of global batch `step`) from `start` on: the inputs, "_record" (the
        record of each row), "_skipped" (each row's records replaced, by reason: (rows, len(SKIP_REASONS))) and,
        from a Mixture, "_source" (each row's part); `skipped` counts the records replaced in the batches handed
        out, `source_rows` a Mixture's rows by part."""
        step = self.start
        batches = iter(self._dataset())
        try:
            for batch in batches:
                skipped = batch["_skipped"].sum(axis=0)
                self.skipped.update({r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n})
                if "_source" in batch:
                    self.source_rows.update(collections.Counter(batch["_source"].tolist()))
                self.step = step + 1
                yield step, batch
                step += 1
        finally:
            batches.close()  # grain's threads joined and its worker processes stopped now, not when collected


class _Position:
    """Local index j of this process's stream -> the global position it reads (picklable)."""

    def __init__(self, local: int, batch: int, offset: int):
        self.local, self.batch, self.offset = local, batch, offset

    def __call__(self, j: int) -> int:
        step, row = divmod(j, self.local)
        return step * self.batch + self.offset + row
