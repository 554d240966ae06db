"""Embedding indexes: the streaming writer, the memory-mapped reader, exact and ANN search, merging shards, and
`dualenc embed --shard` / `merge` / `search` on a tiny model."""

import contextlib
import io
import json
import os
import re
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import cli, data, files
from dualenc.search import ann
from dualenc.search import index
from dualenc.search import store as index_file
from dualenc.errors import CheckpointError, InputError


def run(*args, check=True):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    if check:
        assert code == 0, err.getvalue()[-3000:]
    return code, out.getvalue(), err.getvalue()


def write(path, embeds, names, batch=256, **kw):
    with index.IndexWriter(path, embeds.shape[1], "image", **kw) as writer:
        for start in range(0, len(embeds), batch):
            writer.add(embeds[start:start + batch], names[start:start + batch])
    return index.open_index(path)


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random dual encoder saved as a model directory, and a folder of 13 images and 1 unreadable file."""
    root = tmp_path_factory.mktemp("index")
    data.write_vocab(root / "vocab", ["a photo of a red square", "a blue square"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(root / "vocab", max_length=8))
    size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**size, image_size=16, patch_size=8),
                                       dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                                          max_position_embeddings=8), projection_dim=8)
    import jax

    dualenc.save_pretrained(root / "model", config, dualenc.init(jax.random.key(0), config), processor=processor)
    rng = np.random.default_rng(0)
    for i in range(13):
        path = root / "photos" / f"{i % 3}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    (root / "photos" / "1" / "05b.png").write_bytes(b"not an image")
    return root


def test_writer_round_trip_and_safetensors_layout(tmp_path):
    x = unit_rows(1000, 16)
    names = [f"img/{i}.jpg" for i in range(999)] + ["caf\\xe9 \"quoted\"\nnewline.png"]
    ix = write(tmp_path / "a.safetensors", x, names, batch=77, metadata={"model": "m"})
    assert sorted(os.listdir(tmp_path)) == ["a.names.jsonl", "a.safetensors"]  # no temporary file left
    assert isinstance(ix.embeddings, np.memmap) and not ix.embeddings.flags.writeable
    np.testing.assert_array_equal(ix.embeddings, x)
    assert ix.names() == names and ix.names([999, 3]) == [names[999], "img/3.jpg"]
    assert (ix.count, ix.dims, ix.kind, ix.metadata["count"], ix.metadata["model"]) == (1000, 16, "image", "1000", "m")
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(tmp_path / "a.safetensors"))["embeddings"], x)  # the library reads it
    empty = write(tmp_path / "e.safetensors", x[:0], [])
    assert empty.embeddings.shape == (0, 16) and empty.names() == []
    assert index.search_exact(empty.embeddings, x[:2], 5)[1].shape == (2, 0)


def test_an_error_leaves_nothing_behind_and_the_old_index_as_it_was(tmp_path):
    x = unit_rows(10, 4)
    write(tmp_path / "a.safetensors", x, [str(i) for i in range(10)])
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    with pytest.raises(RuntimeError):
        with index.IndexWriter(tmp_path / "a.safetensors", 4, "image") as writer:
            writer.add(x[:5] * 2, list("abcde"))
            raise RuntimeError("stopped mid-way")
    with pytest.raises(InputError, match="2 names for 3"):
        with index.IndexWriter(tmp_path / "a.safetensors", 4, "image") as writer:
            writer.add(x[:3], ["a", "b"])
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_the_writer_holds_one_batch_at_a_time(tmp_path):
    """20,000 x 64 float32 rows (5 MB) written 256 at a time: the writer's peak allocation stays near a batch."""
    batch = unit_rows(256, 64)
    names = [f"{i:08d}.jpg" for i in range(256)]
    tracemalloc.start()
    try:
        with index.IndexWriter(tmp_path / "big.safetensors", 64, "image") as writer:
            for _ in range(20_000 // 256 + 1):
                writer.add(batch, names)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert writer.count == 20_224 and peak < 1 << 20, peak  # under 1 MiB against the 5.2 MB matrix


def test_exact_search_equals_a_full_stable_sort(monkeypatch):
    x = unit_rows(3000, 8)
    x[[100, 2000, 2999]] = x[7]  # ties, also across chunks
    queries = np.concatenate([x[[7, 3]], unit_rows(4, 8, seed=1)])
    monkeypatch.setattr(index_file, "_CHUNK_BYTES", 4096)  # 128-row chunks
    for k in (1, 3, 4, 10, 2999, 5000):
        scores, rows = index.search_exact(x, queries, k)
        full = queries @ x.T
        expected = np.argsort(-full, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-5, atol=1e-6)
    assert index.search_exact(x, queries, 4)[1][0].tolist() == [7, 100, 2000, 2999]
    with pytest.raises(InputError, match="k must be"):
        index.search_exact(x, queries, 0)


def test_ann_recall_and_search(tmp_path, monkeypatch):
    x = unit_rows(5000, 32)
    ix = write(tmp_path / "v.safetensors", x, [str(i) for i in range(5000)])
    info = ann.build(ix)
    assert info["recall_at_10"] >= 0.9 and info["count"] == 5000
    assert info["sample_queries"] == 500 and info["queries"] == "rows held out of the graph"  # a tenth of them
    assert json.loads((tmp_path / "v.faiss.json").read_text())["ef_search"] == info["ef_search"]
    queries = unit_rows(200, 32, seed=1)
    approx = index.search(ix, queries, 10, ann=True)
    exact = index.search(ix, queries, 10, ann=False)
    assert (approx.method, exact.method, approx.recall_at_10) == ("ann", "exact", info["recall_at_10"])
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.rows.tolist(), exact.rows.tolist())])
    assert overlap >= 0.9 and np.mean(approx.rows[:, 0] == exact.rows[:, 0]) >= 0.95
    assert (np.diff(approx.scores, axis=1) <= 0).all()
    assert index.search(ix, queries, 10).method == "exact"  # below ANN_MIN_ROWS
    monkeypatch.setattr(index, "ANN_MIN_ROWS", 5000)
    assert index.search(ix, queries, 10).method == "ann"
    monkeypatch.setattr(index, "ANN_MIN_RECALL", 1.01)  # a graph measured below it is passed over, saying why
    passed = index.search(ix, queries, 10)
    assert passed.method == "exact" and "recall@10" in passed.note
    assert index.search(ix, queries, 10, ann=True).method == "ann"
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"dualenc\[search\]"):
        index.search(ix, queries, 10)


def test_missing_corrupt_and_stale_files_are_errors_naming_them(tmp_path):
    x = unit_rows(300, 8)
    path = tmp_path / "a.safetensors"
    ix = write(path, x, [str(i) for i in range(300)])
    with pytest.raises(FileNotFoundError, match="index file not found: .*nothing.safetensors"):
        index.open_index(tmp_path / "nothing.safetensors")
    ann.build(ix)
    (tmp_path / "a.faiss").write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="a.faiss is not an ANN index as dualenc builds it"):
        index.search(ix, x[:1], 3, ann=True)
    ann.build(ix)
    info = json.loads((tmp_path / "a.faiss.json").read_text())
    (tmp_path / "a.faiss.json").write_text(json.dumps({**info, "embeddings_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="a.faiss was built for other rows than .*a.safetensors"):
        index.search(ix, x[:1], 3, ann=True)
    write(path, x[::-1].copy(), [str(i) for i in range(300)])  # new rows: the stale ANN index goes
    assert not (tmp_path / "a.faiss").exists() and not (tmp_path / "a.faiss.json").exists()
    with pytest.raises(FileNotFoundError, match="no ANN index beside .*a.safetensors"):
        index.search(index.open_index(path), x[:1], 3, ann=True)
    sidecar = tmp_path / "a.names.jsonl"
    lines = sidecar.read_text()
    sidecar.write_text(lines.replace('"7"', '"x"'))
    with pytest.raises(CheckpointError, match="a.names.jsonl is not the one written with it"):
        index.open_index(path)
    sidecar.write_text(lines + '"extra"\n')
    with pytest.raises(CheckpointError, match="a.names.jsonl holds 301 names for 300 embeddings"):
        index.open_index(path)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match="a.safetensors: its names file .*a.names.jsonl is missing"):
        index.open_index(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="a.safetensors"):
        index.open_index(path)


def test_embed_in_shards_merges_to_one_process_bit_for_bit(model, tmp_path):
    photos, m = model / "photos", model / "model"
    code, out, err = run("embed", "--model", m, "--images", photos, "--out", tmp_path / "all.safetensors",
                         "--batch-size", 4, "--json")
    whole = json.loads(out)
    assert whole["written"] == 13 and [s["image"] for s in whole["skipped"]] == [str(photos / "1" / "05b.png")]
    assert "skipped 1 unreadable image of 14" in err
    pattern = json.loads(run("embed", "--model", m, "--images", photos / "**" / "*.png", "--out",
                             tmp_path / "glob.safetensors", "--batch-size", 4, "--json")[1])
    assert pattern["skipped"] == whole["skipped"]  # a quoted glob names the same images as the folder
    assert index.open_index(tmp_path / "glob.safetensors").names() == index.open_index(
        tmp_path / "all.safetensors").names()
    code, _, err = run("embed", "--model", m, "--images", photos, "--out", tmp_path / "s.safetensors", "--strict",
                       check=False)
    assert code == 2 and "05b.png" in err and not (tmp_path / "s.safetensors").exists()
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}.safetensors")
        written = json.loads(run("embed", "--model", m, "--images", photos, "--out", parts[-1], "--batch-size", 4,
                                 "--shard", f"{i}/3", "--json")[1])
        assert written["shard"] == f"{i}/3"
    assert [index.open_index(p).metadata["shard_rows"] for p in parts] == ["0:4", "4:8", "8:14"]
    _, _, err = run("merge", *parts, "--out", tmp_path / "merged.safetensors", "--ann")
    assert "recall@10 against exact search" in err and "merged 3 indexes into" in err
    one, merged = index.open_index(tmp_path / "all.safetensors"), index.open_index(tmp_path / "merged.safetensors")
    assert merged.names() == one.names() and len(one.names()) == 13
    assert np.asarray(merged.embeddings).tobytes() == np.asarray(one.embeddings).tobytes()
    assert merged.metadata["embeddings_sha256"] == one.metadata["embeddings_sha256"]
    assert merged.metadata["model_sha256"] == one.metadata["model_sha256"]

    code, _, err = run("merge", parts[1], parts[0], parts[2], "--out", tmp_path / "x.safetensors", check=False)
    assert code == 2 and "shards must be given all and in order (0/3, 1/3, 2/3)" in err
    code, _, err = run("merge", *parts[:2], "--out", tmp_path / "x.safetensors", check=False)
    assert code == 2 and f"in order (0/3, 1/3, 2/3); got {parts[0]}: 0/3, {parts[1]}: 1/3" in err
    (tmp_path / "t.txt").write_text("a red square\na blue square\n")
    run("embed", "--model", m, "--texts", tmp_path / "t.txt", "--out", tmp_path / "t.safetensors")
    code, _, err = run("merge", tmp_path / "all.safetensors", tmp_path / "t.safetensors", "--out",
                       tmp_path / "x.safetensors", check=False)
    assert code == 2 and "disagree on their kind" in err and not (tmp_path / "x.safetensors").exists()

    found = json.loads(run("search", "--model", m, "--index", tmp_path / "merged.safetensors", "--json", "--top-k",
                           3, "--ann", "a red square")[1])
    exact = json.loads(run("search", "--model", m, "--index", tmp_path / "merged.safetensors", "--json", "--top-k",
                           3, "a red square")[1])
    assert found[0]["search"] == "ann" and 0 <= found[0]["ann_recall_at_10"] <= 1
    assert exact[0]["search"] == "exact" and "ann_recall_at_10" not in exact[0]
    assert [r["name"] for r in found[0]["results"]] == [r["name"] for r in exact[0]["results"]]  # 13 rows: all seen


def test_jax_distributed_processes_write_numbered_parts(model, tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    written = json.loads(run("embed", "--model", model / "model", "--images", model / "photos", "--batch-size", 4,
                             "--out", tmp_path / "p.safetensors", "--json")[1])
    assert written["out"] == str(tmp_path / "p-00001-of-00002.safetensors") and written["shard"] == "1/2"
    assert index.open_index(written["out"]).metadata["shard_rows"] == "8:14"
    code, _, err = run("embed", "--model", model / "model", "--images", model / "photos", "--out",
                       tmp_path / "q.safetensors", "--ann", check=False)
    assert code == 2 and "not a shard" in err


def test_embed_reads_webdataset_tars_and_prepared_records(model, tmp_path):
    import tarfile

    from dualenc.data import prepare

    m, files = model / "model", sorted((model / "photos").rglob("*.png"))
    good = [f for f in files if f.name != "05b.png"]

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    tars = [tmp_path / f"shard-{i:05d}.tar" for i in range(3)]
    keys = []
    for t, chunk in zip(tars, (good[:5], good[5:9], good[9:])):
        with tarfile.open(t, "w") as tar:
            for f in chunk:
                key = f"{f.parent.name}{f.stem}"
                keys.append(key)
                add(tar, f"{key}.png", f.read_bytes())
                if key != keys[0]:  # the first sample has no caption: embed keeps it, prepare does not
                    add(tar, f"{key}.txt", b"a red square")
            if t == tars[1]:
                add(tar, "bad.png", b"not an image")
                add(tar, "bad.txt", b"a blue square")
                add(tar, "textonly.txt", b"no image here")

    def embed(out, *inputs, extra=()):
        code, text, err = run("embed", "--model", m, "--images", *inputs, "--out", out, "--batch-size", 4, "--json",
                              *extra)
        return json.loads(text), err, index.open_index(out)

    reference = embed(tmp_path / "files.safetensors", *good)[2]
    result, err, whole = embed(tmp_path / "tars.safetensors", str(tmp_path / "shard-{00000..00002}.tar"))
    assert whole.names() == keys and result["written"] == len(good) == 13
    assert result["skipped"] == [{"image": "bad", "error": result["skipped"][0]["error"]}]
    assert result["left_out"] == [{"image": str(tars[1]), "error": "samples skipped: no image 1"}]
    np.testing.assert_allclose(whole.embeddings, reference.embeddings, atol=1e-6)
    parts = [tmp_path / f"t{i}.safetensors" for i in range(2)]
    for i, part in enumerate(parts):
        assert embed(part, *tars, extra=("--shard", f"{i}/2"))[2].metadata["shard_tars"] == ["0:1", "1:3"][i]
    run("merge", *parts, "--out", tmp_path / "tm.safetensors")
    merged = index.open_index(tmp_path / "tm.safetensors")
    assert merged.names() == keys
    np.testing.assert_allclose(merged.embeddings, whole.embeddings, atol=1e-6)
    code, _, err = run("embed", "--model", m, "--images", *tars, "--out", tmp_path / "s.safetensors", "--strict",
                       check=False)
    assert code == 2 and "shard-00001.tar" in err and not (tmp_path / "s.safetensors").exists()

    prepare(tars, tmp_path / "prepared")
    result, _, records = embed(tmp_path / "records.safetensors", tmp_path / "prepared")
    assert records.names() == keys[1:] and [s["image"] for s in result["skipped"]] == ["bad"]
    np.testing.assert_allclose(records.embeddings, reference.embeddings[1:], atol=1e-6)
    parts = [tmp_path / f"r{i}.safetensors" for i in range(2)]
    for i, part in enumerate(parts):
        embed(part, tmp_path / "prepared", extra=("--shard", f"{i}/2"))
    run("merge", *parts, "--out", tmp_path / "rm.safetensors")
    merged = index.open_index(tmp_path / "rm.safetensors")
    assert merged.names() == records.names()
    assert np.asarray(merged.embeddings).tobytes() == np.asarray(records.embeddings).tobytes()
    for inputs in ([tmp_path / "prepared", tmp_path / "prepared"], [tars[0], good[0]]):
        code, _, err = run("embed", "--model", m, "--images", *inputs, "--out", tmp_path / "x.safetensors",
                           check=False)
        assert code == 2 and "--images takes" in err and not (tmp_path / "x.safetensors").exists(), err


def test_arguments_and_optional_modules_are_checked_before_any_work(tmp_path, monkeypatch):
    """Each command checks its arguments and imports the optional module it will need before loading a model or
    reading an input: the error is one line (naming the argument, or the extra to install) and nothing is
    written. --model /nowhere shows it: its error would come first otherwise."""
    x = unit_rows(300, 8)
    part = tmp_path / "a.safetensors"
    write(part, x, [str(i) for i in range(300)])
    ann.build(part)
    code, _, err = run("merge", part, "--out", tmp_path / "one.safetensors")
    assert "merged 1 index into" in err and "300 image embeddings" in err
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    image, pairs = tmp_path / "x.png", tmp_path / "pairs.jsonl"
    Image.new("RGB", (4, 4)).save(image)
    pairs.write_text(json.dumps({"image": "x.png", "caption": "a square"}) + "\n")
    for name in ("faiss", "array_record.python.array_record_module", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setattr(index, "ANN_MIN_ROWS", 100)  # search would use the ANN index beside a.safetensors
    nowhere = ("--model", tmp_path / "nowhere")
    for args, message in [
        (("merge", part, "--out", tmp_path / "m.safetensors", "--ann"),
         "--ann needs faiss: pip install 'dualenc\\[search\\]'"),
        (("embed", *nowhere, "--texts", pairs, "--out", tmp_path / "e.safetensors", "--ann"),
         "--ann needs faiss"),
        (("search", *nowhere, "--index", part, "q"), "beside .*a.safetensors needs faiss: .*, or pass --exact"),
        (("prepare", pairs, "--out", tmp_path / "p"), "`dualenc prepare` needs array_record: .*'dualenc\\[data\\]'"),
        (("embed", *nowhere, "--images", tmp_path / "prepared", "--out", tmp_path / "e.safetensors"),
         "dualenc\\[data\\]"),
        (("eval", *nowhere, "--data", pairs, "--out", tmp_path / "r"), "eval.png needs matplotlib: .*--no-figure"),
        (("zero-shot", *nowhere, "--labels", "a,b", "--top-k", 0, image), "--top-k must be at least 1, got 0"),
        (("zero-shot", *nowhere, "--labels", "a,b", "--batch-size", -1, image), "--batch-size must be at least 1"),
        (("zero-shot", *nowhere, "--labels", "a,b", "--templates", "nonesuch", image), "openai_imagenet_7"),
        (("zero-shot", *nowhere, "--labels", "a,b", tmp_path / "*.jpg"), "pattern '.*\\*.jpg' matches no file"),
        (("search", *nowhere, "--index", part, "--top-k", 0, "--exact", "q"), "--top-k must be at least 1"),
        (("search", *nowhere, "--index", part, "--exact", "--image", tmp_path / "{x,y}.png"),
         "image not found: .*y.png"),
        (("eval", *nowhere, "--data", pairs, "--no-figure", "--batch-size", 0), "--batch-size must be at least 1"),
    ]:
        code, out, err = run(*args, check=False)
        assert code == 2 and not out and len(err.strip().splitlines()) == 1, (args, err)
        assert re.search(message, err) and "nowhere" not in err, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["a.faiss", "a.faiss.json", "a.names.jsonl", "a.safetensors",
                                            "one.names.jsonl", "one.safetensors", "pairs.jsonl", "prepared", "x.png"]
    code, _, err = run("search", *nowhere, "--index", part, "--exact", "q", check=False)
    assert code == 2 and "model directory not found" in err  # --exact needs no faiss


def test_search_refuses_an_index_another_model_embedded(model, tmp_path):
    """The index's model_sha256 (as embed writes it) must be --model's: another model of the same width is refused
    naming both and the file, unless --any-model; index.check_model is the Python check."""
    import jax

    config, params = dualenc.load_pretrained(model / "model")
    other = tmp_path / "other"
    dualenc.save_pretrained(other, config, dualenc.init(jax.random.key(1), config),
                            processor=dualenc.Processor.from_pretrained(model / "model"))
    path = tmp_path / "i.safetensors"
    photos = sorted(str(p) for p in (model / "photos" / "0").glob("*.png"))
    ix = write(path, unit_rows(len(photos), 8), photos,
               metadata={"model": "the first", "model_sha256": index.model_fingerprint(params)})
    code, out, err = run("search", "--model", other, "--index", path, "a red square", check=False)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert all(part in err for part in (str(path), "the first", f"--model {other}", "--any-model")), err
    found = json.loads(run("search", "--model", other, "--index", path, "--any-model", "--json", "--image",
                           model / "photos" / "0" / "*.png")[1])
    assert [f["query"] for f in found] == photos  # one result list per image the pattern names
    _, _, err = run("search", "--model", model / "model", "--index", path, "a zebra")
    assert "1 query holds words the tokenizer does not know" in err and "fingerprint" not in err
    assert index.check_model(ix, params) is True
    with pytest.raises(InputError, match="i.safetensors was embedded by another model"):
        index.check_model(ix, dualenc.load_pretrained(other)[1])
    unmarked = write(tmp_path / "u.safetensors", unit_rows(3, 8), list("abc"))
    assert index.check_model(unmarked, params) is False
    _, _, err = run("search", "--model", other, "--index", unmarked.path, "a red square")
    assert "records no model fingerprint" in err


def test_embed_says_when_it_compiles_creates_its_folder_and_fails_on_no_readable_image(model, tmp_path,
                                                                                      monkeypatch):
    """CompileNotice (delay 0: every compile) names the tower and batch; --out's folders are created; with no
    readable image, embed and eval exit 1 and write nothing."""
    from dualenc.cli import support as common

    monkeypatch.setattr(common, "COMPILE_NOTICE_DELAY", 0)  # every compile says so, however short
    # 11 texts in a batch of 12: a shape no other test compiles (the session's compilation cache would skip it)
    (tmp_path / "t.txt").write_text("".join(f"a photo number {i}\n" for i in range(11)))
    out = tmp_path / "new" / "deeper" / "t.safetensors"
    _, _, err = run("embed", "--model", model / "model", "--texts", tmp_path / "t.txt", "--out", out, "--batch-size", 12)
    assert index.open_index(out).count == 11  # its folders were created
    lines = err.splitlines()
    said = lines.index("dualenc embed: compiling the text tower for batch 12... (once per shape; the compilation "
                       "cache keeps it for the next run)")
    assert re.fullmatch(r"dualenc embed: compiled in \d+\.\d s", lines[said + 1]), err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    code, _, err = run("embed", "--model", model / "model", "--images", tmp_path / "bad", "--out",
                       tmp_path / "b.safetensors", check=False)
    assert code == 1 and "x.png" in err and err.strip().splitlines()[-1].startswith("dualenc embed: error: no image")
    assert not (tmp_path / "b.safetensors").exists()
    (tmp_path / "bad" / "pairs.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a red square"}) + "\n")
    code, out, err = run("eval", "--model", model / "model", "--data", tmp_path / "bad" / "pairs.jsonl", "--out",
                         tmp_path / "report", "--no-figure", check=False)
    assert code == 1 and not out and "dualenc eval: error: no image of" in err and not (tmp_path / "report").exists()


def test_prepare_shows_one_progress_not_a_line_per_shard(tmp_path):
    import tarfile

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    for i in range(30):
        with tarfile.open(tmp_path / f"s-{i:02d}.tar", "w") as tar:
            for name, blob in (("k.png", png.getvalue()), ("k.txt", b"a square")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    _, _, err = run("prepare", tmp_path / "s-*.tar", "--out", tmp_path / "plain")
    lines = err.strip().splitlines()
    assert 2 <= len(lines) <= 11 and "100% of the input bytes: 30 shards, 30 records" in lines[-2], err
    assert lines[-1].startswith("dualenc prepare: 30 records in 30 shards in")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with contextlib.redirect_stderr(terminal):
        assert cli.main(["prepare", str(tmp_path / "s-*.tar"), "--out", str(tmp_path / "bar")]) == 0
    shown = terminal.getvalue()
    assert "preparing" in shown and "\r" in shown and "30 shards" in shown  # one tqdm bar, redrawn in place
    assert len(shown.strip().split("\n")) == 2 and "% of the input bytes" not in shown, shown


def test_search_and_merge_refuse_changed_rows_and_shards_of_other_inputs(model, tmp_path):
    """A row overwritten after embed is an error naming the file, and no result is printed; merge writes nothing
    over it. Shards embedded from other inputs of the same count were merged; each shard records the fingerprint
    of its whole input list (shard_inputs_sha256) and merge compares them."""
    m = model / "model"
    (tmp_path / "t.txt").write_text("a red square\na blue square\na photo\nred\n")
    (tmp_path / "u.txt").write_text("a red square\na blue square\nsquare\nblue\n")
    run("embed", "--model", m, "--texts", tmp_path / "t.txt", "--out", tmp_path / "t.safetensors")
    path = tmp_path / "t.safetensors"
    data = bytearray(path.read_bytes())
    at = 8 + int.from_bytes(data[:8], "little") + 4 * 8 * 2
    data[at:at + 4] = b"\0\0\x80\x7f"  # row 2's first value: +inf, so that it ranks first
    path.write_bytes(bytes(data))
    code, out, err = run("search", "--model", m, "--index", path, "a photo", check=False)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert f"{path}: its rows do not hash to the embeddings_sha256" in err
    code, _, err = run("merge", path, "--out", tmp_path / "m.safetensors", check=False)
    assert code == 2 and "t.safetensors: its rows do not hash" in err and not (tmp_path / "m.safetensors").exists()
    parts = [tmp_path / f"{name}{i}.safetensors" for i, name in enumerate("tu")]
    for i, (texts, part) in enumerate(zip(("t.txt", "u.txt"), parts)):
        run("embed", "--model", m, "--texts", tmp_path / texts, "--out", part, "--shard", f"{i}/2", "--batch-size", 2)
    assert len({index.open_index(p).metadata["shard_inputs_sha256"] for p in parts}) == 2
    code, _, err = run("merge", *parts, "--out", tmp_path / "m.safetensors", check=False)
    assert code == 2 and "the shards were cut from different inputs" in err and str(parts[1]) in err, err
    run("embed", "--model", m, "--texts", tmp_path / "t.txt", "--out", parts[1], "--shard", "1/2", "--batch-size", 2)
    assert index.merge(parts, tmp_path / "m.safetensors").count == 4


def test_search_prints_names_that_are_not_utf8_escaped(model, tmp_path):
    """Tar members' non-UTF-8 names (held as surrogate escapes) broke search's output on a UTF-8 stdout."""
    fingerprint = index.model_fingerprint(dualenc.load_pretrained(model / "model")[1])
    names = ["caf\udce9.png", "plain.png"]
    write(tmp_path / "i.safetensors", unit_rows(2, 8), names, metadata={"model_sha256": fingerprint})
    for extra in ((), ("--json",)):
        raw, err = io.BytesIO(), io.StringIO()
        stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
            code = cli.main(["search", "--model", str(model / "model"), "--index", str(tmp_path / "i.safetensors"),
                             "a red square", *extra])
        stdout.flush()
        assert code == 0, err.getvalue()
        assert "caf\\xe9.png" in raw.getvalue().decode("utf-8").replace("\\\\", "\\")
    legacy = tmp_path / "old.safetensors"  # names in the header and no checksums, as written before them
    files.write_safetensors(str(legacy), {"embeddings": unit_rows(2, 8)}, {"names": json.dumps(names)})
    _, out, err = run("search", "--model", model / "model", "--index", legacy, "a red square", "--any-model")
    assert "records no checksum of its rows (embeddings_sha256): they are not checked" in err and "\\xe9" in out
