"""SigLIP's SentencePiece tokenizer and SigLIP 2's Gemma tokenizer against transformers' SiglipTokenizer,
GemmaTokenizer and Siglip2Tokenizer, on small models trained here (no network)."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualenc import Tokenizer
from dualenc.errors import ConfigError, InputError

spm = pytest.importorskip("sentencepiece")
tk = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.filterwarnings("ignore:This sequence already has")

WORDS = ("a photo of the cat dog bird fox quick brown lazy jumps over picture two three small large red green "
         "blue house car tree river mountain city street night day sunset beach people running walking eating "
         "drinking café crème brûlée naïve résumé numbers 1234 5678 hello world it's test 東京 写真").split()
TEXTS = [
    "a photo of a cat", "A Photo Of A CAT!", "  hello   world  ", "Héllo wörld, naïve café — ÀÉÎÕÜ",
    "東京 タワー の 写真", "emoji 😀👍🏽 ok", "it's (a) [test] {x} @#$%^&*... ---", "tabs\tand\nnewlines\r\n",
    "\u00a0nbsp\u2003em\u3000ideographic", "", " ", "x\u2581y \u2581", "ΟΔΟΣ Σ σς İstanbul ẞ",
    "</s> starts", "ends </s>", "mid</s>dle <unk> <pad>", "<eos> and <bos> and <pad>", "the quick brown fox " * 30,
]
HUB_TOKEN = dict(lstrip=True, normalized=False, rstrip=True, single_word=False, special=True)


def _corpus(seed=0, n=3000):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory):
    """A small unigram SentencePiece model with SigLIP's special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    prefix = str(tmp_path_factory.mktemp("spiece") / "spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=prefix, vocab_size=96, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=0.999, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def gemma_json(tmp_path_factory):
    """tokenizer.json of a small Gemma-style BPE (byte fallback, "▁" for spaces, <pad> <eos> <bos> <unk> <mask> at
    0-4, the byte tokens next) whose post-processor appends <eos>, as SigLIP 2's does."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer.normalizer = tk.normalizers.Replace(" ", "\u2581")
    trainer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer.train_from_iterator(_corpus(1), tk.trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)], limit_alphabet=40,
        show_progress=False))
    model = json.loads(trainer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = tk.Tokenizer(tk.models.BPE(vocab=model["vocab"], merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True, dropout=None))
    tok.normalizer = tk.normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = tk.pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse()])
    tok.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = tk.processors.TemplateProcessing(
        single="$A:0 <eos>:0", pair="$A:0 <eos>:0 $B:1 <eos>:1", special_tokens=[("<eos>", 1)])
    assert len(model["merges"]) > 100 and tok.token_to_id("<0x41>") is not None
    return tok.to_str()


def _write(path, files):
    path.mkdir(exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            (path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def siglip_hub_files(spiece_model, **cfg):
    """spiece.model and the tokenizer files as google/siglip-* hold them (model_input_names: input_ids alone)."""
    added = {"1": {"content": "</s>", **HUB_TOKEN}, "2": {"content": "<unk>", **HUB_TOKEN}}
    config = {"added_tokens_decoder": added,
              "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": 64, "pad_token": "</s>",
              "processor_class": "SiglipProcessor", "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer",
              "unk_token": "<unk>", **cfg}
    specials = {k: {"content": config[k], **HUB_TOKEN} for k in ("eos_token", "pad_token", "unk_token")}
    with open(spiece_model, "rb") as f:
        model = f.read()
    return {"spiece.model": model, "tokenizer_config.json": config, "special_tokens_map.json": specials}


def gemma_files(gemma_json, *, model_type=None, **cfg):
    """tokenizer.json and tokenizer_config.json as google/siglip2-* hold them (GemmaTokenizer, no <bos>, <eos>
    appended, right padding), with a config.json of `model_type` if given."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    config = {"add_bos_token": False, "add_eos_token": True, "added_tokens_decoder": added, "bos_token": "<bos>",
              "clean_up_tokenization_spaces": False, "eos_token": "<eos>", "mask_token": "<mask>",
              "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "right",
              "processor_class": "Siglip2Processor", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
              "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", **cfg}
    files = {"tokenizer.json": gemma_json, "tokenizer_config.json": {k: v for k, v in config.items() if v is not None}}
    if model_type is not None:
        files["config.json"] = {"model_type": model_type, "text_config": {"max_position_embeddings": 64,
                                                                          "vocab_size": 700}, "vision_config": {}}
    return files


def reference(tok, texts, max_length=64):
    """transformers' ids as SigLIP's and SigLIP 2's processors ask for them: padded to max_length, truncated."""
    out = tok(texts, padding="max_length", max_length=max_length, truncation=True)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def assert_same(ours, ref):
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


# ------------------------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("variant", [
    "hub", "saved-by-transformers", "distinct-pad", "cased", "truncate-left", "extra-special", "split-specials"])
def test_siglip_ids_and_masks_match_transformers(variant, spiece_model, tmp_path):
    if variant == "saved-by-transformers":
        transformers.SiglipTokenizer(vocab_file=spiece_model).save_pretrained(tmp_path / "tok")
        path = str(tmp_path / "tok")
    else:
        cfg = {"distinct-pad": dict(pad_token="<pad>", model_input_names=["input_ids", "attention_mask"]),
               "cased": dict(do_lower_case=False), "truncate-left": dict(truncation_side="left"),
               "extra-special": dict(additional_special_tokens=["<extra>", "ph"]),
               "split-specials": dict(split_special_tokens=True)}.get(variant, {})
        path = _write(tmp_path / "tok", siglip_hub_files(spiece_model, **cfg))
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    assert type(ref_tok).__name__ == "SiglipTokenizer"
    tok = Tokenizer.from_pretrained(path)
    assert tok.max_length == 64 and tok.vocab_size == len(ref_tok) and tok.pad_token_id == ref_tok.pad_token_id
    texts = TEXTS + (["an <extra> ph token", "<extra>"] if variant == "extra-special" else [])
    assert_same(tok(texts), reference(ref_tok, texts))
    assert_same(tok(texts, max_length=9), reference(ref_tok, texts, 9))  # truncation, </s> kept last
    for text in texts[:6]:  # one at a time as in a batch
        assert_same(tok(text, max_length=12), reference(ref_tok, [text], 12))


def test_siglip_canonicalises_appends_eos_and_pads_to_64(spiece_model, tmp_path):
    path = _write(tmp_path / "tok", siglip_hub_files(spiece_model))
    out = Tokenizer.from_pretrained(path)(["A Photo, of: a CAT!!", "a photo of a cat", "the quick brown fox " * 30])
    assert list(out) == ["input_ids"] and out["input_ids"].shape == (3, 64) and out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"][0], out["input_ids"][1])  # case and punctuation are dropped
    sp = spm.SentencePieceProcessor(model_file=spiece_model)
    n = len(sp.encode("a photo of a cat"))
    assert list(out["input_ids"][1, :n]) == sp.encode("a photo of a cat") and set(out["input_ids"][1, n:]) == {1}
    assert out["input_ids"][2, -1] == 1 and 1 not in out["input_ids"][2, :-1]  # truncated to 63 pieces + </s>


def test_siglip_default_length_follows_the_model_config(spiece_model, tmp_path):
    files = siglip_hub_files(spiece_model)
    files["tokenizer_config.json"].pop("tokenizer_class")
    files["config.json"] = {"model_type": "siglip", "text_config": {"max_position_embeddings": 32}}
    path = _write(tmp_path / "tok", files)
    tok = Tokenizer.from_pretrained(path)  # the class comes from config.json, as AutoTokenizer takes it
    assert tok.tokenizer_class == "SiglipTokenizer" and tok.max_length == tok.model_max_length == 32
    assert tok(TEXTS)["input_ids"].shape == (len(TEXTS), 32)
    assert_same(tok(TEXTS), reference(transformers.AutoTokenizer.from_pretrained(path), TEXTS, 32))
    with pytest.raises(InputError, match="over the text model's limit of 32"):
        tok("x", max_length=64)
    files["config.json"] = {"model_type": "siglip", "text_config": {}}
    assert Tokenizer.from_pretrained(_write(tmp_path / "default", files)).max_length == 64


def test_siglip_save_pretrained_round_trips(spiece_model, tmp_path):
    for cfg in ({}, dict(pad_token="<pad>", do_lower_case=False, truncation_side="left",
                         additional_special_tokens=["<extra>"], model_input_names=["input_ids", "attention_mask"])):
        src = _write(tmp_path / f"src{len(cfg)}", siglip_hub_files(spiece_model, **cfg))
        tok = Tokenizer.from_pretrained(src)
        out = tmp_path / f"out{len(cfg)}"
        _write(out, {"tokenizer.json": "{not json: a stale file is not read"})
        tok.save_pretrained(out)
        assert (out / "spiece.model").read_bytes() == (tmp_path / f"src{len(cfg)}" / "spiece.model").read_bytes()
        saved = json.loads((out / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == "SiglipTokenizer"
        texts = TEXTS + ["<extra> x"]
        ref_tok = transformers.AutoTokenizer.from_pretrained(out)
        assert type(ref_tok).__name__ == "SiglipTokenizer"
        assert_same(tok(texts), reference(ref_tok, texts))
        assert_same(Tokenizer.from_pretrained(out)(texts, max_length=10), tok(texts, max_length=10))


@pytest.mark.parametrize("content", ["missing", "empty", "text", "truncated", "pickle", "directory"])
def test_bad_spiece_model_is_a_clear_error(content, spiece_model, tmp_path):
    files = siglip_hub_files(spiece_model)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    files["spiece.model"] = {"empty": b"", "text": "not a model\n", "truncated": files["spiece.model"][:300],
                             "pickle": pickle.dumps(Payload())}.get(content, files["spiece.model"])
    path = _write(tmp_path / "tok", files)
    where = os.path.join(path, "spiece.model")
    if content == "missing":
        os.remove(where)
    elif content == "directory":
        os.remove(where)
        os.mkdir(where)
    error = FileNotFoundError if content == "missing" else ConfigError
    with pytest.raises(error, match="SentencePiece model") as info:
        Tokenizer.from_pretrained(path)
    assert where in str(info.value)
    assert not marker.exists()


def test_siglip_refuses_sampling_and_missing_tokens(spiece_model, tmp_path):
    path = _write(tmp_path / "a", siglip_hub_files(spiece_model, sp_model_kwargs={"enable_sampling": True}))
    with pytest.raises(ConfigError, match="sp_model_kwargs"):
        Tokenizer.from_pretrained(path)
    path = _write(tmp_path / "b", siglip_hub_files(spiece_model, eos_token=None, added_tokens_decoder={}))
    os.remove(os.path.join(path, "special_tokens_map.json"))
    with pytest.raises(ConfigError, match="eos_token"):
        Tokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ SigLIP 2


@pytest.mark.parametrize("variant", ["siglip2-config", "siglip2-class", "gemma", "gemma-left-pad", "no-decoder",
                                     "bos-template", "split-specials"])
def test_gemma_ids_and_masks_match_transformers(variant, gemma_json, tmp_path):
    cfg, model_type, data = {}, None, gemma_json
    if variant == "siglip2-config":
        model_type = "siglip2"
    elif variant == "siglip2-class":
        cfg = dict(tokenizer_class="Siglip2Tokenizer")
    elif variant == "gemma-left-pad":
        cfg = dict(padding_side=None, model_input_names=["input_ids"])
    elif variant == "no-decoder":
        cfg = dict(added_tokens_decoder=None)
    elif variant == "split-specials":
        cfg, model_type = dict(split_special_tokens=True), "siglip2"
    elif variant == "bos-template":  # Gemma's own post-processor: transformers ignores add_*_token beside it
        gemma = tk.Tokenizer.from_str(gemma_json)
        gemma.post_processor = tk.processors.TemplateProcessing(
            single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
        data = gemma.to_str()
    path = _write(tmp_path / "tok", gemma_files(data, model_type=model_type, **cfg))
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    lowercased = variant.startswith("siglip2") or variant == "split-specials"
    assert type(ref_tok).__name__ == ("Siglip2Tokenizer" if lowercased else "GemmaTokenizer")
    tok = Tokenizer.from_pretrained(path)
    assert tok.max_length == 64 and tok.vocab_size == len(ref_tok) and tok.pad_token_id == ref_tok.pad_token_id == 0
    assert tok.padding_side == ("left" if variant == "gemma-left-pad" else "right")
    assert_same(tok(TEXTS), reference(ref_tok, TEXTS))
    assert_same(tok(TEXTS, max_length=9), reference(ref_tok, TEXTS, 9))
    ids = tok("a cat")["input_ids"][0]
    assert (ids[0] == 2) == (variant == "bos-template") and (1 in ids) == (variant != "bos-template")


def test_siglip2_is_the_gemma_tokenizer_on_lowercased_text_padded_to_64(gemma_json, tmp_path):
    """What SigLIP 2's processor gives: lowercased text, <eos>, no <bos>, right-padded with <pad> to 64."""
    tok = Tokenizer.from_pretrained(_write(tmp_path / "s2", gemma_files(gemma_json, model_type="siglip2")))
    gemma = transformers.GemmaTokenizer.from_pretrained(_write(tmp_path / "gemma", gemma_files(gemma_json)))
    # (not "Σ" words: str.lower gives a final "ς" where `tokenizers`' Lowercase, which transformers uses, gives "σ")
    texts = [t for t in TEXTS if "Σ" not in t]
    assert_same(tok(texts), reference(gemma, [t.lower() for t in texts]))
    upper = tok(["A PHOTO OF A CAT"])["input_ids"]
    assert not np.array_equal(upper, reference(gemma, ["A PHOTO OF A CAT"])["input_ids"])  # lowercasing matters
    ids, mask = tok("a photo")["input_ids"][0], tok("a photo")["attention_mask"][0]
    n = int(mask.sum())
    assert ids.shape == (64,) and ids[n - 1] == 1 and 2 not in ids and set(ids[n:]) == {0} and mask[:n].all()
    long = tok("the quick brown fox " * 40)
    assert long["attention_mask"].all() and long["input_ids"][0, -1] == 1


def test_gemma_save_pretrained_round_trips(gemma_json, tmp_path):
    for name, cfg, model_type in [("siglip2", {}, "siglip2"), ("gemma", dict(padding_side=None), None)]:
        tok = Tokenizer.from_pretrained(_write(tmp_path / name, gemma_files(gemma_json, model_type=model_type, **cfg)))
        out = tmp_path / f"{name}-saved"
        tok.save_pretrained(out)
        saved = json.loads((out / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == {"siglip2": "Siglip2Tokenizer", "gemma": "GemmaTokenizer"}[name]
        assert (saved["add_bos_token"], saved["add_eos_token"]) == (False, True)
        ref_tok = transformers.AutoTokenizer.from_pretrained(out)  # no config.json: the class alone decides
        assert type(ref_tok).__name__ == saved["tokenizer_class"]
        assert_same(tok(TEXTS), reference(ref_tok, TEXTS))
        assert_same(Tokenizer.from_pretrained(out)(TEXTS, max_length=12), tok(TEXTS, max_length=12))


def test_gemma_needs_tokenizer_json(gemma_json, tmp_path):
    files = gemma_files(gemma_json)
    files.pop("tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(_write(tmp_path / "a", files))
    files["tokenizer.json"] = json.dumps({**json.loads(gemma_json), "model": {"type": "Unigram", "vocab": []}})
    with pytest.raises(ConfigError, match="must be a BPE model for a GemmaTokenizer"):
        Tokenizer.from_pretrained(_write(tmp_path / "b", files))


def test_unknown_words(spiece_model, gemma_json, tmp_path):
    ordinary = ["a photo of the cat", "A Photo, of the CAT!", "東京 写真", "<unk> and </s> written out", "cat " * 80]
    siglip = Tokenizer.from_pretrained(_write(tmp_path / "siglip", siglip_hub_files(spiece_model)))
    texts = ordinary + ["a 猫 photo 🙂🙂!", "cat " * 70 + "猫"]  # the last one's 猫 lies past the 64 tokens
    found = siglip.unknown_words(texts)
    assert found == {"a 猫 photo 🙂🙂!": ["猫", "🙂🙂"]}
    unk = siglip.unk_token_id
    assert unk != siglip.pad_token_id and [t for t in texts if unk in siglip(t)["input_ids"]] == [texts[3], texts[5]]
    # SigLIP 2's Gemma BPE falls back to bytes: it reads every text
    gemma = gemma_files(gemma_json, model_type="siglip2")
    assert Tokenizer.from_pretrained(_write(tmp_path / "gemma", gemma)).unknown_words(texts) == {}
    data = json.loads(gemma_json)  # without the byte tokens, characters it lacks are read as <unk> (one per run)
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if not t.startswith("<0x")}
    no_bytes = Tokenizer.from_pretrained(_write(tmp_path / "no-bytes", {**gemma, "tokenizer.json": json.dumps(data)}))
    assert no_bytes.unknown_words(texts) == {"A Photo, of the CAT!": [",", "!"], "<unk> and </s> written out": [
        "</", ">"], "a 猫 photo 🙂🙂!": ["猫", "🙂🙂!"]}  # its 40 characters: no punctuation


# ----------------------------------------------------------------------------------------------- fuzzing

ALPHABET = "aAcCtT's .,!?-()\t\n\u00a0\u2581éÉ東😀<>/"
FUZZ_TEXTS = st.lists(st.text(ALPHABET, max_size=30) | st.sampled_from(["</s>", "<unk>", "<eos>", "<pad>", "CAT"]) |
                      st.text(max_size=12), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def fuzz_pairs(spiece_model, gemma_json, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    siglip = _write(root / "siglip", siglip_hub_files(spiece_model, model_input_names=["input_ids", "attention_mask"]))
    siglip2 = _write(root / "siglip2", gemma_files(gemma_json, model_type="siglip2"))
    return [(Tokenizer.from_pretrained(p), transformers.AutoTokenizer.from_pretrained(p)) for p in (siglip, siglip2)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=FUZZ_TEXTS, length=st.integers(2, 20))
def test_random_texts_match_transformers(fuzz_pairs, texts, length):
    texts = ["".join(texts[:i + 1]) for i in range(len(texts))]
    for ours, ref in fuzz_pairs:
        assert_same(ours(texts, max_length=length), reference(ref, texts, length))
