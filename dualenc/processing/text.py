"""Text into token ids: a `tokenizers` backend, loaded or built as transformers' fast BERT/RoBERTa/CLIP/Gemma
(SigLIP 2) tokenizers are, SigLIP's SentencePiece tokenizer (dualenc.processing.spiece), or open_clip's tokenizer
for an open_clip directory (dualenc.processing.clip_bpe)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from dualenc.files import write_json_atomic, write_text_atomic
from dualenc.errors import ConfigError, InputError
from dualenc.hub import resolve
from dualenc.processing import spiece
from dualenc.processing.backends import (
    AS_IS_CLASS, DEFAULT_MAX_LENGTH, FAMILY_CLASSES, FAMILY_SPECIALS, GEMMA_FAMILIES, METASPACE, MODEL_INPUTS,
    SANE_MAX_LENGTH, SPECIAL_NAMES, HoldsLock, build_bytelevel_bpe, build_gemma, build_wordpiece, post_processor,
    unknown_spans,
)
from dualenc.processing.tokenizer_dirs import load_tokenizer_dir

CHARS_PER_TOKEN = 256  # a text is cut to this many characters per token kept before it is tokenized

def _bos_eos_flags(section: Any, special_tokens: Mapping[str, str]) -> dict:
    """add_bos_token / add_eos_token for tokenizer_config.json, where a post-processor adds just those tokens."""
    if section is None:
        return dict(add_bos_token=False, add_eos_token=False)
    if section.get("type") != "TemplateProcessing":
        return {}
    single = [None if "Sequence" in part else part.get("SpecialToken", {}).get("id") for part in section["single"]]
    bos, eos = [special_tokens.get("bos_token")], [special_tokens.get("eos_token")]
    if single.count(None) != 1 or single[:single.index(None)] not in ([], bos) or \
            single[single.index(None) + 1:] not in ([], eos):
        return {}
    return dict(add_bos_token=single[0] is not None, add_eos_token=single[-1] is not None)


class Tokenizer(HoldsLock):
    """Texts into padded int64 id arrays, identical to transformers' tokenizer on the same files.

    Build it with `Tokenizer.from_pretrained(path)` (or `Tokenizer(path)`), or around a `tokenizers.Tokenizer`.
    For an open_clip directory it gives open_clip's ids instead (see from_pretrained).

    SigLIP and SigLIP 2 tokenizers pad to 64 by default (the text model's max_position_embeddings where the
    directory's config.json gives it): their text towers pool the last position and were trained on text padded
    to that length, so ids must be padded to it ("max_length" padding, as their processors are used); "longest"
    padding or another length gives other embeddings.
    """

    def __init__(self, backend, *, max_length: int | None = None, pad_token: str | None = None,
                 model_max_length: int | None = None, special_tokens: Mapping[str, str] | None = None,
                 padding_side: str = "right", truncation_side: str = "right", tokenizer_class: str | None = None,
                 where: str | None = None, default_max_length: int | None = None,
                 model_input_names: Sequence[str] = MODEL_INPUTS, encoder=None):
        """Args:
          backend: a `tokenizers.Tokenizer`, or a directory to load as `from_pretrained` does.
          max_length: default length to pad and truncate to; at most model_max_length (default: default_max_length).
          pad_token: the padding token (default: special_tokens' pad_token, then "[PAD]" or "<pad>" if known).
          model_max_length: the longest input the text model takes (None: unknown).
          special_tokens: {"cls_token": "[CLS]", ...}, written back by save_pretrained.
          padding_side, truncation_side: "right" or "left".
          tokenizer_class: the transformers class named in tokenizer_config.json, if any.
          where: how errors name the tokenizer.
          default_max_length: the default length where max_length is not given (default: model_max_length
            capped at 64, or 64 where the limit is unknown; CLIP tokenizers load with their model's limit, 77
            where unknown, SigLIP / SigLIP 2 ones with their model's text length, 64 where unknown).
          model_input_names: the arrays __call__ returns, of "input_ids", "attention_mask", "token_type_ids".
          encoder: a function (texts, max_length) -> one list of ids per text, special tokens included and
            truncated, used instead of the backend's own encoding (open_clip's text cleaning, SigLIP's
            SentencePiece tokenizer).
        """
        if isinstance(backend, (str, os.PathLike)):
            backend, loaded = load_tokenizer_dir(backend)
            given = dict(pad_token=pad_token, model_max_length=model_max_length, special_tokens=special_tokens,
                         tokenizer_class=tokenizer_class, where=where, default_max_length=default_max_length)
            loaded.update({k: v for k, v in given.items() if v is not None})
            self.__init__(backend, max_length=max_length, **loaded)
            return
        self.model_input_names = names = tuple(model_input_names)
        if "input_ids" not in names or not set(names) <= set(MODEL_INPUTS):
            raise ConfigError(f"model_input_names must hold input_ids, of {list(MODEL_INPUTS)}, got {list(names)}")
        self._encoder = backend if encoder is None and isinstance(backend, spiece.SiglipSentencePiece) else encoder
        self._backend = backend
        self._lock = threading.Lock()
        self.where = where or "tokenizer"
        self.special_tokens = dict(special_tokens or {})
        self.tokenizer_class = tokenizer_class
        self.padding_side, self.truncation_side = padding_side, truncation_side
        pad_token = pad_token or self.special_tokens.get("pad_token")
        if pad_token is None:
            pad_token = next((t for t in ("[PAD]", "<pad>") if backend.token_to_id(t) is not None), None)
        if pad_token is None or backend.token_to_id(pad_token) is None:
            raise ConfigError(f"{self.where}: no padding token: pad_token {pad_token!r} is not in the vocabulary; "
                              f"set pad_token in tokenizer_config.json")
        self.pad_token = self.special_tokens["pad_token"] = pad_token
        if model_max_length is not None and (isinstance(model_max_length, bool) or not isinstance(
                model_max_length, int) or not 1 <= model_max_length <= SANE_MAX_LENGTH):
            raise ConfigError(f"{self.where}: model_max_length must be an integer in [1, {SANE_MAX_LENGTH}], "
                              f"got {model_max_length!r}")
        self.model_max_length = model_max_length
        if max_length is None and default_max_length is None:
            self.max_length = min(model_max_length or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        else:
            self.max_length = self._check_max_length(default_max_length if max_length is None else max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_length: int | None = None) -> "Tokenizer":
        """Loads tokenizer.json, else builds the tokenizer from vocab.txt, vocab.json + merges.txt or spiece.model.

        SiglipTokenizer (named by tokenizer_config.json, or by a "siglip" config.json where the file names no
        class) reads spiece.model with the sentencepiece library and gives SiglipTokenizer's ids: text
        lowercased (do_lower_case), ASCII punctuation removed, whitespace collapsed, "</s>" appended, padded with
        the pad token ("</s>" on the hub). GemmaTokenizer is built as transformers v5 builds it, from tokenizer.json's
        vocabulary, merges and post-processor; Siglip2Tokenizer, which transformers uses for any directory whose
        config.json is a "siglip2" one (the class the file names aside) and which SigLIP 2's processor therefore
        uses, is the same on lowercased text. SigLIP 2's tokenizer.json appends "<eos>" and adds no "<bos>".
        A GemmaTokenizer directory without a siglip2 config.json is not lowercased, as in transformers. These
        return input_ids and attention_mask, or the model_input_names tokenizer_config.json lists (the hub's
        SigLIP checkpoints list input_ids alone: the models were trained without a padding mask).

        CLIPTokenizer (named by tokenizer_config.json, or by a CLIP config.json) is built as transformers v5
        builds it, from tokenizer.json's vocabulary and merges or vocab.json + merges.txt; it returns no
        token_type_ids, and its default length is the model's limit (77 where unknown). A directory with an
        open_clip_config.json and no config.json gives open_clip's own tokenizer, ids identical to
        `open_clip.get_tokenizer` on it (see dualenc.processing.clip_bpe.load_open_clip; it needs ftfy and regex). Where
        both configs are present, config.json wins: the transformers tokenizer.

        Args:
          path: a directory holding the tokenizer files (and optionally the model's config.json, which sets the
            length limit), or a Hugging Face Hub model id (see dualenc.hub.resolve).
          max_length: overrides the default length (see Tokenizer).

        Returns:
          Tokenizer.
        """
        return cls(resolve(path), max_length=max_length)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (for SigLIP's tokenizer, a
        dualenc.processing.spiece.SiglipSentencePiece, which looks tokens up the same way)."""
        return self._backend

    @property
    def pad_token_id(self) -> int:
        return self._backend.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        """The unknown token's id, or None for a tokenizer without one (byte-level BPE never needs it)."""
        unk = self.special_tokens.get("unk_token")
        return None if unk is None else self._backend.token_to_id(unk)

    def unknown_words(self, texts: Sequence[str]) -> dict[str, list[str]]:
        """The texts the tokenizer reads partly as its unknown token: {text: [the stretches so read]}.

        Only what the model reads counts (each text truncated to max_length): a stretch is a WordPiece word the
        vocabulary lacks, or the characters a BPE, Unigram or SentencePiece vocabulary lacks (SigLIP's: of the
        canonicalised text). Special tokens the tokenizer adds (CLIP's end of text, which is also its unknown
        token) and the unknown token written in a text are not unknown words. Byte-level BPE over all 256 bytes
        (CLIP's, open_clip's, RoBERTa's, GPT-2's) and BPE with byte fallback (Gemma, SigLIP 2) read every text, so
        give none. The texts are encoded as one batch.

        Args:
          texts: a list of strings.

        Returns:
          {text: [stretches, in order, each once]} for the texts holding any (empty when none do).
        """
        texts = self._texts(texts, allow_empty=True)
        unk = self.special_tokens.get("unk_token")
        if not texts or unk is None or self._backend.token_to_id(unk) is None:
            return {}
        read = self._cut(texts, self.max_length)
        if self._encoder is None:
            rows = unknown_spans(self._backend, read, self._encode(read, self.max_length), unk)
        elif hasattr(self._encoder, "unknown"):
            rows = self._encoder.unknown(read, self.max_length)
        else:
            raise ConfigError(f"{self.where}: its encoder cannot tell which words it reads as the unknown token "
                              f"{unk!r} (it has no unknown(texts, max_length) method)")
        return {text: words for text, words in zip(texts, rows) if words}

    @staticmethod
    def _texts(texts, allow_empty: bool = False) -> list[str]:
        """`texts` (a string or a list of strings) as a list, checked."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        if not texts and not allow_empty:
            raise InputError("texts is an empty list")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} must be a string, got {type(text).__name__}: {text!r:.80}")
        return list(texts)

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included (transformers' len(tokenizer))."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _check_max_length(self, max_length) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
            raise InputError(f"max_length must be an integer, got {max_length!r}")
        max_length = int(max_length)
        specials = self._backend.num_special_tokens_to_add(False)
        if max_length < max(specials, 1):
            raise InputError(f"max_length {max_length} is too short: the tokenizer adds {specials} special tokens")
        if self.model_max_length is not None and max_length > self.model_max_length:
            raise InputError(f"max_length {max_length} is over the text model's limit of {self.model_max_length} "
                             f"tokens ({self.where})")
        if max_length > SANE_MAX_LENGTH:
            raise InputError(f"max_length {max_length} is over {SANE_MAX_LENGTH}")
        return max_length

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
                 padding: str | bool = "max_length") -> dict[str, np.ndarray]:
        """Tokenizes, truncates and pads like transformers' `tokenizer(texts, padding=..., truncation=True)`.

        Args:
          texts: a string or a list of strings.
          max_length: truncate to this many tokens, special tokens included (default: self.max_length).
          padding: "max_length" (pad every row to max_length) or "longest" (to the longest row; True also means it).

        Returns:
          {"input_ids", "attention_mask", "token_type_ids"} (those of model_input_names: CLIP tokenizers give no
          token_type_ids): (n_texts, length) int64 arrays.
        """
        texts = self._texts(texts)
        if padding is True:
            padding = "longest"
        if padding not in ("max_length", "longest"):
            raise InputError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        length = self.max_length if max_length is None else self._check_max_length(max_length)
        texts = self._cut(texts, length)
        if self._encoder is not None:
            try:
                rows = [(ids, 1, 0) for ids in self._encoder(texts, length)]
            except ConfigError as e:
                raise ConfigError(f"tokenizer {self.where}: {e}") from None
        else:
            rows = [(e.ids, e.attention_mask, e.type_ids) for e in self._encode(texts, length)]
        width = length if padding == "max_length" else max(len(ids) for ids, _, _ in rows)
        out = {"input_ids": np.full((len(texts), width), self.pad_token_id, np.int64),
               "attention_mask": np.zeros((len(texts), width), np.int64),
               "token_type_ids": np.zeros((len(texts), width), np.int64)}
        for row, (ids, mask, type_ids) in enumerate(rows):
            n = len(ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            out["input_ids"][row, cols] = ids
            out["attention_mask"][row, cols] = mask
            out["token_type_ids"][row, cols] = type_ids
        return {name: out[name] for name in self.model_input_names}

    def _cut(self, texts: list[str], length: int) -> list[str]:
        """The texts cut to CHARS_PER_TOKEN characters per token kept, on the side truncation drops: a caption of
        megabytes is not tokenized whole to keep `length` tokens. The tokens kept are the same unless the kept
        tokens would span more than that, which takes words of hundreds of characters."""
        limit = length * CHARS_PER_TOKEN
        if self.truncation_side == "left":
            return [t[-limit:] if len(t) > limit else t for t in texts]
        return [t[:limit] if len(t) > limit else t for t in texts]

    def _encode(self, texts: list[str], length: int) -> list:
        """The backend's encodings, truncated to `length` with special tokens, unpadded."""
        return encode_truncated(self._backend, self._lock, texts, length, self.truncation_side,
                                f"tokenizer {self.where}")

    # ------------------------------------------------------------------------------------------------ saving

    def _backend_dict(self, backend) -> dict:
        data = json.loads(backend.to_str())
        data["truncation"] = data["padding"] = None
        return data

    def _transformers_config(self, data: dict, special_tokens: Mapping[str, str]) -> dict:
        """tokenizer_config.json: the BERT/RoBERTa/CLIP/Gemma/SigLIP 2 class where transformers would rebuild this
        exact tokenizer."""
        added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                 "special")} for t in data.get("added_tokens", [])}
        base: dict[str, Any] = {**special_tokens, "added_tokens_decoder": added,
                                "padding_side": self.padding_side, "truncation_side": self.truncation_side}
        if self.model_max_length is not None:
            base["model_max_length"] = self.model_max_length
        as_is = {**base, "tokenizer_class": AS_IS_CLASS}
        model, norm = data.get("model") or {}, data.get("normalizer") or {}
        pre, post = data.get("pre_tokenizer") or {}, data.get("post_processor") or {}
        spaces = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}
        if model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>":
            family, flags = "clip", {}
        elif model.get("type") == "BPE" and model.get("byte_fallback") and norm in (
                spaces, {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, spaces]}):
            family = "gemma" if norm == spaces else "siglip2"
            flags = dict(_bos_eos_flags(data.get("post_processor"), special_tokens),
                         model_input_names=list(self.model_input_names))
        elif model.get("type") == "WordPiece" and norm.get("type") == "BertNormalizer":
            family = "bert"
            flags = dict(do_lower_case=norm.get("lowercase"), strip_accents=norm.get("strip_accents"),
                         tokenize_chinese_chars=norm.get("handle_chinese_chars"))
        elif model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and post.get("type") == "RobertaProcessing":
            family = "roberta"
            flags = dict(add_prefix_space=pre.get("add_prefix_space"), trim_offsets=post.get("trim_offsets"))
        else:
            return as_is
        cfg = {**FAMILY_SPECIALS[family], **base, **flags}
        specials = {name: (cfg[name], None) for name in SPECIAL_NAMES if name in cfg}
        # transformers rebuilds a BERT/RoBERTa/CLIP class from the vocabulary and these flags; keep the class
        # only where that rebuild is this very tokenizer, else let it load tokenizer.json unchanged.
        try:
            if family == "bert":
                rebuilt = build_wordpiece(dict(model["vocab"]), cfg, specials, "")
            else:
                merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
                if family == "clip":
                    from dualenc.processing import clip_bpe

                    rebuilt = clip_bpe.build_clip(dict(model["vocab"]), merges, cfg, specials, "")
                elif family in GEMMA_FAMILIES:
                    rebuilt = build_gemma(dict(model["vocab"]), merges, post_processor(data.get("post_processor"), ""),
                                          cfg, specials, "", lowercase=family == "siglip2")
                else:
                    rebuilt = build_bytelevel_bpe(dict(model["vocab"]), merges, cfg, specials, "")
        except Exception:  # noqa: BLE001 - anything tokenizers refuses is simply not rebuildable
            rebuilt = None
        if rebuilt is not None and json.loads(rebuilt.to_str()) == data:
            return {**cfg, "tokenizer_class": FAMILY_CLASSES[family]}
        return as_is

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json into `path` (created if missing; other files kept).

        transformers' AutoTokenizer loads the directory as an equivalent tokenizer. Each file is replaced
        atomically. SigLIP's tokenizer is written as spiece.model and tokenizer_config.json (SiglipTokenizer); a
        SigLIP 2 tokenizer as Siglip2Tokenizer, so that the directory lowercases without the model's config.json.
        An open_clip tokenizer is written as transformers' CLIPTokenizer on the same vocabulary, the
        form transformers' CLIP checkpoints take: transformers does not clean texts as open_clip does (ftfy,
        HTML unescaping) and pads with the end of text token, so its ids differ where those do; loading the
        files back beside an open_clip_config.json (and no config.json) gives open_clip's tokenizer again.
        open_clip's HFTokenizer (an open_clip directory naming an hf_tokenizer_name) is written as the tokenizer
        it wraps, with its cleaning, separator stripping, context length and input names in tokenizer_config.json
        (see dualenc.processing.open_clip_hf), which dualenc reads back as the same tokenizer and transformers
        as the wrapped one.
        """
        from dualenc.processing import clip_bpe, open_clip_hf

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        hf_tokenizer = open_clip_hf.saved_fields(self._encoder, self.model_input_names) \
            if isinstance(self._encoder, open_clip_hf.CleanedEncoder) else {}
        if isinstance(self._backend, spiece.SiglipSentencePiece):
            config = {**self.special_tokens, "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                      "model_input_names": list(self.model_input_names), **hf_tokenizer}
            if self.model_max_length is not None:
                config["model_max_length"] = self.model_max_length
            self._backend.save_pretrained(path, config)
            return
        if isinstance(self._encoder, clip_bpe.OpenClipEncoder):
            backend, special_tokens = clip_bpe.transformers_backend(self._backend), FAMILY_SPECIALS["clip"]
        else:  # open_clip's HFTokenizer too: the transformers tokenizer it wraps
            backend, special_tokens = self._backend, self.special_tokens
        data = self._backend_dict(backend)
        cfg = {**self._transformers_config(data, special_tokens), **hf_tokenizer}
        write_text_atomic(os.path.join(path, "tokenizer.json"), json.dumps(data, ensure_ascii=False, indent=2))
        write_json_atomic(os.path.join(path, "tokenizer_config.json"), cfg)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.where!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"model_max_length={self.model_max_length}, pad_token={self.pad_token!r})")


def encode_truncated(backend, lock, texts: list[str], length: int, side: str, who: str) -> list:
    """A tokenizers backend's encodings of `texts`, truncated to `length` on `side` with special tokens and
    unpadded; the backend's truncation settings are changed under `lock` (it is shared between threads)."""
    target = dict(max_length=length, stride=0, strategy="longest_first", direction=side)
    with lock:
        current = backend.truncation
        if current is None or {k: current.get(k) for k in target} != target:
            backend.enable_truncation(**target)
        if backend.padding is not None:
            backend.no_padding()
        try:
            return backend.encode_batch(texts, add_special_tokens=True)
        except Exception as e:  # tokenizers raises a bare Exception when its files cannot encode a text
            raise ConfigError(f"{who} cannot encode these texts: {e}") from None
