"""open_clip's HFTokenizer: the tokenizer of an open_clip directory whose text_cfg names an hf_tokenizer_name.

`open_clip.get_tokenizer("local-dir:" + directory)` then loads the directory's own tokenizer files with
transformers' AutoTokenizer, cleans each text first (open_clip's clean, "whitespace" unless tokenizer_kwargs
say otherwise), pads / truncates to text_cfg.context_length (77 where not given) and, with tokenizer_kwargs
strip_sep_token (CLIPA's), writes 0 where the separator token was. Beside open_clip's own text transformer (no
hf_model_name), which reads the ids alone, it gives input_ids only (no attention mask, no token types).

dualenc.Tokenizer.save_pretrained writes these settings into tokenizer_config.json as the dualenc-owned field
"dualenc_open_clip" ({"clean", "strip_sep_token", "context_length"}), beside model_input_names (["input_ids"]
where ids only) and model_max_length (the context length), so that the saved directory, read without an
open_clip_config.json, tokenizes as open_clip did. transformers' AutoTokenizer ignores that field: it loads the
wrapped tokenizer alone, which returns the listed model_input_names and pads / truncates to the context length
only when asked (padding="max_length", truncation=True), but does not clean texts (ftfy, HTML unescaping,
open_clip's whitespace / canonicalize rules), and keeps the separator that strip_sep_token writes as 0 (one
word fewer kept where a text is truncated): its ids differ from open_clip's wherever these do.
"""

from __future__ import annotations

import os
import threading
from typing import Mapping

from dualenc.errors import ConfigError
from dualenc.fields import check_int
from dualenc.files import read_json
from dualenc.processing.backends import CLIP_MAX_LENGTH, SANE_MAX_LENGTH, HoldsLock, tokenizers_module, unknown_spans
from dualenc.processing.clip_bpe import CLEAN_MODES, open_clip_cleaner
from dualenc.processing.text import encode_truncated

_OFF = (None, False, "")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")
SAVED_FIELD = "dualenc_open_clip"  # tokenizer_config.json's field for these settings (see the module docstring)
SAVED_KEYS = ("clean", "strip_sep_token", "context_length")


def settings(path: str) -> dict | None:
    """{"context_length", "clean", "strip_sep_token", "ids_only"} of an open_clip_config.json whose text_cfg
    names an hf_tokenizer_name; None where it names none (open_clip's SimpleTokenizer,
    dualenc.processing.clip_bpe.load_open_clip). ids_only: the text tower is open_clip's own, which reads the
    ids alone. For an NllbTokenizer also "src_lang" and "legacy_behaviour" (tokenizer_config.json's: see _nllb).
    tokenizer_kwargs language changes nothing: HFTokenizer.set_language calls the tokenizer's
    set_src_lang_special_tokens, which transformers' tokenizers undo at every call (they switch back to their
    src_lang), and only warns for the others. Refuses, naming the field, the HFTokenizer options not reproduced
    (tokenizer_mode, keyword arguments for AutoTokenizer)."""
    data = read_json(path, "open_clip config")
    model_cfg = data.get("model_cfg") if isinstance(data, Mapping) else None
    text_cfg = model_cfg.get("text_cfg", {}) if isinstance(model_cfg, Mapping) else None
    if not isinstance(text_cfg, Mapping) or not text_cfg.get("hf_tokenizer_name"):
        return None  # clip_bpe's reading of the config refuses what is malformed
    name = text_cfg["hf_tokenizer_name"]
    if not any(os.path.isfile(os.path.join(os.path.dirname(path), f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg.hf_tokenizer_name' = {name!r} is read as open_clip "
                          f"reads a local directory, from the directory's own tokenizer files, and it has none of "
                          f"{list(TOKENIZER_FILES)}")
    if text_cfg.get("tokenizer_mode") not in _OFF:
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg.tokenizer_mode' = {text_cfg['tokenizer_mode']!r} is "
                          f"not implemented; supported: [None]")
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg.tokenizer_kwargs' must be an object, got {kwargs!r:.80}")
    clean, strip_sep = "whitespace", False
    for key, value in kwargs.items():
        field = f"model_cfg.text_cfg.tokenizer_kwargs.{key}"
        if key == "clean" and value in CLEAN_MODES:
            clean = value
        elif key == "strip_sep_token" and isinstance(value, bool):
            strip_sep = value
        elif key != "language" or not (value in _OFF or isinstance(value, str)):
            raise ConfigError(f"{path}: field '{field}' = {value!r} is not implemented; supported: clean "
                              f"{list(CLEAN_MODES)}, strip_sep_token true or false, language (a code)")
    length = text_cfg.get("context_length", CLIP_MAX_LENGTH)
    check_int(path, "model_cfg.text_cfg.context_length", length, 2, SANE_MAX_LENGTH)
    return {"context_length": length, "clean": clean, "strip_sep_token": strip_sep,
            "ids_only": not text_cfg.get("hf_model_name"), **_nllb(os.path.dirname(path))}


NLLB_CLASSES = ("NllbTokenizer", "NllbTokenizerFast")


def _nllb(directory: str) -> dict:
    """{"src_lang", "legacy_behaviour"} of a directory whose tokenizer_config.json names an NllbTokenizer (else {}):
    transformers' NllbTokenizer sets its special tokens from src_lang ("eng_Latn" where not given) at every call,
    whatever tokenizer.json's post-processor says."""
    where = os.path.join(directory, "tokenizer_config.json")
    cfg = read_json(where, "tokenizer config") if os.path.isfile(where) else {}
    if not isinstance(cfg, Mapping) or cfg.get("tokenizer_class") not in NLLB_CLASSES:
        return {}
    code, legacy = cfg.get("src_lang") or "eng_Latn", cfg.get("legacy_behaviour", False)
    if not isinstance(code, str):
        raise ConfigError(f"{where}: field 'src_lang' must be a language code, got {code!r:.80}")
    if not isinstance(legacy, bool):
        raise ConfigError(f"{where}: field 'legacy_behaviour' must be true or false, got {legacy!r:.80}")
    return {"src_lang": code, "legacy_behaviour": legacy}


def set_language(backend, code: str, legacy: bool, eos: str | None, where: str) -> None:
    """NllbTokenizer.set_src_lang_special_tokens on a tokenizers.Tokenizer: the language code, the text, </s>
    ([the text, </s>, the code] with legacy_behaviour)."""
    lang, end = backend.token_to_id(code), backend.token_to_id(eos) if eos else None
    if lang is None or end is None:
        missing = code if lang is None else f"eos_token {eos!r}"
        raise ConfigError(f"{where}: field 'src_lang' = {code!r}: the tokenizer has no token {missing}")
    single = ["$A", eos, code] if legacy else [code, "$A", eos]
    pair = ["$A", "$B", eos, code] if legacy else [code, "$A", "$B", eos]
    backend.post_processor = tokenizers_module().processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=[(eos, end), (code, lang)])


def saved_settings(cfg: Mapping, where: str) -> dict | None:
    """settings() of a directory saved by dualenc.Tokenizer.save_pretrained: its tokenizer_config.json's
    SAVED_FIELD, ids_only where model_input_names is ["input_ids"]; None where the field is absent.

    Args:
      cfg: tokenizer_config.json's fields.
      where: the file, for errors.
    """
    saved = cfg.get(SAVED_FIELD)
    if saved is None:
        return None
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{where}: field '{SAVED_FIELD}' must be an object with {list(SAVED_KEYS)}, got "
                          f"{saved!r:.80}")
    for key in [*(k for k in saved if k not in SAVED_KEYS), *(k for k in SAVED_KEYS if k not in saved)]:
        problem = "is not a known key" if key in saved else "is missing"
        raise ConfigError(f"{where}: field '{SAVED_FIELD}.{key}' {problem}; expected {list(SAVED_KEYS)}")
    if saved["clean"] not in CLEAN_MODES:
        raise ConfigError(f"{where}: field '{SAVED_FIELD}.clean' must be one of {list(CLEAN_MODES)}, got "
                          f"{saved['clean']!r:.80}")
    if not isinstance(saved["strip_sep_token"], bool):
        raise ConfigError(f"{where}: field '{SAVED_FIELD}.strip_sep_token' must be true or false, got "
                          f"{saved['strip_sep_token']!r:.80}")
    check_int(where, f"{SAVED_FIELD}.context_length", saved["context_length"], 2, SANE_MAX_LENGTH)
    names = cfg.get("model_input_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}: field 'model_input_names' must be a list of names, got {names!r:.80}")
    return {**{k: saved[k] for k in SAVED_KEYS}, "ids_only": names == ["input_ids"]}


def saved_fields(encoder: "CleanedEncoder", model_input_names) -> dict:
    """The tokenizer_config.json fields that saved_settings reads back as `encoder`'s settings."""
    return {SAVED_FIELD: {k: encoder.settings[k] for k in SAVED_KEYS}, "model_input_names": list(model_input_names)}


class CleanedEncoder(HoldsLock):
    """HFTokenizer's encoding: each text cleaned, then the transformers tokenizer's ids, special tokens included,
    truncated to max_length. Called with (texts, max_length), as dualenc.Tokenizer's `encoder`."""

    def __init__(self, backend, clean: str, inner=None, truncation_side: str = "right", strip_id: int | None = None,
                 unk_token: str | None = None, *, settings: Mapping):
        """Args:
          backend: the directory's tokenizers.Tokenizer.
          clean: open_clip's clean mode (see clip_bpe.open_clip_cleaner).
          inner: the directory's own encoder where its tokenizer has one (SigLIP's SentencePiece), else None.
          truncation_side: "right" or "left".
          strip_id: an id written as 0 (HFTokenizer's strip_sep_token: the separator's), or None.
          unk_token: the unknown token (for unknown()).
          settings: the settings() it was made from, written back by save_pretrained (saved_fields).
        """
        self.settings = dict(settings)
        self._backend, self._inner, self._side, self._strip = backend, inner, truncation_side, strip_id
        self._unk = unk_token
        self._clean = open_clip_cleaner(clean)
        self._lock = threading.Lock()

    def __call__(self, texts: list[str], max_length: int) -> list[list[int]]:
        texts = [self._clean(t) for t in texts]
        if self._inner is not None:
            rows = self._inner(texts, max_length)
        else:
            rows = [e.ids for e in encode_truncated(self._backend, self._lock, texts, max_length, self._side,
                                                    "the tokenizer")]
        if self._strip is None:
            return rows
        return [[0 if i == self._strip else i for i in ids] for ids in rows]

    def unknown(self, texts: list[str], max_length: int) -> list[list[str]]:
        """Per text, the stretches of the cleaned text read as the unknown token (Tokenizer.unknown_words)."""
        texts = [self._clean(t) for t in texts]
        if self._inner is not None:
            return self._inner.unknown(texts, max_length)
        encodings = encode_truncated(self._backend, self._lock, texts, max_length, self._side, "the tokenizer")
        return unknown_spans(self._backend, texts, encodings, self._unk)


def wrap(backend, extra: dict, open_clip: dict, truncation_side: str,
         specials: Mapping[str, str]) -> tuple[dict, int]:
    """The Tokenizer keyword arguments of a directory's transformers tokenizer (`extra`) made open_clip's
    HFTokenizer: its cleaning encoder, its context length and, beside open_clip's own text tower, input_ids
    alone. specials: the tokenizer's special tokens by name (sep_token: strip_sep_token's). Returns (keyword
    arguments, the length limit)."""
    length = open_clip["context_length"]
    if open_clip.get("src_lang"):
        set_language(backend, open_clip["src_lang"], open_clip["legacy_behaviour"], specials.get("eos_token"),
                     "tokenizer_config.json")
    sep = specials.get("sep_token")
    strip = backend.token_to_id(sep) if open_clip["strip_sep_token"] and sep else None
    encoder = CleanedEncoder(backend, open_clip["clean"], extra.get("encoder"), truncation_side, strip,
                             specials.get("unk_token"), settings=open_clip)
    out = {**extra, "encoder": encoder, "default_max_length": length}
    if open_clip["ids_only"]:
        out["model_input_names"] = ("input_ids",)
    return out, length

