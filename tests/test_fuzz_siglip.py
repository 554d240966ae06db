"""Fuzzing the SigLIP family's files (hypothesis, bounded, counted with test_fuzz's): SigLIP / SigLIP 2 config.json,
spiece.model and NaFlex preprocessor configs end in dualenc's documented errors naming the file; never a crash."""

import json

import pytest
from conftest import TINY
from hypothesis import given, strategies as st
from test_fuzz import FUZZ, JUNK, SIZE_FIELDS, TRIED, expect_documented

import dualenc

SIGLIP_FIELDS = SIZE_FIELDS + ["hidden_act", "layer_norm_eps", "model_type", "eos_token_id", "bos_token_id",
                               "pad_token_id", "attention_dropout", "projection_size", "vision_use_head",
                               "num_patches", "head_dim", "dualenc_logit_init"]


def siglip_config(model_type: str) -> dict:
    if model_type == "siglip":
        vision = dualenc.SiglipVisionConfig(**TINY, image_size=16, patch_size=8)
        text = dualenc.SiglipTextConfig(**TINY, vocab_size=40, max_position_embeddings=16)
    else:
        vision = dualenc.Siglip2VisionConfig(**TINY, patch_size=8, num_patches=16)
        text = dualenc.Siglip2TextConfig(**TINY, vocab_size=40, max_position_embeddings=16)
    return dualenc.DualEncoderConfig(vision, text, projection_dim=32, model_type=model_type,
                                     logit_bias_init_value=-10.0).to_dict()


@FUZZ
@given(model_type=st.sampled_from(["siglip", "siglip2"]), where=st.sampled_from(["vision_config", "text_config", None]),
       field=st.sampled_from(SIGLIP_FIELDS), value=JUNK, drop=st.booleans())
def test_fuzzed_siglip_config_json(tmp_path, model_type, where, field, value, drop):
    TRIED["SigLIP config.json"] += 1
    d = siglip_config(model_type)
    target = d if where is None else d[where]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_documented(lambda: dualenc.load_config(tmp_path), "config.json")


@pytest.fixture(scope="module")
def spiece_bytes(tmp_path_factory):
    """A small valid spiece.model (SigLIP's special ids), to truncate and flip."""
    import sentencepiece as spm  # in the processing extra
    prefix = str(tmp_path_factory.mktemp("spiece") / "spiece")
    corpus = [f"a photo of a {w} number {i}" for i, w in enumerate(["cat", "dog", "bird", "tree", "car"] * 40)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with open(prefix + ".model", "rb") as f:
        return f.read()


@FUZZ
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 1 << 16), junk=st.binary(max_size=64))
def test_mutated_spiece_model(spiece_bytes, tmp_path, cut, flip, junk):
    TRIED["spiece.model"] += 1
    blob = bytearray(spiece_bytes[:int(len(spiece_bytes) * cut)] + junk)
    if blob:
        blob[flip % len(blob)] ^= 0x5A
    (tmp_path / "spiece.model").write_bytes(bytes(blob))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer"}))
    error = expect_documented(lambda: dualenc.Tokenizer.from_pretrained(tmp_path)(["a photo of a cat"]))
    if error is not None:
        assert "spiece.model" in str(error) or str(tmp_path) in str(error), str(error)


@FUZZ
@given(field=st.sampled_from(["patch_size", "max_num_patches", "resample", "image_mean", "image_std",
                              "rescale_factor", "do_resize", "do_normalize", "do_convert_rgb",
                              "image_processor_type"]), value=JUNK)
def test_fuzzed_naflex_preprocessor_config(tmp_path, field, value):
    TRIED["NaFlex preprocessor_config.json"] += 1
    d = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 8, "max_num_patches": 16, field: value}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    error = expect_documented(lambda: dualenc.NaFlexImageProcessor.from_pretrained(tmp_path))
    if error is not None:
        assert "preprocessor_config.json" in str(error) or str(tmp_path) in str(error), str(error)


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory):
    """A small valid big_vision SigLIP .npz (per-layer), to truncate, flip and extend."""
    from test_big_vision import big_vision_tensors, save

    with open(save(tmp_path_factory.mktemp("npz"), big_vision_tensors()), "rb") as f:
        return f.read()


@FUZZ
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 1 << 20), junk=st.binary(max_size=64))
def test_mutated_big_vision_npz(npz_bytes, tmp_path, cut, flip, junk):
    TRIED["big_vision .npz"] += 1
    blob = bytearray(npz_bytes[:int(len(npz_bytes) * cut)] + junk)
    if blob:
        blob[flip % len(blob)] ^= 0x5A
    path = tmp_path / "ckpt.npz"
    path.write_bytes(bytes(blob))
    error = expect_documented(lambda: dualenc.load_big_vision(path))
    if error is not None:
        assert str(path) in str(error), str(error)
