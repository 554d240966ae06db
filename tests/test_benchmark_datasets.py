"""CLIP_benchmark's dataset layouts read back by dualenc.benchmark.datasets: its webdataset folders (against its own
reader), image folders (against torchvision's ImageFolder), dualenc JSONL, hub dataset ids from an offline cache,
the built-in class names and templates, and a one-line error for each kind of bad input."""

import gzip
import io
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

import benchmark_data as bd
import clip_benchmark
import huggingface_hub
from huggingface_hub import constants

from dualenc import templates
from dualenc.benchmark import datasets, names
from dualenc.errors import InputError

CLIP_BENCHMARK_DATA = os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets")
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    return {"classification": bd.classification_set(str(root / "wds_toy"), per_class=(1, 1, 3)),
            "retrieval": bd.retrieval_set(str(root / "wds_ret"))}


def tar_samples(root, split):
    """(key as '0.tar/key', {ext: bytes}) of a split's tars, read with tarfile, in order."""
    out = []
    n = int(open(os.path.join(root, split, "nshards.txt")).read())
    for i in range(n):
        with tarfile.open(os.path.join(root, split, f"{i}.tar")) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not out or out[-1][0] != f"{i}.tar/{key}":
                    out.append((f"{i}.tar/{key}", {}))
                out[-1][1][ext] = tar.extractfile(member).read()
    return out


def pixels(image):
    return np.asarray(image)


def test_a_classification_split_reads_back(sets):
    root = sets["classification"]
    for split, n in (("test", 21), ("train", 7)):
        data = datasets.open_benchmark(root, split)
        assert (data.name, data.root, data.split, data.task) == ("wds/toy", root, split, "zeroshot_classification")
        assert data.classnames == bd.CLASSES and data.templates == bd.TEMPLATES and data.size == n
        examples = list(data.examples())
        written = tar_samples(root, split)
        assert [e.key for e in examples] == [key for key, _ in written]
        assert [e.label for e in examples] == [int(m["cls"]) for _, m in written]
        assert all(e.captions == () for e in examples)
        for e, (_, members) in zip(examples, written):
            ext = next(x for x in ("webp", "png", "jpg") if x in members)
            stored = Image.open(io.BytesIO(members[ext]))
            assert e.image.mode == stored.mode == "RGB" and e.image.size == (48, 48)
            np.testing.assert_array_equal(pixels(e.image), pixels(stored))
    assert datasets.open_benchmark(root, name="toy").name == "toy"


def test_a_retrieval_split_reads_back(sets):
    root = sets["retrieval"]
    data = datasets.open_benchmark(root)
    assert (data.name, data.task, data.classnames, data.templates, data.size) == (
        "wds/ret", "zeroshot_retrieval", None, None, 14)
    examples = list(data.examples())
    written = tar_samples(root, "test")
    assert [e.key for e in examples] == [key for key, _ in written]
    assert [e.captions for e in examples] == [tuple(m["txt"].decode().split("\n")) for _, m in written]
    assert all(e.label is None for e in examples) and max(len(e.captions) for e in examples) > 1
    for e, (_, members) in zip(examples, written):
        np.testing.assert_array_equal(pixels(e.image), pixels(Image.open(io.BytesIO(members["jpg"]))))


def test_clip_benchmarks_own_reader_gives_the_same_examples(sets):
    from clip_benchmark.datasets.builder import build_dataset, build_wds_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = build_dataset("wds/toy", root=sets["classification"], transform=lambda x: x, split="test",
                               task="zeroshot_classification")
        ours = datasets.open_benchmark(sets["classification"])
        assert list(ours.classnames) == theirs.classes and list(ours.templates) == theirs.templates
        pairs = list(zip(theirs, ours.examples(), strict=True))
        assert [label for (_, label), _ in pairs] == [e.label for _, e in pairs]
        for (image, _), e in pairs:
            np.testing.assert_array_equal(pixels(image), pixels(e.image.convert("RGB")))
        theirs = build_wds_dataset("ret", transform=lambda x: x, data_dir=sets["retrieval"])
        pairs = list(zip(theirs, datasets.open_benchmark(sets["retrieval"]).examples(), strict=True))
    assert [tuple(captions) for (_, captions), _ in pairs] == [e.captions for _, e in pairs]
    for (image, _), e in pairs:
        np.testing.assert_array_equal(pixels(image), pixels(e.image))


def test_a_gzipped_tar_is_read_without_a_size(sets, tmp_path):
    root = shutil.copytree(sets["retrieval"], tmp_path / "wds_gz")
    for i in range(2):
        path = root / "test" / f"{i}.tar"
        path.write_bytes(gzip.compress(path.read_bytes()))
    data = datasets.open_benchmark(root)
    assert data.size is None and data.name == "wds/gz"
    want = [e.captions for e in datasets.open_benchmark(sets["retrieval"]).examples()]
    assert [e.captions for e in data.examples()] == want
    cut = root / "test" / "1.tar"
    cut.write_bytes(cut.read_bytes()[:-200])
    with pytest.raises(InputError) as e:
        list(data.examples())
    assert str(cut) in str(e.value) and "truncated tar" in str(e.value) and "\n" not in str(e.value)


def write_folder(sets, folder):
    """The test split's images as PNGs in folder/CLASS/KEY.png (CLASS the class name, underscored); the
    examples."""
    examples = list(datasets.open_benchmark(sets["classification"]).examples())
    for e in examples:
        where = folder / bd.CLASSES[e.label].replace(" ", "_")
        where.mkdir(parents=True, exist_ok=True)
        e.image.save(where / (e.key.replace("/", "_") + ".png"))
    return examples


def test_an_image_folder_reads_as_torchvisions_image_folder(sets, tmp_path):
    from torchvision.datasets import ImageFolder

    examples = write_folder(sets, tmp_path / "folder" / "test")
    (tmp_path / "folder" / "test" / "blue_flower" / "notes.txt").write_text("not an image")
    reference = ImageFolder(str(tmp_path / "folder" / "test"))
    data = datasets.open_benchmark(tmp_path / "folder")
    assert (data.name, data.task, data.size) == ("folder", "zeroshot_classification", 21)
    assert data.classnames == tuple(reference.classes) == tuple(sorted(c.replace(" ", "_") for c in bd.CLASSES))
    assert data.templates == tuple(templates.OPENAI_IMAGENET)
    got = list(data.examples())
    assert [(e.key, e.label) for e in got] == reference.samples
    source = {e.key.replace("/", "_"): e.image for e in examples}
    for e in got:
        np.testing.assert_array_equal(pixels(e.image), pixels(source[os.path.basename(e.key)[:-4]]))
    # class names from ROOT/classnames.txt in the folders' order, else classnames=; the count must match
    sorted_names = sorted(bd.CLASSES, key=lambda c: c.replace(" ", "_"))
    given = datasets.open_benchmark(tmp_path / "folder", classnames=sorted_names, templates="openai_imagenet_7")
    assert given.classnames == tuple(sorted_names) and given.templates == tuple(templates.OPENAI_IMAGENET_7)
    with pytest.raises(InputError, match="classnames= gives 10 class names for the 7 class folders"):
        datasets.open_benchmark(tmp_path / "folder", classnames="cifar10")
    (tmp_path / "folder" / "classnames.txt").write_text("\n".join(sorted_names) + "\n")
    assert datasets.open_benchmark(tmp_path / "folder", classnames="cifar10").classnames == tuple(sorted_names)
    (tmp_path / "folder" / "classnames.txt").write_text("\n".join(sorted_names[:6]) + "\n")
    with pytest.raises(InputError, match="classnames.txt gives 6 class names for the 7 class folders"):
        datasets.open_benchmark(tmp_path / "folder")
    with pytest.raises(InputError, match=r"split folder .*folder/val not found \(splits there: test\)"):
        datasets.open_benchmark(tmp_path / "folder", "val")


def test_an_image_folder_without_split_folders_is_every_split(sets, tmp_path):
    write_folder(sets, tmp_path / "flat")
    for split in ("test", "val"):
        data = datasets.open_benchmark(tmp_path / "flat", split, templates=["itap of a {}."])
        assert data.size == 21 and data.split == split and data.templates == ("itap of a {}.",)
        assert [e.label for e in data.examples()] == sorted(e.label for e in data.examples())


def test_a_jsonl_is_retrieval_or_with_class_names_classification(sets, tmp_path):
    examples = list(datasets.open_benchmark(sets["classification"]).examples())[:5]
    rows = []
    for i, e in enumerate(examples):
        e.image.save(tmp_path / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": f"image {i}", "label": bd.CLASSES[e.label]}]
    rows.append({"image": "1.png", "caption": "image 1 again", "label": bd.CLASSES[examples[1].label]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = datasets.open_benchmark(tmp_path / "pairs.jsonl")
    assert (data.name, data.task, data.size, data.classnames) == ("pairs", "zeroshot_retrieval", 5, None)
    got = list(data.examples())
    assert [e.captions for e in got] == [("image 0",), ("image 1", "image 1 again"), ("image 2",), ("image 3",),
                                         ("image 4",)]
    assert [e.key for e in got] == [str(tmp_path / f"{i}.png") for i in range(5)]
    np.testing.assert_array_equal(pixels(got[3].image), pixels(examples[3].image))
    data = datasets.open_benchmark(tmp_path / "pairs.jsonl", classnames=list(bd.CLASSES))
    assert data.task == "zeroshot_classification" and data.templates == tuple(templates.OPENAI_IMAGENET)
    assert [e.label for e in data.examples()] == [e.label for e in examples]
    with pytest.raises(InputError, match="the label 'red temple' of .*0.png is not one of the 2 class names"):
        datasets.open_benchmark(tmp_path / "pairs.jsonl", classnames=["a", "b"])
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"image": "gone.png",
                                                                                          "caption": "x"}]))
    with pytest.raises(InputError, match=r"pairs.jsonl: rows skipped \(missing image: 1\)"):
        datasets.open_benchmark(tmp_path / "pairs.jsonl")


@pytest.fixture
def hub_cache(sets, tmp_path, monkeypatch):
    root = tmp_path / "hub-cache"
    repo = root / "datasets--clip-benchmark--wds_toy"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(sets["classification"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, value in (("HF_HUB_CACHE", str(root)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return str(snapshot)


def test_a_hub_id_is_read_from_the_cache_offline(sets, hub_cache, monkeypatch):
    for revision in (None, "main", COMMIT):
        data = datasets.open_benchmark("clip-benchmark/wds_toy", revision=revision)
        assert (data.name, data.root, data.size) == ("wds/toy", hub_cache, 21)
    local = datasets.open_benchmark(sets["classification"])
    assert [(e.key, e.label) for e in data.examples()] == [(e.key, e.label) for e in local.examples()]
    with pytest.raises(FileNotFoundError) as e:
        datasets.open_benchmark("clip-benchmark/wds_missing")
    message = str(e.value)
    assert "\n" not in message and "Hub dataset 'clip-benchmark/wds_missing'" in message
    assert "HF_HUB_OFFLINE is set: download it once with HF_HUB_OFFLINE=0" in message
    with pytest.raises(InputError, match="revision applies to hub dataset ids"):
        datasets.open_benchmark(sets["classification"], revision="main")
    calls = []

    def record(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return hub_cache

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    datasets.open_benchmark("clip-benchmark/wds_toy", "train")
    (repo_id, kwargs), = calls
    assert repo_id == "clip-benchmark/wds_toy" and kwargs["repo_type"] == "dataset"
    files = ["test/0.tar", "test/nshards.txt", "train/0.tar", "train/1.tar", "train/nshards.txt", "classnames.txt",
             "zeroshot_classification_templates.txt", "dataset_type.txt", "README.md", ".gitattributes",
             "val/nshards.txt", "train/extra.json"]
    kept = list(huggingface_hub.utils.filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
    assert kept == files[2:8]


def png(shade):
    return bd.encode(Image.new("RGB", (8, 8), (shade, 0, 0)), "png")


def make(root, samples, *, shards=1, classes=("a", "b", "c"), kind=None):
    bd.write_split(str(root), "test", samples, shards)
    if classes:
        (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    if kind:
        (root / "dataset_type.txt").write_text(kind + "\n")
    return root


def one_line(match, call, *args, **kwargs):
    with pytest.raises(InputError) as e:
        result = call(*args, **kwargs)
        list(result.examples())
    message = str(e.value)
    assert "\n" not in message and match in message, message
    return message


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    good = [(f"s{i}", {"png": png(i), "cls": str(i % 3).encode()}) for i in range(4)]
    open_ = datasets.open_benchmark
    root = make(tmp_path / "no_names", good, classes=None)
    message = one_line(str(root / "classnames.txt") + " not found", open_, root)
    assert "classnames=" in message and "imagenet1k" in message
    assert [e.label for e in open_(root, classnames=["x", "y", "z"]).examples()] == [0, 1, 2, 0]
    root = make(tmp_path / "outside", good[:2] + [("s9", {"png": png(9), "cls": b"3"})])
    one_line(f"tar {root / 'test' / '0.tar'}, sample s9: class 3 is outside the 3 class names", open_, root)
    root = make(tmp_path / "broken", good[:1] + [("s5", {"jpg": b"\xff\xd8 not a jpeg", "cls": b"1"})])
    one_line(f"tar {root / 'test' / '0.tar'}, sample s5: the image cannot be decoded", open_, root)
    root = make(tmp_path / "empty", [], shards=2)
    one_line(f"split {root / 'test'} is empty", open_, root)
    root = make(tmp_path / "nshards", good)
    os.remove(root / "test" / "nshards.txt")
    (root / "dataset_type.txt").write_text("classification\n")
    one_line(f"{root / 'test' / 'nshards.txt'} not found", open_, root)
    root = make(tmp_path / "missing_tar", good, shards=2)
    (root / "test" / "nshards.txt").write_text("3\n")
    one_line(f"tar {root / 'test' / '2.tar'} not found", open_, root)
    for cut in (1500, 800):  # in a header, in a member's data
        root = make(tmp_path / f"truncated{cut}", good)
        tar = root / "test" / "0.tar"
        tar.write_bytes(tar.read_bytes()[:cut])
        one_line(f"tar {tar} is damaged", open_, root)
    root = make(tmp_path / "two_images", [("s0", {"png": png(0), "jpg": png(0), "cls": b"0"})])
    one_line("sample s0: several images (png, jpg)", open_, root)
    root = make(tmp_path / "no_cls", [("s0", {"png": png(0), "txt": b"a caption"})])
    one_line("sample s0: no .cls member", open_, root)
    root = make(tmp_path / "multilabel", good, kind="multilabel")
    one_line(f"{root / 'dataset_type.txt'} says multilabel", open_, root)
    root = make(tmp_path / "blank_names", good, classes=("a", "", "c"))
    one_line(f"{root / 'classnames.txt'}: line 2 is empty", open_, root)
    (root / "classnames.txt").write_text("a\nb\nc\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {x} photo\n")
    one_line(f"{root / 'zeroshot_classification_templates.txt'}: line 2", open_, root)
    root = make(tmp_path / "ret", [("r0", {"png": png(0), "txt": b"one\n\nthree"})], classes=None, kind="retrieval")
    one_line(f"tar {root / 'test' / '0.tar'}, sample r0: an empty line among its captions", open_, root)
    one_line("split must be a folder name", open_, root, "../test")
    with pytest.raises(FileNotFoundError, match="dataset not found: /nowhere/at/all"):
        open_("/nowhere/at/all")


def test_the_built_in_names_are_clip_benchmarks():
    for name in ("en_classnames.json", "en_zeroshot_classification_templates.json"):
        with open(os.path.join(names.DATA, name), "rb") as ours, open(os.path.join(CLIP_BENCHMARK_DATA, name),
                                                                      "rb") as theirs:
            assert ours.read() == theirs.read(), name
    assert os.path.isfile(os.path.join(names.DATA, "LICENSE-CLIP_benchmark.txt"))
    assert {"imagenet1k", "cifar10", "cifar100", "mnist", "pets"} <= set(names.DATASETS)
    assert "cars" not in names.DATASETS and len(names.templates("cars")) > 1
    for dataset in names.DATASETS:
        assert len(names.classnames(dataset)) > 1
        prompts = templates.resolve(names.templates(dataset))
        assert all(templates.fill(t, "x") == t.format(c="x") for t in prompts), dataset
    assert len(names.classnames("cifar100")) == 100 and names.classnames("wds/cifar10")[0] == "airplane"
    assert names.IMAGENET_CLASSNAMES == tuple(names.classnames("imagenet1k")) and len(names.IMAGENET_CLASSNAMES) == 1000
    assert [t.replace("{c}", "{}") for t in names.templates("imagenet1k")] == list(templates.OPENAI_IMAGENET)
    with pytest.raises(InputError, match="no built-in classnames for dataset 'imagenet'; close: imagenet1k"):
        names.classnames("imagenet")
    with pytest.raises(InputError, match="has templates but no classnames"):
        names.classnames("cars")


def test_templates_take_either_placeholder():
    assert templates.resolve(["a {c}.", "{}!"]) == ["a {c}.", "{}!"]
    assert templates.fill("a photo of a {c}.", "cat {1}") == "a photo of a cat {1}."
    assert templates.fill("itap of a {}.", "dog") == "itap of a dog."
    for bad in ("{c} {}", "{c}{c}", "{x}", "no slot", "{}}"):
        with pytest.raises(InputError, match="exactly one '{}' or '{c}'"):
            templates.resolve([bad])
        with pytest.raises(InputError, match="exactly one '{}' or '{c}'"):
            templates.fill(bad, "x")
