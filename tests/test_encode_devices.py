"""Batched encoding over this process's devices (conftest's 4 CPU devices): a batch split over a "data" mesh equals
one device's, compiles once per tower, and rounds its size up to the devices; `--precision bfloat16` for embed,
zero-shot and eval, recorded in what they write."""

import contextlib
import io
import json

import jax
import jax.monitoring
import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import cli, data, encode, templates
from dualenc.search import index

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEXTS = [f"a photo of the {c} square" for c in COLOURS] * 3 + ["a red square"]  # 10: a last batch of 2 rows


def run(*args, check=True):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    if check:
        assert code == 0, err.getvalue()[-3000:]
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random dual encoder saved with its processor, 10 coloured 16x16 images, their pairs and labels."""
    root = tmp_path_factory.mktemp("devices")
    data.write_vocab(root / "vocab", TEXTS + [t.format(c) for t in templates.DEFAULT for c in COLOURS])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(root / "vocab", max_length=16))
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**size, image_size=16, patch_size=8),
                                       dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                                          max_position_embeddings=16), projection_dim=12)
    dualenc.save_pretrained(root / "model", config, dualenc.init(jax.random.key(3), config), processor=processor)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.asarray(COLOURS[name]) + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a photo of the {name} square", "label": name})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "labels.txt").write_text("\n".join(COLOURS) + "\n")
    return root


@contextlib.contextmanager
def watch(monkeypatch):
    """Counts the encoders' compiles by function name, and the placements of params (replicated) and of batches
    (split over "data") with the size of their mesh."""
    seen = {"compiles": [], "params": [], "batches": []}

    def listener(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen["compiles"].append(fun_name)

    put = jax.device_put

    def counting_put(x, device=None, *args, **kwargs):
        spec = getattr(device, "spec", None)
        if spec is not None:
            seen["batches" if tuple(spec) == ("data",) else "params"].append(device.mesh.size)
        return put(x, device, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting_put)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        monkeypatch.setattr(jax, "device_put", put)


def test_a_batch_split_over_four_devices_equals_one_device_and_compiles_once(saved, monkeypatch):
    assert jax.local_device_count() == 4
    config, params = dualenc.load_pretrained(saved / "model")
    processor = dualenc.Processor.from_pretrained(saved / "model")
    images = [str(saved / f"{i}.png") for i in range(10)]
    with watch(monkeypatch) as seen:  # 10 images in batches of 4: three batches, the last one padded
        four = dualenc.encode_images(params, config, processor, images, batch_size=4)
    assert seen["compiles"] == ["jit(image_embeds)"]  # one program for the three batches
    assert seen["params"] == [4] and seen["batches"] == [4, 4, 4]  # params placed once, every batch split
    with watch(monkeypatch) as seen:
        again = dualenc.encode_images(params, config, processor, iter(images), batch_size=4)
    assert seen["compiles"] == [] and np.array_equal(again, four)  # the compiled program is reused across calls
    one = dualenc.encode_images(params, config, processor, images, batch_size=4, devices=jax.local_devices()[:1])
    assert four.shape == (10, 12) and four.dtype == np.float32
    np.testing.assert_allclose(four, one, rtol=0, atol=1e-6)

    with watch(monkeypatch) as seen:
        texts4 = dualenc.encode_texts(params, config, processor, TEXTS, batch_size=4)
    assert seen["compiles"] == ["jit(text_embeds)"] and seen["batches"] == [4, 4, 4]
    texts1 = dualenc.encode_texts(params, config, processor, TEXTS, batch_size=4, devices=jax.local_devices()[:1])
    np.testing.assert_allclose(texts4, texts1, rtol=0, atol=1e-6)
    placed = encode.replicate(params)
    assert encode.replicate(placed)["logit_scale"] is placed["logit_scale"]  # placed params are not copied again
    with pytest.raises(dualenc.InputError, match="devices is empty"):
        dualenc.encode_texts(params, config, processor, TEXTS, devices=[])


def test_batch_sizes_round_up_to_the_devices_and_shards_still_merge(saved, tmp_path):
    assert encode.batch_rows(None, 6) == 8 and encode.batch_rows(40, 32) == 32 and encode.batch_rows(5, 32) == 8
    assert encode.batch_rows(1, 32) == 4 and encode.batch_rows(1, 32, devices=1) == 1
    assert encode.device_rows(6, devices=3) == 6 and encode.device_rows(7, devices=3) == 9
    m, images = saved / "model", [saved / f"{i}.png" for i in range(10)]
    _, _, err = run("embed", "--model", m, "--images", *images, "--out", tmp_path / "all.safetensors",
                    "--batch-size", 8)
    assert "rounded" not in err
    parts = [tmp_path / f"p{i}.safetensors" for i in range(2)]
    for i, part in enumerate(parts):
        _, _, err = run("embed", "--model", m, "--images", *images, "--out", part, "--batch-size", 6,
                        "--shard", f"{i}/2")
        assert "dualenc embed: --batch-size 6 rounded up to 8, a multiple of the 4 devices" in err
    assert [index.open_index(p).metadata["shard_rows"] for p in parts] == ["0:8", "8:10"]  # cut between batches of 8
    merged = index.merge(parts, tmp_path / "merged.safetensors")
    whole = index.open_index(tmp_path / "all.safetensors")
    assert np.asarray(merged.embeddings).tobytes() == np.asarray(whole.embeddings).tobytes()
    assert merged.metadata["precision"] == "float32"
    code, _, err = run("embed", "--model", m, "--images", *images, "--out", tmp_path / "x.safetensors",
                       "--batch-size", 0, check=False)
    assert code == 2 and "--batch-size must be at least 1, got 0" in err


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_bfloat16_is_close_to_float32_and_recorded(saved, tmp_path):
    m, images = saved / "model", [saved / f"{i}.png" for i in range(10)]
    paths = {}
    for precision in ("float32", "bfloat16"):
        paths[precision] = tmp_path / f"{precision}.safetensors"
        run("embed", "--model", m, "--images", *images, "--out", paths[precision], "--precision", precision)
    full, half = (index.open_index(paths[p]) for p in ("float32", "bfloat16"))
    assert full.metadata["precision"] == "float32" and half.metadata["precision"] == "bfloat16"
    full_rows, half_rows = np.asarray(full.embeddings), np.asarray(half.embeddings)
    assert half_rows.dtype == np.float32 and np.allclose(np.linalg.norm(half_rows, axis=1), 1, atol=1e-5)
    assert cosines(full_rows, half_rows).min() > 0.99 and not np.array_equal(full_rows, half_rows)
    code, _, err = run("merge", paths["float32"], paths["bfloat16"], "--out", tmp_path / "m.safetensors", check=False)
    assert code == 2 and "disagree on their precision" in err
    _, out, err = run("search", "--model", m, "--index", paths["bfloat16"], "--json", "a red square")
    assert "the queries are encoded in bfloat16" in err and json.loads(out)[0]["results"]

    shots = {}
    (tmp_path / "template.txt").write_text("a photo of the {} square\n")
    for precision in ("float32", "bfloat16"):
        shots[precision] = json.loads(run("zero-shot", "--model", m, "--labels-file", saved / "labels.txt", "--json",
                                          "--templates", tmp_path / "template.txt", "--precision", precision,
                                          *images)[1])
        assert shots[precision]["precision"] == precision
    probs = {p: [dict(zip(r["labels"], r["probabilities"])) for r in shots[p]["results"]] for p in shots}
    table = {p: np.asarray([[row[c] for c in COLOURS] for row in probs[p]]) for p in probs}
    assert cosines(table["float32"], table["bfloat16"]).min() > 0.99

    for precision in ("float32", "bfloat16"):
        report = tmp_path / f"eval-{precision}"
        figures = json.loads(run("eval", "--model", m, "--data", saved / "pairs.jsonl", "--out", report,
                                 "--no-figure", "--json", "--precision", precision)[1])
        assert figures["precision"] == precision and figures["images"] == 10
        assert json.loads((report / "metrics.json").read_text())["precision"] == precision
