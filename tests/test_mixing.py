"""dualenc.data.mixing: several sources drawn with weights (open_clip's upsampling factors) in one seeded order."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import data
from dualenc.data import RecordSource, prepare
from dualenc.data.mixing import Mixture
from dualenc.data.pipeline import Pipeline, data_fingerprint
from dualenc.errors import ConfigError
from dualenc.processing.augment import Augment

SIZE = 8


class Virtual:
    """Record i: a tiny image of value i, one caption."""

    def __init__(self, n, base=0):
        self.n, self.base = n, base

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((SIZE, SIZE, 3), self.base + i, np.uint8), (f"caption {i % 10}",)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    data.write_vocab(folder, [f"caption {i}" for i in range(10)])
    return dualenc.Processor(dualenc.ImageProcessor(size={"height": SIZE, "width": SIZE}, do_normalize=False),
                             dualenc.Tokenizer.from_pretrained(folder, max_length=8))


def epoch_records(mixture, batch_size, seed=0, epochs=1):
    order = mixture.order(batch_size, seed)
    steps = range(epochs * order.batches_per_epoch)
    return np.concatenate([order.batch(k) for k in steps]), order


def test_an_epoch_draws_each_source_weight_times_its_size_exactly():
    mixture = Mixture([Virtual(6), Virtual(4)], [1, 2])
    assert mixture.draws == (6, 8) and len(mixture) == 10
    records, order = epoch_records(mixture, 7)  # 14 draws: two batches, nothing dropped
    counts = collections.Counter(records.tolist())
    assert [counts[r] for r in range(10)] == [1] * 6 + [2] * 4  # factor 2: each record of b twice per epoch
    assert collections.Counter(order.source_of(r) for r in records) == {0: 6, 1: 8}
    np.testing.assert_allclose(mixture.shares(), (6 / 14, 8 / 14))
    # A factor 0.5 draws half a source per epoch, the other half the next: all of it once in two epochs.
    half = Mixture([Virtual(10), Virtual(3)], [0.5, 1])
    records, order = epoch_records(half, 4, seed=3, epochs=2)
    counts = collections.Counter(records.tolist())
    assert half.draws == (5, 3) and all(counts[r] == 1 for r in range(10)) and all(counts[r] == 2 for r in (10, 11, 12))
    first, _ = epoch_records(half, 4, seed=3)
    assert collections.Counter(order.source_of(r) for r in first) == {0: 5, 1: 3}


def test_the_order_is_a_function_of_the_seed_and_the_step():
    mixture = Mixture([Virtual(50), Virtual(30), Virtual(7)], [1, 0.5, 3])
    a, b = mixture.order(8, seed=1), Mixture([Virtual(50), Virtual(30), Virtual(7)], [1, 0.5, 3]).order(8, seed=1)
    assert all(np.array_equal(a.batch(k), b.batch(k)) for k in (0, 5, 9, 123))
    assert not np.array_equal(a.batch(0), mixture.order(8, seed=2).batch(0))
    # Long-run shares follow the weights (w_k * N_k / sum): 50, 15, 21 draws per epoch of 86.
    records, order = epoch_records(mixture, 8, epochs=3)
    counts = collections.Counter(order.source_of(r) for r in records)
    share = np.array([counts[k] for k in range(3)]) / len(records)
    assert np.abs(share - np.array([50, 15, 21]) / 86).max() < 0.03


def test_pipeline_over_a_mixture_resumes_exactly_and_counts_sources(processor):
    mixture = Mixture([Virtual(12, base=0), Virtual(6, base=100)], [1, 2], names=["big", "small"])

    def batches(start=0, steps=6, **kw):
        pipe = Pipeline(mixture, processor, 6, seed=4, max_length=8, start=start, steps=steps, process_index=0,
                        process_count=1, **kw)
        return [batch for _, batch in pipe], pipe

    whole, pipe = batches()
    again, _ = batches()
    resumed, _ = batches(start=3)
    for a, b in zip(whole, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(whole[3:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    order = mixture.order(6, 4)
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(batch["_record"], order.batch(k))
        np.testing.assert_array_equal(batch["_source"], [order.source_of(r) for r in order.batch(k)])
        # The record's own image: part 1's records hold 100 + their index within it.
        expected = [r if r < 12 else 100 + r - 12 for r in batch["_record"]]
        np.testing.assert_allclose(batch["pixel_values"][:, 0, 0, 0] * 255, expected, atol=1e-3)
    # 24 draws per epoch, 6 batches = 36 rows: a whole epoch (12 + 12) and half of the next.
    assert sum(pipe.source_rows.values()) == 36 and pipe.source_rows[1] >= 12 and pipe.source_rows[0] >= 12
    first = collections.Counter(np.concatenate([b["_source"] for b in whole[:4]]).tolist())
    assert first == {0: 12, 1: 12}
    with pytest.raises(ConfigError, match="image_root"):
        Pipeline(mixture, processor, 6, process_index=0, process_count=1, image_root="/tmp")
    augmented, _ = batches(steps=1, augment=Augment(scale=(0.5, 1.0)))  # augmentation over a mixture
    assert augmented[0]["pixel_values"].shape == whole[0]["pixel_values"].shape


def test_prepared_folders_read_their_images_under_their_own_roots(processor, tmp_path):
    sources = []
    for part, value in (("a", 40), ("b", 200)):
        folder = tmp_path / part
        folder.mkdir()
        rows = []
        for i in range(4):  # both folders name the same files, with other pixels
            Image.fromarray(np.full((SIZE, SIZE, 3), value + i, np.uint8)).save(folder / f"{i}.png")
            rows.append(json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}))
        (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        prepare([str(folder / "pairs.jsonl")], str(tmp_path / f"prepared-{part}"))
        sources.append(RecordSource(str(tmp_path / f"prepared-{part}"), image_root=str(folder)))
    mixture = Mixture(sources, [1, 1])
    assert mixture.names == ("prepared-a", "prepared-b")
    pipe = Pipeline(mixture, processor, 4, max_length=8, steps=2, process_index=0, process_count=1)
    for _, batch in pipe:
        part, index = np.divmod(batch["_record"], 4)
        np.testing.assert_allclose(batch["pixel_values"][:, 0, 0, 0] * 255, np.where(part, 200, 40) + index,
                                   atol=1e-3)
    assert pipe.source_rows == {0: 4, 1: 4}  # one epoch of 8 draws


def test_fingerprint_covers_the_parts_their_order_and_weights(tmp_path):
    images = [np.full((SIZE, SIZE, 3), i, np.uint8) for i in range(8)]
    digits = data.PairDataset(images, [f"caption {i}" for i in range(8)], np.arange(8))
    other = data.PairDataset(images[:5], digits.captions[:5], np.arange(5))
    base = data_fingerprint(Mixture([digits, other], [1, 2]))
    assert data_fingerprint(Mixture([digits, other], [1, 2])) == base
    changed = [Mixture([digits, other], [1, 3]), Mixture([other, digits], [2, 1]), Mixture([digits, digits], [1, 2])]
    assert len({base, *map(data_fingerprint, changed)}) == 4
    assert base != data_fingerprint(digits)


def test_bad_mixtures_are_refused_with_clear_errors():
    for args, match in ((([Virtual(3)], [1, 2]), "one each"), (([Virtual(3), Virtual(2)], [1, 0]), r"weights\[1\]"),
                        (([Virtual(3), Virtual(0)], None), r"sources\[1\].*no records"),
                        (([Virtual(3), 5], None), r"sources\[1\]"), (([], None), "non-empty")):
        with pytest.raises(ConfigError, match=match):
            Mixture(*args)
    with pytest.raises(ConfigError, match="draws of one mixture epoch"):
        Mixture([Virtual(3), Virtual(2)], [1, 1]).order(6)
