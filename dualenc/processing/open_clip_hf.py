"""open_clip's HFTokenizer: the tokenizer of an open_clip directory whose text_cfg names an hf_tokenizer_name.

`open_clip.get_tokenizer("local-dir:" + directory)` then loads the directory's own tokenizer files with
transformers' AutoTokenizer, cleans each text first (open_clip's clean, "whitespace" unless tokenizer_kwargs
say otherwise), pads / truncates to text_cfg.context_length (77 where not given) and, with tokenizer_kwargs
strip_sep_token (CLIPA's), writes 0 where the separator token was. Beside open_clip's own text transformer (no
hf_model_name), which reads the ids alone, it gives input_ids only (no attention mask, no token types).
"""

from __future__ import annotations

import os
import threading
from typing import Mapping

from dualenc.errors import ConfigError
from dualenc.fields import check_int
from dualenc.files import read_json
from dualenc.processing.backends import CLIP_MAX_LENGTH, SANE_MAX_LENGTH, HoldsLock, unknown_spans
from dualenc.processing.clip_bpe import CLEAN_MODES, open_clip_cleaner
from dualenc.processing.text import encode_truncated

_OFF = (None, False, "")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")


def settings(path: str) -> dict | None:
    """{"context_length", "clean", "strip_sep_token", "ids_only"} of an open_clip_config.json whose text_cfg
    names an hf_tokenizer_name; None where it names none (open_clip's SimpleTokenizer,
    dualenc.processing.clip_bpe.load_open_clip). ids_only: the text tower is open_clip's own, which reads the
    ids alone. Refuses, naming the field, the HFTokenizer options not reproduced (tokenizer_mode, language,
    keyword arguments for AutoTokenizer)."""
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
        elif key != "language" or value not in _OFF:
            raise ConfigError(f"{path}: field '{field}' = {value!r} is not implemented; supported: clean "
                              f"{list(CLEAN_MODES)}, strip_sep_token true or false")
    length = text_cfg.get("context_length", CLIP_MAX_LENGTH)
    check_int(path, "model_cfg.text_cfg.context_length", length, 2, SANE_MAX_LENGTH)
    return {"context_length": length, "clean": clean, "strip_sep_token": strip_sep,
            "ids_only": not text_cfg.get("hf_model_name")}


class CleanedEncoder(HoldsLock):
    """HFTokenizer's encoding: each text cleaned, then the transformers tokenizer's ids, special tokens included,
    truncated to max_length. Called with (texts, max_length), as dualenc.Tokenizer's `encoder`."""

    def __init__(self, backend, clean: str, inner=None, truncation_side: str = "right", strip_id: int | None = None,
                 unk_token: str | None = None):
        """Args:
          backend: the directory's tokenizers.Tokenizer.
          clean: open_clip's clean mode (see clip_bpe.open_clip_cleaner).
          inner: the directory's own encoder where its tokenizer has one (SigLIP's SentencePiece), else None.
          truncation_side: "right" or "left".
          strip_id: an id written as 0 (HFTokenizer's strip_sep_token: the separator's), or None.
          unk_token: the unknown token (for unknown()).
        """
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
    sep = specials.get("sep_token")
    strip = backend.token_to_id(sep) if open_clip["strip_sep_token"] and sep else None
    encoder = CleanedEncoder(backend, open_clip["clean"], extra.get("encoder"), truncation_side, strip,
                             specials.get("unk_token"))
    out = {**extra, "encoder": encoder, "default_max_length": length}
    if open_clip["ids_only"]:
        out["model_input_names"] = ("input_ids",)
    return out, length

