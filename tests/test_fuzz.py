"""Fuzzing (hypothesis, bounded): malformed checkpoints, configs, tokenizer and preprocessor files, images and
caption files all end in dualenc's documented errors naming the file or argument; never a crash or a hang."""

import collections
import io
import json
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import dualenc
from dualenc import data

TRIED = collections.Counter()
# 150 derandomized inputs per fuzzer. A campaign (python -m benchmarks.fuzz) sets DUALENC_FUZZ_EXAMPLES and
# DUALENC_FUZZ_RANDOM=1: random inputs, seeded by pytest's --hypothesis-seed; no example database either way.
_RANDOM = bool(int(os.environ.get("DUALENC_FUZZ_RANDOM") or 0))
FUZZ = settings(max_examples=int(os.environ.get("DUALENC_FUZZ_EXAMPLES") or 150), deadline=None,
                derandomize=not _RANDOM, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DOCUMENTED = (dualenc.DualEncError, FileNotFoundError)


def expect_documented(fn, name_in_message=None):
    """Runs fn; it may succeed, or raise a documented error whose message names the file or argument."""
    try:
        fn()
    except DOCUMENTED as e:
        if name_in_message is not None:
            assert name_in_message in str(e), str(e)
        return e
    return None


# ------------------------------------------------------------------------------------------------ safetensors

CONFIG = dualenc.DualEncoderConfig(vision=dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                   text=dualenc.BertConfig(**TINY, vocab_size=40, max_position_embeddings=16),
                                   projection_dim=8)


class Checkpoint(tuple):
    """(directory, bytes of its model.safetensors), with a short repr for hypothesis' reports."""

    def __repr__(self):
        return f"Checkpoint({self[0]!r}, <{len(self[1])} bytes>)"


@pytest.fixture(scope="module")
def checkpoint():
    import jax

    path = tempfile.mkdtemp(prefix="dualenc-fuzz-")
    dualenc.save_pretrained(path, CONFIG, dualenc.init(jax.random.key(0), CONFIG))
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        blob = f.read()
    yield Checkpoint((path, blob))
    shutil.rmtree(path, ignore_errors=True)


def header_of(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def with_header(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def load_mutated(checkpoint, tmp_path, blob):
    path, _ = checkpoint
    target = tmp_path / "ckpt"
    if not target.exists():
        shutil.copytree(path, target)
    (target / "model.safetensors").write_bytes(blob)
    return expect_documented(lambda: dualenc.load_pretrained(target), "model.safetensors")


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_safetensors(checkpoint, tmp_path, cut):
    TRIED["safetensors truncated"] += 1
    blob = checkpoint[1]
    assert load_mutated(checkpoint, tmp_path, blob[:int(cut * len(blob))]) is not None


@FUZZ
@given(delta=st.integers(-10_000, 10_000).filter(bool) | st.sampled_from([2 ** 63, 2 ** 64 - 1, 2 ** 40]))
def test_wrong_header_length(checkpoint, tmp_path, delta):
    TRIED["safetensors header length"] += 1
    blob = checkpoint[1]
    (n,) = struct.unpack("<Q", blob[:8])
    fake = max(0, min(2 ** 64 - 1, n + delta if abs(delta) < 2 ** 40 else delta))
    assert load_mutated(checkpoint, tmp_path, struct.pack("<Q", fake) + blob[8:]) is not None


@FUZZ
@given(noise=st.binary(min_size=1, max_size=64), where=st.floats(0, 1))
def test_broken_header_json(checkpoint, tmp_path, noise, where):
    TRIED["safetensors header bytes"] += 1
    blob = checkpoint[1]
    (n,) = struct.unpack("<Q", blob[:8])
    at = 8 + int(where * (n - 1))
    load_mutated(checkpoint, tmp_path, blob[:at] + noise + blob[at + len(noise):])


@FUZZ
@given(data=st.data())
def test_mutated_tensor_entries(checkpoint, tmp_path, data):
    TRIED["safetensors entries"] += 1
    header, body = header_of(checkpoint[1])
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    entry = dict(header[name])
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "missing", "extra", "reshape"]))
    if kind == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F128", "f32", "", "I4", "U8", "BOOL", "BF16"]))
    elif kind == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(-3, 1 << 41), max_size=4))
    elif kind == "offsets":
        entry["data_offsets"] = data.draw(st.lists(st.integers(-5, len(body) * 2), min_size=0, max_size=3))
    elif kind == "overlap":
        other = header[data.draw(st.sampled_from([n for n in names if n != name]))]
        entry["data_offsets"] = other["data_offsets"]
    elif kind == "missing":
        header.pop(name)
    elif kind == "extra":
        header["text_model.extra.weight"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif kind == "reshape":  # same byte count, another shape: named like ours, wrong shape
        size = int(np.prod(entry["shape"]))
        entry["shape"] = [size] if len(entry["shape"]) != 1 else [1, size]
    if kind not in ("missing", "extra"):
        header[name] = entry
    error = load_mutated(checkpoint, tmp_path, with_header(header, body))
    if kind in ("missing", "extra", "reshape", "overlap") and error is None:
        pytest.fail(f"{kind} mutation of {name} loaded without error")


# ------------------------------------------------------------------------------------------------ config.json

SIZE_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "image_size", "patch_size", "projection_dim", "type_vocab_size"]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                           st.integers(), max_size=2))


@FUZZ
@given(tower=st.sampled_from(["vision_config", "text_config", None]), field=st.sampled_from(SIZE_FIELDS + [
    "hidden_act", "layer_norm_eps", "model_type", "hidden_dropout_prob", "pad_token_id", "qkv_bias"]),
       value=JUNK, drop=st.booleans())
def test_fuzzed_config_json(tmp_path, tower, field, value, drop):
    TRIED["config.json"] += 1
    d = CONFIG.to_dict()
    target = d if tower is None else d[tower]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_documented(lambda: dualenc.load_config(tmp_path), "config.json")


@pytest.mark.parametrize("sizes", [dict(hidden_size=1 << 16, intermediate_size=1 << 18, num_hidden_layers=1024),
                                   dict(vocab_size=1 << 23, hidden_size=1 << 16),
                                   dict(max_position_embeddings=1 << 20, hidden_size=1 << 16)])
def test_huge_sizes_refused_before_allocating(tmp_path, sizes):
    import resource

    d = CONFIG.to_dict()
    d["text_config"].update(sizes, num_attention_heads=16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(dualenc.ConfigError, match="config.json"):
        dualenc.load_config(tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing big allocated


CLIP_CONFIG = dualenc.DualEncoderConfig(
    vision=dualenc.CLIPVisionConfig(**TINY, image_size=16, patch_size=8),
    text=dualenc.CLIPTextConfig(**TINY, vocab_size=40, max_position_embeddings=16, eos_token_id=2),
    projection_dim=8, model_type="clip")
CLIP_FIELDS = SIZE_FIELDS + ["hidden_act", "layer_norm_eps", "model_type", "eos_token_id", "bos_token_id",
                             "pad_token_id", "attention_dropout", "initializer_factor", "head_dim"]


@FUZZ
@given(where=st.sampled_from(["vision_config", "text_config", "text_config_dict", "vision_config_dict", None]),
       field=st.sampled_from(CLIP_FIELDS), value=JUNK, drop=st.booleans())
def test_fuzzed_clip_config_json(tmp_path, where, field, value, drop):
    TRIED["CLIP config.json"] += 1
    d = CLIP_CONFIG.to_dict()
    if where is not None and where.endswith("_dict"):
        d[where] = dict(d[where.removesuffix("_dict")])
    target = d if where is None else d[where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_documented(lambda: dualenc.load_config(tmp_path), "config.json")


OPEN_CLIP_CFG = {"embed_dim": 8, "quick_gelu": True,
                 "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 40, "width": 32, "heads": 4, "layers": 2}}
OPEN_CLIP_FIELDS = ["image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "context_length",
                    "vocab_size", "heads", "pool_type", "eos_id", "ls_init_value", "norm_kwargs", "act_kwargs",
                    "timm_model_name", "hf_tokenizer_name", "tokenizer_kwargs", "embed_dim", "quick_gelu",
                    "init_logit_bias", "mean", "std", "interpolation", "resize_mode", "fill_color"]


@FUZZ
@given(where=st.sampled_from(["model_cfg", "vision_cfg", "text_cfg", "preprocess_cfg"]),
       field=st.sampled_from(OPEN_CLIP_FIELDS), value=JUNK, drop=st.booleans())
def test_fuzzed_open_clip_config(tmp_path, where, field, value, drop):
    """open_clip_config.json as the model, the tokenizer and the image processor read it."""
    TRIED["open_clip_config.json"] += 1
    d = {"model_cfg": json.loads(json.dumps(OPEN_CLIP_CFG)), "preprocess_cfg": {}}
    target = d[where] if where in d else d["model_cfg"][where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "open_clip_config.json").write_text(json.dumps(d))
    (tmp_path / "vocab.json").write_text(json.dumps({"a</w>": 0, "b</w>": 1, "a": 2, "b": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    for load in (dualenc.load_pretrained, dualenc.ImageProcessor.from_pretrained, dualenc.Tokenizer.from_pretrained):
        expect_documented(lambda: load(tmp_path), str(tmp_path))


@pytest.fixture(scope="module")
def open_clip_blob():
    import open_clip
    from safetensors.torch import save_file

    cfg = OPEN_CLIP_CFG
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    path = tempfile.mkdtemp(prefix="dualenc-fuzz-oc-")
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f)
    weights = os.path.join(path, "open_clip_model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    dualenc.load_pretrained(path)  # the unmutated file loads
    with open(weights, "rb") as f:
        blob = f.read()
    yield Checkpoint((path, blob))
    shutil.rmtree(path, ignore_errors=True)


@FUZZ
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 1 << 20))
def test_mutated_open_clip_weights(open_clip_blob, tmp_path, cut, flip):
    TRIED["open_clip safetensors"] += 1
    path, blob = open_clip_blob
    target = tmp_path / "oc"
    if not target.exists():
        shutil.copytree(path, target)
    data_ = bytearray(blob[:max(1, int(cut * len(blob)))])
    data_[flip % len(data_)] ^= 0xFF
    (target / "open_clip_model.safetensors").write_bytes(bytes(data_))
    expect_documented(lambda: dualenc.load_pretrained(target), "open_clip_model.safetensors")


# ------------------------------------------------------------------------------------------------ processors

@FUZZ
@given(field=st.sampled_from(["size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor",
                              "do_resize", "do_convert_rgb", "image_processor_type", "do_center_crop"]),
       value=JUNK)
def test_fuzzed_preprocessor_config(tmp_path, field, value):
    TRIED["preprocessor_config.json"] += 1
    d = dualenc.ImageProcessor().to_dict()
    d[field] = value
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    pixels = []
    image = np.zeros((4, 4, 3), np.uint8)
    image[::2] = 255  # both ends of the pixel range
    error = expect_documented(
        lambda: pixels.append(dualenc.ImageProcessor.from_pretrained(tmp_path)([image])))
    if error is not None:  # a bad setting names the file; one the image cannot meet names the image
        assert "preprocessor_config.json" in str(error) or "image 0" in str(error), str(error)
    else:  # settings that are accepted give finite pixels (none overflowing float32)
        assert np.isfinite(pixels[0]).all(), (field, value)


@FUZZ
@given(kind=st.sampled_from(["tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"]),
       content=st.binary(max_size=200) | st.sampled_from([b"{}", b"[]", b'{"model": null}', b"", b'{"model_max_length": -5}',
                                                         b'{"do_lower_case": "yes"}', b"\xff\xfe"]))
def test_fuzzed_tokenizer_files(tmp_path, kind, content):
    TRIED["tokenizer files"] += 1
    for f in tmp_path.iterdir():
        f.unlink()
    if kind in ("tokenizer_config.json",):
        (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    if kind == "vocab.json":
        (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\n")
    (tmp_path / kind).write_bytes(content)
    error = expect_documented(lambda: dualenc.Tokenizer.from_pretrained(tmp_path)(["hello world"]))
    if error is not None:
        assert str(tmp_path) in str(error) or kind in str(error), str(error)


@FUZZ
@given(layout=st.sampled_from(["clip", "open_clip"]),
       kind=st.sampled_from(["vocab.json", "merges.txt", "bpe_simple_vocab_16e6.txt.gz", "tokenizer_config.json"]),
       content=st.binary(max_size=200) | st.sampled_from([b"{}", b"[]", b'{"a</w>": 0}', b"#version: 0.2\na b\n",
                                                         b"\x1f\x8b\x08\x00", b"", b'{"model_max_length": 0}']))
def test_fuzzed_clip_tokenizer_files(tmp_path, layout, kind, content):
    """CLIP's BPE files (transformers' CLIPTokenizer layout, or an open_clip directory's) end in documented errors."""
    TRIED["CLIP tokenizer files"] += 1
    for f in tmp_path.iterdir():
        f.unlink()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5, "ab</w>": 6}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    if layout == "clip":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    else:
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
        if kind == "bpe_simple_vocab_16e6.txt.gz":
            for name in ("vocab.json", "merges.txt"):
                (tmp_path / name).unlink()
    (tmp_path / kind).write_bytes(content)
    error = expect_documented(lambda: dualenc.Tokenizer.from_pretrained(tmp_path)(["ab ba"]))
    if error is not None:
        assert str(tmp_path) in str(error) or kind in str(error), str(error)


# ------------------------------------------------------------------------------------------------ images

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


@FUZZ
@given(payload=st.binary(max_size=300))
def test_random_bytes_as_images(tmp_path, payload):
    TRIED["image bytes"] += 1
    path = tmp_path / "x.png"
    path.write_bytes(payload)
    processor = dualenc.ImageProcessor(size={"height": 8, "width": 8})
    error = expect_documented(lambda: processor([str(path)]))
    if error is not None:
        assert "x.png" in str(error) and "0" in str(error), str(error)


@FUZZ
@given(mode=st.sampled_from(MODES), width=st.integers(1, 3000), height=st.integers(1, 3),
       transpose=st.booleans(), fmt=st.sampled_from(["PNG", "JPEG", "TIFF"]), cut=st.floats(0.2, 1.0))
def test_odd_images_and_truncated_files(tmp_path, mode, width, height, transpose, fmt, cut):
    TRIED["images"] += 1
    if transpose:
        width, height = height, width
    image = Image.new(mode, (width, height))
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, KeyError, ValueError):  # pillow cannot write this mode in this format
        return
    blob = buffer.getvalue()
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(blob[:max(1, int(cut * len(blob)))])
    for settings_ in (dict(size={"height": 8, "width": 8}),
                      dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 8},
                           crop_size={"height": 8, "width": 8})):
        processor = dualenc.ImageProcessor(**settings_)
        error = expect_documented(lambda: processor([np.zeros((2, 2, 3), np.uint8), str(path)]))
        if error is not None:
            assert "img." in str(error) and "1" in str(error), str(error)


def test_zero_sized_and_bomb_images(tmp_path):
    processor = dualenc.ImageProcessor(size={"height": 8, "width": 8})
    with pytest.raises(dualenc.InputError, match=r"images?\[?.*0"):
        processor([np.zeros((0, 5, 3), np.uint8)])
    bomb = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(bomb, optimize=False)  # 400M pixels, a few hundred KB compressed
    with pytest.raises(dualenc.InputError, match="bomb.png"):
        processor([str(bomb)])


# ------------------------------------------------------------------------------------------------ captions

@FUZZ
@given(rows=st.lists(st.one_of(
    st.fixed_dictionaries({"image": st.sampled_from(["a.png", "../a.png", "/etc/passwd", "sub/../a.png", "b.png",
                                                     "", "a.png\x00"]),
                           "caption": st.one_of(st.text(max_size=20), st.none(), st.integers())}),
    st.text(max_size=30), st.binary(max_size=30)), max_size=12), fmt=st.sampled_from(["jsonl", "csv"]),
       header=st.one_of(st.sampled_from([b"image,caption", b"image,caption\r0", b"\r0"]), st.binary(max_size=20),
                        st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_fuzzed_caption_files(tmp_path, rows, fmt, header):
    TRIED["caption files"] += 1
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    (tmp_path / "a.png").write_bytes((folder / "a.png").read_bytes())
    lines = []
    for row in rows:
        if isinstance(row, dict):
            lines.append(json.dumps(row).encode() if fmt == "jsonl" else
                         f"{row['image']},{row['caption']}".encode("utf-8", "surrogatepass"))
        else:
            lines.append(row.encode("utf-8", "surrogatepass") if isinstance(row, str) else row)
    if fmt == "csv":
        lines.insert(0, header)  # a CSV's header line is fuzzed too
    path = folder / f"pairs.{fmt}"
    path.write_bytes(b"\n".join(lines))
    try:
        dataset = data.read_pairs(path)
    except DOCUMENTED as e:
        assert "pairs." in str(e), str(e)
        return
    for image in dataset.images:  # nothing outside the data folder
        assert os.path.realpath(image).startswith(os.path.realpath(folder))
    assert all(c.strip() for c in dataset.captions)
