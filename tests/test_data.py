"""Pair datasets: caption files with bad rows counted, the embedded digits, deterministic batches."""

import json
import time

import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import data


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "outside.png").write_bytes((tmp_path / "imgs" / "0.png").read_bytes())
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_jsonl_with_bad_rows_counted(folder):
    rows = [
        {"image": "0.png", "caption": "zero"},
        {"image": "1.png", "captions": ["one", "uno", ""]},
        {"image": "1.png", "caption": "ein"},
        {"image": "2.png", "caption": "   "},
        {"image": "9.png", "caption": "missing"},
        {"image": "../outside.png", "caption": "escapes"},
        {"caption": "no image"},
        {"image": "3.png", "text": "three"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "", "[1, 2]"]
    (folder / "imgs" / "pairs.jsonl").write_text("\n".join(lines))
    ds = data.read_pairs(folder / "imgs" / "pairs.jsonl")
    assert ds.captions == ["zero", "one", "uno", "ein", "three"]
    assert [ds.images[i].rsplit("/", 1)[1] for i in ds.caption_image] == ["0.png", "1.png", "1.png", "1.png",
                                                                          "3.png"]
    assert dict(ds.skipped) == {"empty caption": 1, "missing image": 1, "path outside the data folder": 1,
                                "no image": 1, "malformed row": 2}
    allowed = data.read_pairs(folder / "imgs" / "pairs.jsonl", allow_outside=True)
    assert "escapes" in allowed.captions


def test_csv_and_file_errors(folder):
    (folder / "pairs.csv").write_text("file_name,caption\nimgs/4.png,four\nimgs/5.png,\nimgs/5.png,five\n")
    ds = data.read_pairs(folder / "pairs.csv")
    assert ds.captions == ["four", "five"] and dict(ds.skipped) == {"empty caption": 1}
    (folder / "cols.csv").write_text("name,label\na,b\n")
    with pytest.raises(dualenc.DataError, match="cols.csv.*header"):
        data.read_pairs(folder / "cols.csv")
    (folder / "latin.csv").write_bytes("image,caption\nimgs/4.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(dualenc.DataError, match="latin.csv.*UTF-8"):
        data.read_pairs(folder / "latin.csv")
    (folder / "empty.jsonl").write_text("\n\n")
    with pytest.raises(dualenc.DataError, match="no usable pairs"):
        data.read_pairs(folder / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.read_pairs(folder / "nope.jsonl")
    with pytest.raises(dualenc.DataError, match=r"\.jsonl, \.csv"):
        data.read_pairs(folder / "imgs" / "0.png")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert len(train.images) + len(test.images) == 1797
    assert len(test.images) == pytest.approx(0.2 * 1797, abs=10)
    assert np.all(np.bincount(test.labels, minlength=10) >= 30)
    assert train.images[0].shape == (32, 32, 3) and train.images[0].dtype == np.uint8
    assert len(train.captions) == len(train.images) * len(data.DIGIT_TEMPLATES)
    label = train.labels[train.caption_image[7]]
    assert data.DIGIT_WORDS[label] in train.captions[7] or str(label) in train.captions[7]
    again = data.load_digits("test")
    assert all(np.array_equal(a, b) for a, b in zip(test.images, again.images))
    train_set = {a.tobytes() for a in train.images}
    overlap = sum(a.tobytes() in train_set for a in test.images)
    assert overlap <= 2  # the raw dataset itself repeats a couple of images; the split never shares an index


class FakeProcessor:
    class image_processor:  # noqa: N801
        def __call__(self, images):
            out = []
            for im in images:
                if isinstance(im, str) and im.endswith("broken.png"):
                    raise dualenc.InputError("images[0]: cannot read broken.png")
                out.append(np.zeros((3, 4, 4), np.float32) + (hash(str(im)) % 7))
            return np.stack(out)

    image_processor = image_processor()

    @staticmethod
    def tokenizer(texts, max_length, padding):
        ids = np.array([[1] + [len(t)] + [0] * (max_length - 2) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0) * 1, "token_type_ids": 0 * ids}


def test_batches_are_deterministic_resumable_and_distinct(folder):
    ds = data.load_digits("test")
    stream = data.Batches(ds, FakeProcessor(), 16, seed=3, max_length=8)
    seen = []
    for pos, batch in stream:
        seen.append((pos, batch))
        if len(seen) == 30:
            break
    per_epoch = stream.batches_per_epoch
    assert [p for p, _ in seen[:per_epoch + 1]] == [(0, i) for i in range(per_epoch)] + [(1, 0)]
    for _, b in seen:
        assert b["pixel_values"].shape == (16, 3, 4, 4) and b["input_ids"].shape == (16, 8)
        assert len(set(b["image_index"])) == 16
    resumed = data.Batches(ds, FakeProcessor(), 16, seed=3, max_length=8, start=seen[20][0])
    pos, batch = next(iter(resumed))
    assert pos == seen[20][0]
    for key in batch:
        np.testing.assert_array_equal(batch[key], seen[20][1][key])
    other = next(iter(data.Batches(ds, FakeProcessor(), 16, seed=4, max_length=8)))[1]
    assert not np.array_equal(other["image_index"], seen[0][1]["image_index"])


def test_unreadable_images_are_counted_and_features_skip_decoding(folder):
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps({"image": f"imgs/{n}", "caption": n}) for n in
                                                  ["0.png", "1.png", "broken.png", "2.png"]))
    ds = data.read_pairs(folder / "pairs.jsonl")
    stream = data.Batches(ds, FakeProcessor(), 2, seed=0, max_length=4)
    batches = iter(stream)
    first_epoch = [next(batches) for _ in range(stream.batches_per_epoch)]
    assert sorted(np.concatenate([b["image_index"] for _, b in first_epoch])) == [0, 1, 2, 3]
    time.sleep(0.5)  # the prefetch thread reads ahead into the next epoch, which holds the broken image again
    assert stream.skipped["unreadable image"] == 1  # only batches handed out count
    batches.close()
    features = np.arange(8, dtype=np.float32).reshape(4, 2)
    cached = data.Batches(ds, FakeProcessor(), 2, max_length=4, image_features=features)
    _, batch = next(iter(cached))
    assert "pixel_values" not in batch
    np.testing.assert_array_equal(batch["image_features"], features[batch["image_index"]])
    with pytest.raises(dualenc.DataError, match="batch_size"):
        data.Batches(ds, FakeProcessor(), 5)


def test_a_csv_row_the_csv_module_cannot_parse_is_skipped_and_counted(tmp_path):
    """A bare carriage return inside an unquoted field made csv raise and the whole read fail."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    (tmp_path / "pairs.csv").write_bytes(b"image,caption\na.png,\r0\nb.png,a caption\n")
    dataset = data.read_pairs(tmp_path / "pairs.csv")
    assert dataset.captions == ["a caption"] and dataset.skipped["malformed row"] == 1
    (tmp_path / "header.csv").write_bytes(b"\r0\nimage,caption\nb.png,a caption\n")  # in the header: the file
    with pytest.raises(dualenc.DataError, match="header.csv"):
        data.read_pairs(tmp_path / "header.csv")
