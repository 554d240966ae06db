"""Several training sources drawn with weights in one seeded global order, as open_clip's
`--train-data 'a::b' --train-data-upsampling-factors '1::2'`.

The weights are open_clip's upsampling factors: relative to each source's size, not shares. open_clip samples
shards with replacement, each shard of source k with weight w_k, so a record of source k is drawn w_k times as
often as one of a source with factor 1, and source k's share of the draws is w_k * N_k / sum_j w_j * N_j (all 1:
every record equally often, whatever source it is in). Here that is exact rather than in expectation: one
mixture epoch holds D_k = round(w_k * N_k) draws of source k (at least one), and the pipeline's global order
(dualenc.data.pipeline.GlobalOrder) permutes those D = sum D_k slots per epoch. The j-th draw of source k in
epoch e is its (e * D_k + j)-th draw overall, which walks source k's own seeded permutations one after another:
w_k = 1 draws each of its records once per epoch, 2 twice, 0.5 each once every two epochs. Everything is a
function of the seed and the position (O(1) memory, one index_shuffle per level), so a resume is exact.

A Mixture is also a random-access source: record i of the concatenated parts (len is the sum of their sizes), as
the LiT cache and the pipeline's reader see it.
"""

from __future__ import annotations

import bisect
import math
import os
from typing import Sequence

import numpy as np

from dualenc.errors import ConfigError
from dualenc.data.pipeline import GlobalOrder, PairSource

STREAM = 0x6D697831  # "mix1": keeps the parts' permutations apart from the other uses of the run's seed


def _name(source, index: int) -> str:
    folder = getattr(source, "folder", None)
    return os.path.basename(os.path.normpath(folder)) if isinstance(folder, str) else f"source {index}"


class Mixture:
    """Random-access sources drawn in proportion to their weights (open_clip's upsampling factors).

    Args:
      sources: two or more PairDatasets (read_pairs, load_digits: wrapped in PairSource), RecordSources
        (prepared folders, each with its own image root) or other random-access sources (len() and [i]).
      weights: one upsampling factor per source (finite, positive; default 1 each): a record of source k is
        drawn weights[k] times per mixture epoch (rounded per source: D_k = round(w_k * N_k), at least 1).
      names: how reports name the sources (default: a RecordSource's folder name, else "source i").

    Attributes:
      sources: as given (what data_fingerprint hashes); parts: the random-access sources; sizes: their records;
      weights: floats; draws: D_k, the draws of each per mixture epoch; names.
    """

    def __init__(self, sources: Sequence, weights: Sequence[float] | None = None, *,
                 names: Sequence[str] | None = None):
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or len(sources) < 1:
            raise ConfigError("sources must be a non-empty list of data sources")
        self.sources = tuple(sources)
        self.parts = tuple(PairSource(s) if hasattr(s, "caption_image") else s for s in self.sources)
        for i, part in enumerate(self.parts):
            if not hasattr(part, "__getitem__") or not hasattr(part, "__len__"):
                raise ConfigError(f"sources[{i}] must be a random-access data source (len() and [i]), got "
                                  f"{type(part).__name__}")
            if isinstance(part, Mixture):
                raise ConfigError(f"sources[{i}] is a Mixture: list its sources and weights in one Mixture")
        self.sizes = tuple(len(p) for p in self.parts)
        weights = [1.0] * len(self.parts) if weights is None else list(weights)
        if len(weights) != len(self.parts):
            raise ConfigError(f"weights has {len(weights)} values for {len(self.parts)} sources: give one each")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"weights[{i}] must be a finite number above 0, got {w!r}")
        self.weights = tuple(float(w) for w in weights)
        for i, n in enumerate(self.sizes):
            if n < 1:
                raise ConfigError(f"sources[{i}] ({_name(self.parts[i], i)}) holds no records")
        self.draws = tuple(max(1, math.floor(w * n + 0.5)) for w, n in zip(self.weights, self.sizes))
        names = [_name(p, i) for i, p in enumerate(self.parts)] if names is None else list(names)
        if len(names) != len(self.parts) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"names must be {len(self.parts)} strings, one per source, got {names!r}")
        self.names = tuple(names)
        self.offsets = tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, record: int) -> tuple[int, int]:
        """(part, index within it) of record `record` of the concatenation."""
        if not 0 <= record < len(self):
            raise IndexError(f"record {record} is outside the mixture's {len(self)} records")
        part = bisect.bisect_right(self.offsets, record) - 1
        return part, record - self.offsets[part]

    def __getitem__(self, record: int):
        part, index = self.locate(record)
        return self.parts[part][index]

    def shares(self) -> tuple[float, ...]:
        """The share of the draws each source gets (D_k / D)."""
        total = sum(self.draws)
        return tuple(d / total for d in self.draws)

    def order(self, batch_size: int, seed: int = 0) -> "MixedOrder":
        """The global order of the mixture's draws for this batch and seed (what Pipeline uses)."""
        return MixedOrder(self.sizes, self.draws, self.offsets, batch_size, seed)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {s} records x {w:g}" for n, s, w in zip(self.names, self.sizes, self.weights))
        return f"Mixture({parts})"


def part_seed(seed: int, part: int) -> int:
    """The seed of one part's own permutations."""
    return int(np.random.SeedSequence([STREAM, seed, part]).generate_state(1)[0] >> 1)


class MixedOrder:
    """Which record (of the concatenation) sits at each global position of a mixture: GlobalOrder's interface
    (size: slots per epoch; batch_size; seed; batches_per_epoch; locate; record; batch) plus source_of.
    Picklable (grain's worker processes)."""

    def __init__(self, sizes: Sequence[int], draws: Sequence[int], offsets: Sequence[int], batch_size: int,
                 seed: int = 0):
        self.sizes, self.draws, self.offsets = tuple(sizes), tuple(draws), tuple(offsets)
        self.size = sum(self.draws)
        if isinstance(batch_size, int) and self.size < batch_size:
            raise ConfigError(f"batch_size {batch_size} is more than the {self.size} draws of one mixture epoch "
                              f"(records times weights, {list(self.draws)} per source): lower batch_size or raise "
                              f"the weights")
        self.slots = GlobalOrder(self.size, batch_size, seed)
        self.batch_size, self.seed = batch_size, seed
        self.starts = tuple(int(x) for x in np.cumsum((0,) + self.draws[:-1]))
        self.parts = tuple(GlobalOrder(n, 1, part_seed(seed, k)) for k, n in enumerate(self.sizes))

    @property
    def batches_per_epoch(self) -> int:
        return self.slots.batches_per_epoch

    def locate(self, position: int) -> tuple[int, int]:
        """(mixture epoch, place in that epoch's permutation of slots) of a global position."""
        return self.slots.locate(position)

    def record(self, epoch: int, place: int) -> int:
        slot = self.slots.record(epoch, place)
        part = bisect.bisect_right(self.starts, slot) - 1
        sub_epoch, index = divmod(epoch * self.draws[part] + slot - self.starts[part], self.sizes[part])
        return self.offsets[part] + self.parts[part].record(sub_epoch, index)

    def source_of(self, record: int) -> int:
        """The part a record of the concatenation belongs to."""
        return bisect.bisect_right(self.offsets, record) - 1

    def batch(self, step: int) -> np.ndarray:
        """The records of global batch `step` (before any replacement of unusable ones)."""
        return np.array([self.record(*self.locate(step * self.batch_size + j)) for j in range(self.batch_size)])

