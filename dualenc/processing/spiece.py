"""SigLIP's tokenizer: transformers' SiglipTokenizer (big_vision's text canonicalisation, a SentencePiece model, </s>
appended), run with the sentencepiece library on the directory's spiece.model.

Text goes through the same steps as in SiglipTokenizer: "\u2581" in the text becomes a space and one "\u2581" is
prepended; the text is cut at added and special tokens; every other piece is canonicalised (lowercased where
do_lower_case, ASCII punctuation removed, whitespace runs collapsed to one space, stripped) and encoded behind the
unknown token, whose pieces are then dropped (so the model's dummy prefix falls on the unknown token); </s> is
appended unless the ids already end with it. The .model file is a protobuf parsed by sentencepiece: nothing is
unpickled.
"""

from __future__ import annotations

import os
import re
import string
from typing import Any, Mapping, Sequence

from dualenc.errors import ConfigError
from dualenc.files import write_bytes_atomic, write_json_atomic
from dualenc.processing.backends import FAMILY_CLASSES, METASPACE, SPECIAL_NAMES, flag

SPIECE = "spiece.model"
MAX_MODEL_BYTES = 64 << 20
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")
_TOKEN_FIELDS = ("content", "lstrip", "rstrip", "single_word", "normalized", "special")


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("SigLIP's tokenizer needs the sentencepiece library: "
                          "pip install dualenc[processing]") from None
    return sentencepiece


def canonicalize(text: str, lowercase: bool = True) -> str:
    """big_vision's canonicalisation, as SiglipTokenizer applies it: lowercase, ASCII punctuation removed,
    whitespace runs to one space, stripped."""
    if lowercase:
        text = text.lower()
    return _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()


def read_model(path: str) -> tuple[Any, bytes]:
    """(sentencepiece.SentencePieceProcessor, the file's bytes) for a SentencePiece .model file."""
    spm = _sentencepiece()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MODEL_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"SentencePiece model not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"SentencePiece model {path} is a directory, not a file") from None
    if len(raw) >= MAX_MODEL_BYTES:
        raise ConfigError(f"SentencePiece model {path} is over {MAX_MODEL_BYTES >> 20} MiB; refusing it")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(raw)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"SentencePiece model {path} cannot be read: it is not a SentencePiece model, or it is "
                          f"truncated or corrupt ({str(e).strip()})") from None
    return processor, raw


class SiglipSentencePiece:
    """transformers' SiglipTokenizer on a SentencePiece model: a Tokenizer's backend and encoder at once.

    It looks tokens up as a `tokenizers.Tokenizer` does (token_to_id, id_to_token, get_vocab_size,
    num_special_tokens_to_add) and encodes texts as Tokenizer's `encoder` (texts, max_length) -> ids.
    """

    def __init__(self, processor, proto: bytes, *, specials: Mapping[str, tuple[str, Any]],
                 added_tokens_decoder: Mapping | None = None, extra_special_tokens: Sequence[str] = (),
                 do_lower_case: bool = True, truncation_side: str = "right", split_special_tokens: bool = False,
                 where: str = "SigLIP tokenizer"):
        """Args:
          processor: a sentencepiece.SentencePieceProcessor.
          proto: its serialized model (the spiece.model bytes), written back by save_pretrained.
          specials: {name: (content, AddedToken properties or None)}; needs eos_token and unk_token.
          added_tokens_decoder: tokenizer_config.json's {id: AddedToken fields}.
          extra_special_tokens: further special tokens (tokenizer_config's extra/additional_special_tokens).
          do_lower_case: lowercase texts before encoding.
          truncation_side: "right" or "left".
          split_special_tokens: encode special tokens in the text as plain text.
          where: how errors name the tokenizer.
        """
        self._sp, self._proto, self.where = processor, proto, where
        self.do_lower_case, self.truncation_side, self.split_special_tokens = (
            do_lower_case, truncation_side, split_special_tokens)
        for name in ("eos_token", "unk_token"):
            if name not in specials:
                raise ConfigError(f"{where}: SiglipTokenizer needs an {name}")
        self.specials = {name: content for name, (content, _) in specials.items()}
        self.extra_special_tokens = [t for t in extra_special_tokens if isinstance(t, str)]
        self._decoder: dict[int, dict] = {}
        for key, props in (added_tokens_decoder or {}).items():
            try:
                token = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": True, "special": False,
                         **{k: v for k, v in props.items() if k != "__type"}}
                index = int(key)
            except (TypeError, ValueError, AttributeError):
                raise ConfigError(f"{where}: field 'added_tokens_decoder' is invalid at {key!r}: "
                                  f"{props!r:.80}") from None
            if set(token) != set(_TOKEN_FIELDS) or not isinstance(token["content"], str) or index < 0:
                raise ConfigError(f"{where}: field 'added_tokens_decoder' is invalid at {key!r}: {props!r:.80}")
            self._decoder[index] = token
        self._encoder = {t["content"]: i for i, t in self._decoder.items()}
        # As transformers: special tokens not listed are added, at their piece's id or after the vocabulary.
        named = [self.specials[n] for n in SPECIAL_NAMES if n in self.specials] + self.extra_special_tokens
        for content in named:
            if content and content not in self._encoder:
                index = self._piece_id(content)
                if index is None:
                    index = self.get_vocab_size()
                self._decoder[index] = dict(content=content, lstrip=False, rstrip=False, single_word=False,
                                            normalized=False, special=True)
                self._encoder[content] = index
        if any(t["single_word"] for t in self._decoder.values()):
            raise ConfigError(f"{where}: single_word added tokens are not supported for SigLIP's tokenizer")
        self._special = set(named)
        tokens = sorted((t for t in self._encoder if t), key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        unk = self.specials["unk_token"]
        self._unk, self._unk_pieces = unk, len(processor.encode(unk, out_type=str))
        self.eos_id = self.token_to_id(self.specials["eos_token"])

    # ------------------------------------------------------------------------------- the tokenizers interface

    def _piece_id(self, token: str) -> int | None:
        index = self._sp.piece_to_id(token)
        return index if self._sp.id_to_piece(index) == token else None

    def token_to_id(self, token: str) -> int | None:
        return self._encoder[token] if token in self._encoder else self._piece_id(token)

    def id_to_token(self, index: int) -> str | None:
        if index in self._decoder:
            return self._decoder[index]["content"]
        return self._sp.id_to_piece(index) if 0 <= index < self._sp.get_piece_size() else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        """transformers' len(tokenizer): the pieces, and added tokens that are not pieces."""
        if not with_added_tokens:
            return self._sp.get_piece_size()
        return self._sp.get_piece_size() + sum(self._piece_id(t) is None for t in self._encoder)

    def num_special_tokens_to_add(self, is_pair: bool = False) -> int:
        return 2 if is_pair else 1

    # ----------------------------------------------------------------------------------------------- encoding

    def _chunks(self, text: str) -> list[tuple[str, bool]]:
        """(piece of text, is an added token), split as transformers' tokenize splits, empty pieces dropped."""
        text = METASPACE + text.replace(METASPACE, " ")
        if self.split_special_tokens or self._split is None:
            return [(text, False)]
        parts, start = [], 0
        for match in self._split.finditer(text):
            parts += [[text[start:match.start()], False], [match.group(), True]]
            start = match.end()
        parts = [p for p in parts + [[text[start:], False]] if p[0]]
        for i, (token, is_token) in enumerate(parts):
            if is_token:
                props = self._decoder[self._encoder[token]]
                if props["rstrip"] and i + 1 < len(parts):
                    parts[i + 1][0] = parts[i + 1][0].lstrip()
                if props["lstrip"] and i > 0:
                    parts[i - 1][0] = parts[i - 1][0].rstrip()
        return [(token, is_token) for token, is_token in parts if token]

    def _tokens(self, texts: Sequence[str]) -> list[list[tuple[str, int, bool]]]:
        """Each text's (piece or added token, id, is an added token), without </s> and untruncated."""
        chunked = [self._chunks(text) for text in texts]
        plain = [self._unk + canonicalize(chunk, self.do_lower_case)
                 for chunks in chunked for chunk, is_token in chunks if not is_token]
        encoded = iter(self._sp.encode(plain, out_type=str) if plain else [])
        rows = []
        for chunks in chunked:
            tokens = []
            for chunk, is_token in chunks:
                if is_token:
                    tokens.append((chunk, True))
                else:
                    pieces = next(encoded)
                    pieces = pieces[self._unk_pieces:] if len(pieces) >= self._unk_pieces else pieces
                    tokens += [(piece, False) for piece in pieces]
            if len(tokens) > 1 and tokens[0][0] == METASPACE and tokens[1][0] in self._special:
                tokens = tokens[1:]
            rows.append([(t, self._encoder[t] if t in self._encoder else self._sp.piece_to_id(t), is_token)
                         for t, is_token in tokens])
        return rows

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, without </s> and untruncated."""
        return [[index for _, index, _ in row] for row in self._tokens(texts)]

    def _truncate(self, row: list, max_length: int) -> list:
        """`row` cut so that with </s> it is at most max_length long, on the truncation side."""
        over = len(row) + 1 - max_length
        if over <= 0:
            return row
        return row[over:] if self.truncation_side == "left" else row[:-over]

    def __call__(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Each text's ids, truncated so that with </s> they are at most max_length, then </s> unless the ids
        already end with it (as SiglipTokenizer's build_inputs_with_special_tokens)."""
        rows = []
        for ids in self.encode(texts):
            ids = self._truncate(ids, max_length)
            rows.append(ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id])
        return rows

    def unknown(self, texts: Sequence[str], max_length: int) -> list[list[str]]:
        """Per text, the pieces of its canonicalised form that the model reads as the unknown token within the
        first max_length ids (SentencePiece keeps an unknown run of characters as one piece), in order, each once;
        the unknown token written in the text (an added token) does not count."""
        unk_id = self.token_to_id(self._unk)
        out = []
        for row in self._tokens(texts):
            pieces = (piece.replace(METASPACE, " ").strip() for piece, index, is_token
                      in self._truncate(row, max_length) if index == unk_id and not is_token)
            out.append(list(dict.fromkeys(p for p in pieces if p)))
        return out

    # ------------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, path: str, config: Mapping[str, Any]) -> None:
        """Writes spiece.model and tokenizer_config.json (SiglipTokenizer, with `config`'s fields) into `path`."""
        write_bytes_atomic(os.path.join(path, SPIECE), self._proto)
        decoder = {str(i): dict(self._decoder[i]) for i in sorted(self._decoder)}
        cfg = {**config, "tokenizer_class": FAMILY_CLASSES["siglip"], "do_lower_case": self.do_lower_case,
               "added_tokens_decoder": decoder, "extra_special_tokens": list(self.extra_special_tokens),
               "sp_model_kwargs": {}}
        if self.split_special_tokens:
            cfg["split_special_tokens"] = True
        write_json_atomic(os.path.join(path, "tokenizer_config.json"), cfg)


def load_siglip(directory: str, cfg: Mapping, specials: Mapping, cfg_where: str, *, truncation_side: str,
                split_special_tokens: bool) -> SiglipSentencePiece:
    """SigLIP's tokenizer from a directory's spiece.model and tokenizer_config.json fields."""
    if cfg.get("sp_model_kwargs") not in (None, {}):
        raise ConfigError(f"{cfg_where}: field 'sp_model_kwargs' = {cfg['sp_model_kwargs']!r} is not supported "
                          f"(sampling would make the ids random)")
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, Mapping) else extra
    if not isinstance(extra, list):
        raise ConfigError(f"{cfg_where}: field 'extra_special_tokens' must be a list, got {extra!r:.80}")
    extra = [t.get("content") if isinstance(t, Mapping) else t for t in extra]
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise ConfigError(f"{cfg_where}: field 'added_tokens_decoder' must be an object, got {type(decoder).__name__}")
    processor, proto = read_model(os.path.join(directory, SPIECE))
    return SiglipSentencePiece(
        processor, proto, specials=specials, added_tokens_decoder=decoder, extra_special_tokens=extra,
        do_lower_case=flag(cfg, "do_lower_case", True, cfg_where), truncation_side=truncation_side,
        split_special_tokens=split_special_tokens, where=cfg_where)
