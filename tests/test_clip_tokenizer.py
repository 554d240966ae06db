"""CLIP tokenizers against transformers' CLIPTokenizer and open_clip's SimpleTokenizer, on the real CLIP vocabulary."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import open_clip
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe

from dualenc import Tokenizer
from dualenc.processing import clip_bpe
from dualenc.errors import ConfigError, InputError

SOT, EOT = 49406, 49407
TEXTS = [
    "a photo of a cat", "A Photo Of A CAT.", "Héllo wörld, naïve café — ÀÉÎÕÜ", "中文字符 日本語のテキスト 한국어",
    "emoji 😀👍🏽 ok 🐶🎉", "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &amp;amp;", "<b>tag</b> & ampersand",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "schÃ¶n", "“curly” ‘quotes’ ﬁne ｆｕｌｌｗｉｄｔｈ",
    "tabs\tand\nnewlines\r\n  many   spaces\u00a0nbsp\u2003em\u3000ideographic",
    "  leading and trailing  ", "punctuation!!! ?? ... --- (a) [b] {c} @#$%^&*",
    "3.14159 1,000,000 42nd 2024-01-01", "Ⅻ ½ ²",
    "don't I'll we've they're she'd I'm it's DON'T", "'s 't 're", "", "   ", "\t\n",
    "<|startoftext|>hi<|endoftext|>", "<|STARTOFTEXT|> a <| endoftext |>",
    "<start_of_text>x<end_of_text> <<start_of_text> <START_OF_TEXT>",
    "ctl\x00chars\x07 zero\u200bwidth\ufeff combining e\u0301", "ΟΔΟΣ Σ σς İstanbul ẞ",
    "the cats sing " * 40, "supercalifragilisticexpialidocious" * 8,
]


def _write(path, files):
    path.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            (path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def hub_files():
    """vocab.json and merges.txt as OpenAI's hub repos hold them, from open_clip's bundled vocabulary."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    return {"vocab.json": vocab, "merges.txt": "#version: 0.2\n" + "\n".join(lines) + "\n"}


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


HUB_CONFIG = {  # the shape of openai/clip-vit-base-patch32's tokenizer_config.json
    "add_prefix_space": False, "bos_token": _added("<|startoftext|>"), "do_lower_case": True,
    "eos_token": _added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
    "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": _added("<|endoftext|>")}
SPECIALS_MAP = {k: {key: v for key, v in _added(c).items() if key != "__type"} for k, c in
                (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))}
PLAIN_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"}


def open_clip_config(**text_cfg):
    return {"model_cfg": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                           "patch_size": 32},
                          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                       "layers": 12, **text_cfg}},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258,
                                                                                   0.27577711]}}


def clip_config(**text):
    return transformers.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                    num_attention_heads=4, **text),
                                   vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                      num_attention_heads=4, image_size=30, patch_size=10),
                                   projection_dim=16)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{name: directory} of CLIP tokenizer layouts."""
    root = tmp_path_factory.mktemp("clip")
    files = hub_files()
    out = {"hub": _write(root / "hub", {**files, "tokenizer_config.json": HUB_CONFIG,
                                        "special_tokens_map.json": SPECIALS_MAP}),
           "plain": _write(root / "plain", {**files, "tokenizer_config.json": PLAIN_CONFIG})}
    transformers.CLIPTokenizer.from_pretrained(out["plain"]).save_pretrained(root / "json")
    out["json"] = str(root / "json")
    out["config"] = _write(root / "config", files)  # no tokenizer_config: config.json's model_type says CLIP
    clip_config(max_position_embeddings=40).save_pretrained(out["config"])
    out["openclip"] = _write(root / "openclip", {**files, "tokenizer_config.json": HUB_CONFIG,
                                                 "open_clip_config.json": open_clip_config()})
    out["openclip-bare"] = _write(root / "openclip-bare", {"open_clip_config.json": open_clip_config()})
    with open(default_bpe(), "rb") as f:
        gz = f.read()
    out["openclip-gz"] = _write(root / "openclip-gz", {"open_clip_config.json": open_clip_config(),
                                                       clip_bpe.BPE_GZ: gz})
    out["openclip-json"] = _write(root / "openclip-json", {"open_clip_config.json": open_clip_config(
        context_length=20)})
    shutil.copy(os.path.join(out["json"], "tokenizer.json"), out["openclip-json"])
    out["openclip-canon"] = _write(root / "openclip-canon", {"open_clip_config.json": open_clip_config(
        context_length=24, tokenizer_kwargs={"clean": "canonicalize"}, hf_tokenizer_name="")})
    out["both"] = _write(root / "both", {**files, "tokenizer_config.json": PLAIN_CONFIG,
                                         "open_clip_config.json": open_clip_config()})
    clip_config().save_pretrained(out["both"])
    return out


@pytest.fixture(scope="module")
def hf(dirs):
    return transformers.AutoTokenizer.from_pretrained(dirs["plain"])


def backend_json(backend):
    data = json.loads(backend.to_str())
    data["truncation"] = data["padding"] = None
    return data


def assert_same_as_transformers(ours, hf, texts, max_length=77, padding="max_length"):
    expected = hf(texts, padding=padding, max_length=max_length, truncation=True, return_tensors="np")
    got = ours(texts, max_length=max_length, padding=padding)
    assert set(got) == {"input_ids", "attention_mask"} == set(expected)
    for key, value in got.items():
        assert value.dtype == np.int64
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def open_clip_reference(texts, context_length, clean="lower"):
    """open_clip's ids, and the attention mask of its real tokens (open_clip itself gives none)."""
    simple = SimpleTokenizer(context_length=context_length, clean=clean)
    ids = simple(texts).numpy()
    lengths = [min(len(simple.encode(t)) + 2, context_length) for t in texts]
    return ids, (np.arange(context_length) < np.array(lengths)[:, None]).astype(np.int64)


@pytest.fixture(scope="module")
def reference():
    ids, mask = open_clip_reference(TEXTS, 77)
    np.testing.assert_array_equal(ids, open_clip.tokenize(TEXTS, 77).numpy())
    return ids, mask


# --------------------------------------------------------------------------------------- transformers' CLIP


@pytest.mark.parametrize("name", ["hub", "plain", "json", "config", "both"])
def test_matches_transformers_clip_tokenizer(name, dirs):
    hf = transformers.AutoTokenizer.from_pretrained(dirs[name])
    assert type(hf).__name__ == "CLIPTokenizer"
    ours = Tokenizer.from_pretrained(dirs[name])
    assert backend_json(ours.backend) == backend_json(hf.backend_tokenizer)
    assert ours.vocab_size == len(hf) == 49408 and ours.pad_token_id == hf.pad_token_id == EOT
    assert ours.tokenizer_class == "CLIPTokenizer" and ours.model_input_names == ("input_ids", "attention_mask")
    limit = 40 if name == "config" else 77  # config.json's text max_position_embeddings wins
    assert ours.max_length == ours.model_max_length == limit
    assert ours(TEXTS)["input_ids"].shape == (len(TEXTS), limit)
    assert_same_as_transformers(ours, hf, TEXTS, limit)
    assert_same_as_transformers(ours, hf, TEXTS, 9, "longest")
    with pytest.raises(InputError, match=f"limit of {limit}"):
        ours("x", max_length=limit + 1)


def test_truncation_keeps_the_end_token(dirs, hf):
    ours = Tokenizer.from_pretrained(dirs["plain"])
    got = ours(TEXTS[-2:], max_length=12)["input_ids"]
    assert (got[:, 0] == SOT).all() and (got[:, -1] == EOT).all()
    assert_same_as_transformers(ours, hf, TEXTS[-2:], 12)


def test_clip_text_model_config_sets_the_limit(dirs, tmp_path):
    path = tmp_path / "text"
    shutil.copytree(dirs["plain"], path)
    clip_config(max_position_embeddings=33).text_config.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "clip_text_model"
    assert Tokenizer.from_pretrained(path).max_length == 33


@pytest.mark.parametrize("name", ["hub", "json"])
def test_save_round_trip(name, dirs, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(dirs[name])
    ours = Tokenizer.from_pretrained(dirs[name])
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "CLIPTokenizer"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "CLIPTokenizer"
    assert backend_json(loaded.backend_tokenizer) == backend_json(ours.backend)
    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.max_length, again.model_input_names) == (77, ("input_ids", "attention_mask"))
    for tokenizer in (ours, again):
        assert_same_as_transformers(tokenizer, loaded, TEXTS)
        assert_same_as_transformers(tokenizer, hf, TEXTS, 16, "longest")


def test_unknown_words_on_clip_vocabularies(dirs, tmp_path):
    # CLIP's unknown token is also its end of text and padding token: none of those is an unknown word
    ordinary = ["a photo of a cat", "a dog", "中文 東京 😀👍🏽 café", "<|endoftext|> typed", "the cats sing " * 40]
    for name in ("hub", "json", "openclip"):  # byte-level BPE over all 256 bytes reads every text
        assert Tokenizer.from_pretrained(dirs[name]).unknown_words(ordinary) == {}, name
    # a vocabulary of the letters a-z only: a digit and a CJK character are read as the unknown token
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    tiny = Tokenizer.from_pretrained(_write(tmp_path / "tiny", {
        "vocab.json": vocab, "merges.txt": "#version: 0.2\n", "tokenizer_config.json": PLAIN_CONFIG}))
    assert tiny.unk_token_id == tiny.pad_token_id == vocab["<|endoftext|>"]
    texts = ["a cat", "a cat 9", "cat99 and 東京 a 東京", "<|endoftext|>", "x " * 80 + "9"]
    assert tiny.unknown_words(texts) == {"a cat 9": ["9"], "cat99 and 東京 a 東京": ["99", "東京"]}


# ------------------------------------------------------------------------------------------------ open_clip


@pytest.mark.parametrize("name", ["openclip", "openclip-bare", "openclip-gz"])
def test_matches_open_clip(name, dirs, reference):
    ours = Tokenizer.from_pretrained(dirs[name])
    assert (ours.max_length, ours.model_max_length, ours.pad_token_id, ours.vocab_size) == (77, 77, 0, 49408)
    got = ours(TEXTS)
    assert set(got) == {"input_ids", "attention_mask"}
    np.testing.assert_array_equal(got["input_ids"], reference[0])
    np.testing.assert_array_equal(got["attention_mask"], reference[1])
    assert (got["input_ids"][-2:, -1] == EOT).all()  # truncated: the end of text token forced last


def test_open_clip_lengths_padding_and_settings(dirs, reference):
    ours = Tokenizer.from_pretrained(dirs["openclip"])
    for length in (2, 5, 30):
        np.testing.assert_array_equal(ours(TEXTS, max_length=length)["input_ids"], open_clip.tokenize(TEXTS, length))
    longest = ours(TEXTS[:4], padding="longest")
    width = longest["input_ids"].shape[1]
    assert width == reference[1][:4].sum(1).max()
    np.testing.assert_array_equal(longest["input_ids"], reference[0][:4, :width])
    np.testing.assert_array_equal(longest["attention_mask"], reference[1][:4, :width])
    # open_clip.get_tokenizer on the same directory: context_length (and the clean mode) from its config
    for name, length in (("openclip-json", 20), ("openclip-canon", 24)):
        simple = open_clip.get_tokenizer(f"local-dir:{dirs[name]}")
        ours = Tokenizer.from_pretrained(dirs[name])
        assert ours.max_length == ours.model_max_length == simple.context_length == length
        np.testing.assert_array_equal(ours(TEXTS)["input_ids"], simple(TEXTS).numpy())


def test_word_cache_limit(dirs, monkeypatch, reference):
    monkeypatch.setattr(clip_bpe, "CACHE_LIMIT", 8)
    ours = Tokenizer.from_pretrained(dirs["openclip-bare"])
    for start in range(0, len(TEXTS), 5):
        np.testing.assert_array_equal(ours(TEXTS[start:start + 5])["input_ids"], reference[0][start:start + 5])


def test_config_json_wins_over_open_clip_config(dirs, hf):
    ours = Tokenizer.from_pretrained(dirs["both"])
    assert_same_as_transformers(ours, hf, TEXTS)
    # transformers keeps "&amp;" as it is, open_clip unescapes it
    assert (ours("&amp;")["input_ids"] != open_clip.tokenize("&amp;", 77).numpy()).any()


def test_open_clip_saves_as_transformers_clip(dirs, hf, tmp_path):
    ours = Tokenizer.from_pretrained(dirs["openclip-bare"])
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "CLIPTokenizer"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert backend_json(loaded.backend_tokenizer) == backend_json(hf.backend_tokenizer)
    assert_same_as_transformers(Tokenizer.from_pretrained(tmp_path), hf, TEXTS)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config()))
    again = Tokenizer.from_pretrained(tmp_path)  # beside an open_clip config: open_clip's tokenizer again
    np.testing.assert_array_equal(again(TEXTS)["input_ids"], open_clip.tokenize(TEXTS, 77).numpy())


@pytest.fixture(scope="module")
def pairs(dirs, hf):
    simple = SimpleTokenizer(context_length=16)
    return (Tokenizer.from_pretrained(dirs["plain"]), hf), (Tokenizer.from_pretrained(dirs["openclip"]), simple)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=30) | st.text("aA's'tl &;<>#!?.é中😀 \t\n\u00a0", max_size=30),
                      min_size=1, max_size=4))
def test_random_text(texts, pairs):
    (ours, hf), (ours_oc, simple) = pairs
    assert_same_as_transformers(ours, hf, texts, 16)
    np.testing.assert_array_equal(ours_oc(texts, max_length=16)["input_ids"], simple(texts).numpy())


# ------------------------------------------------------------------------------------------------- bad files


def test_bad_transformers_files(dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dirs["plain"], bad)
    (bad / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(ConfigError, match=r"vocab\.json"):
        Tokenizer.from_pretrained(bad)
    (bad / "vocab.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(ConfigError, match=r"vocab\.json"):  # merges of tokens it does not have
        Tokenizer.from_pretrained(bad)
    (bad / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        Tokenizer.from_pretrained(bad)
    (bad / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        Tokenizer.from_pretrained(bad)
    shutil.copy(os.path.join(dirs["json"], "tokenizer.json"), bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    data["model"] = {"type": "WordPiece", "vocab": {}}
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"tokenizer\.json.*'model'"):
        Tokenizer.from_pretrained(bad)


@pytest.mark.parametrize("text_cfg, match", [
    ({"hf_tokenizer_name": "openai/clip-vit-base-patch32"}, "hf_tokenizer_name.*openai/clip-vit-base-patch32"),
    ({"tokenizer_kwargs": {"reduction_mask": "random"}}, "reduction_mask.*random"),
    ({"tokenizer_kwargs": {"clean": "shout"}}, "clean.*shout"),
    ({"tokenizer_kwargs": {"additional_special_tokens": ["<x>"]}}, "additional_special_tokens"),
    ({"tokenizer_kwargs": {"lowercase": False}}, "tokenizer_kwargs.lowercase"),
    ({"tokenizer_kwargs": "lower"}, "tokenizer_kwargs"),
    ({"vocab_size": 32000}, "vocab_size.*32000.*49408"),
    ({"context_length": 1}, "context_length"),
    ({"context_length": "77"}, "context_length"),
])
def test_refused_open_clip_settings(text_cfg, match, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config(**text_cfg)))
    with pytest.raises(ConfigError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_open_clip_files(dirs, tmp_path, monkeypatch):
    config = tmp_path / "open_clip_config.json"
    config.write_text('{"text_cfg": {}}')
    with pytest.raises(ConfigError, match="model_cfg"):
        Tokenizer.from_pretrained(tmp_path)
    config.write_text("{broken")
    with pytest.raises(ConfigError, match=r"open_clip_config\.json"):
        Tokenizer.from_pretrained(tmp_path)
    config.write_text(json.dumps(open_clip_config()))
    (tmp_path / clip_bpe.BPE_GZ).write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match=clip_bpe.BPE_GZ):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / clip_bpe.BPE_GZ).write_bytes(gzip.compress(b"header\na b\nc\n"))
    with pytest.raises(ConfigError, match="line 3"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / clip_bpe.BPE_GZ).unlink()
    monkeypatch.setattr(clip_bpe, "_package_bpe", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"vocab\.json \+ merges\.txt.*bpe_simple_vocab_16e6"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    config.write_text(json.dumps(open_clip_config(vocab_size=3)))
    with pytest.raises(ConfigError, match="byte symbols"):
        Tokenizer.from_pretrained(tmp_path)


def test_ftfy_only_for_open_clip(dirs):
    code = ("import sys; sys.modules['ftfy'] = None; from dualenc import Tokenizer; "
            f"Tokenizer.from_pretrained({dirs['plain']!r})('x')\n"
            f"try:\n    Tokenizer.from_pretrained({dirs['openclip']!r})\n"
            "except ImportError as e:\n    assert 'pip install ftfy' in str(e), e\nelse:\n    raise SystemExit(1)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_a_huge_caption_is_cut_before_it_is_tokenized(dirs, hf):
    """A 16 MiB caption (the caption files' line limit) took 13.7 s and 2.4 GB to tokenize whole; only the first
    max_length * CHARS_PER_TOKEN characters are read now, with the ids of the whole text."""
    import time

    from dualenc.processing.text import CHARS_PER_TOKEN

    long = ["a photo of a dog on the beach, " * 2000, "x" + "y " * 30_000]  # past 77 * CHARS_PER_TOKEN characters
    assert min(map(len, long)) > 77 * CHARS_PER_TOKEN
    assert_same_as_transformers(Tokenizer.from_pretrained(dirs["plain"]), hf, long)
    np.testing.assert_array_equal(Tokenizer.from_pretrained(dirs["openclip"])(long)["input_ids"],
                                  open_clip_reference(long, 77)[0])
    ours = Tokenizer.from_pretrained(dirs["plain"])
    huge = "a photo of a dog " * (1 << 20)
    start = time.perf_counter()
    ids = ours([huge])["input_ids"]
    assert time.perf_counter() - start < 2.0
    assert ours.unknown_words([huge]) == {}
    np.testing.assert_array_equal(ids, ours([huge[:10_000]])["input_ids"])
    ours.truncation_side = "left"  # the cut is on the side truncation drops
    assert ours._cut(["ab" * 20_000], 10) == ["ab" * (10 * CHARS_PER_TOKEN // 2)]
    assert ours._cut(["abc" + "d" * 3000], 10) == ["d" * 10 * CHARS_PER_TOKEN]
