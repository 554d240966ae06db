"""Text into token ids: a `tokenizers` backend, loaded or built as transformers' fast BERT/RoBERTa/CLIP/Gemma
(SigLIP 2) tokenizers are, SigLIP's SentencePiece tokenizer (dualenc.processing.spiece), or open_clip's tokenizer
for an open_clip directory (dualenc.processing.clip_bpe)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from dualenc.config import load_config
from dualenc.files import is_open_clip_dir, read_json, write_json_atomic, write_text_atomic
from dualenc.errors import ConfigError, InputError
from dualenc.hub import resolve
from dualenc.processing import spiece
from dualenc.processing.backends import (
    AS_IS_CLASS, CLIP_INPUTS, CLIP_MAX_LENGTH, DEFAULT_MAX_LENGTH, FAMILY_CLASSES, FAMILY_SPECIALS, GEMMA_FAMILIES,
    METASPACE, MODEL_INPUTS, SANE_MAX_LENGTH, SIGLIP_MAX_LENGTH, SPECIAL_NAMES, _CLIP_CONFIG_TYPES, _SIGLIP_CONFIG_TYPES,
    _TEXT_CONFIG_TYPES, _add_tokens, _family, _flag, _special_tokens, _tokenizers, added_tokens_from_file,
    HoldsLock, build_bytelevel_bpe, build_gemma, build_wordpiece, post_processor, read_bpe_files,
    read_tokenizer_json,
)


def _siglip_limit(path: str, model_type: str) -> int:
    """A SigLIP / SigLIP 2 config.json's text length: text_config's max_position_embeddings (transformers' default,
    64, where it is not given)."""
    text = read_json(path, "config").get("text_config") or {}
    value = text.get("max_position_embeddings", SIGLIP_MAX_LENGTH) if isinstance(text, Mapping) else text
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SANE_MAX_LENGTH:
        raise ConfigError(f"{path}: field 'text_config.max_position_embeddings' of a {model_type} config must be an "
                          f"integer in [1, {SANE_MAX_LENGTH}], got {value!r}")
    return value


def _model_limit(directory: str, cfg: Mapping, model_type: Any) -> int | None:
    """The longest input the text tower takes: config.json's, else a sane tokenizer_config model_max_length."""
    if model_type in _SIGLIP_CONFIG_TYPES:
        return _siglip_limit(os.path.join(directory, "config.json"), model_type)
    if model_type in _TEXT_CONFIG_TYPES:
        try:
            config = load_config(os.path.join(directory, "config.json"))
        except ConfigError:
            if model_type not in _CLIP_CONFIG_TYPES:
                raise
            config = None  # a CLIP config dualenc cannot read: the tokenizer's own limit stands
        limit = getattr(getattr(config, "text", config), "max_length", None)
        if isinstance(limit, int):
            return limit
    value = cfg.get("model_max_length")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= SANE_MAX_LENGTH:
        return value
    return None


def _load(path: str | os.PathLike) -> tuple[Any, dict]:
    """(backend, Tokenizer keyword arguments) for a directory of tokenizer files.

    An open_clip directory (open_clip_config.json and no config.json) gives open_clip's tokenizer; where both
    configs are present, config.json wins and the tokenizer files are read as transformers reads them.
    """
    tk = _tokenizers()
    directory = os.fspath(path)
    if os.path.isfile(directory):  # a tokenizer.json or vocabulary file: its directory
        directory = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    config_path = os.path.join(directory, "config.json")
    has_config = os.path.isfile(config_path)
    if is_open_clip_dir(directory):
        from dualenc.processing import clip_bpe

        return clip_bpe.load_open_clip(directory)
    model_type = read_json(config_path, "config").get("model_type") if has_config else None
    files = {name: os.path.join(directory, name) for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
        "merges.txt")}
    exists = {name: os.path.isfile(p) for name, p in files.items()}
    cfg_where = files["tokenizer_config.json"]
    cfg = read_json(cfg_where, "tokenizer config") if exists["tokenizer_config.json"] else {}
    specials_map = (read_json(files["special_tokens_map.json"], "special tokens map")
                    if exists["special_tokens_map.json"] else None)
    family = _family(cfg.get("tokenizer_class"))
    if family is None and model_type in (*_CLIP_CONFIG_TYPES, "siglip"):  # as AutoTokenizer, the model's own class
        family = "clip" if model_type in _CLIP_CONFIG_TYPES else "siglip"
    if model_type == "siglip2":  # AutoTokenizer's Siglip2Tokenizer, whatever class the file names
        family = "siglip2"
    sides = {}
    for key in ("padding_side", "truncation_side"):
        # GemmaTokenizer and Siglip2Tokenizer pad on the left unless the config says otherwise
        sides[key] = cfg.get(key, "left" if key == "padding_side" and family in GEMMA_FAMILIES else "right")
        if sides[key] not in ("right", "left"):
            raise ConfigError(f"{cfg_where}: field '{key}' must be 'right' or 'left', got {sides[key]!r}")
    encode_specials = _flag(cfg, "split_special_tokens", False, cfg_where)
    if family == "siglip":
        specials = _special_tokens(cfg, family, specials_map, cfg_where)
        backend = spiece.load_siglip(directory, cfg, specials, cfg_where, truncation_side=sides["truncation_side"],
                                     split_special_tokens=encode_specials)
    elif family in GEMMA_FAMILIES:
        if not exists["tokenizer.json"]:
            raise FileNotFoundError(f"no tokenizer.json in {directory}: {FAMILY_CLASSES[family]} is read from "
                                    f"tokenizer.json")
        where = files["tokenizer.json"]
        vocab, merges, added, post = read_tokenizer_json(where, "BPE", f"a {FAMILY_CLASSES[family]}")
        post = post_processor(post, f"tokenizer file {where}")
        specials = _special_tokens(cfg, family, specials_map, cfg_where)
        backend = build_gemma(vocab, merges, post, added_tokens_from_file(cfg, added), specials, where,
                              lowercase=family == "siglip2")
    elif family == "clip":
        from dualenc.processing import clip_bpe

        specials = _special_tokens(cfg, "clip", specials_map, cfg_where)
        backend = clip_bpe.load_clip(files, exists, cfg, specials, cfg_where)
    elif exists["tokenizer.json"]:
        where = files["tokenizer.json"]
        try:
            backend = tk.Tokenizer.from_file(where)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"tokenizer file {where} cannot be loaded: {e}") from None
        specials = _special_tokens(cfg, family, specials_map, cfg_where)
        _add_tokens(backend, cfg, specials, cfg_where)
    elif exists["vocab.txt"] and family in (None, "bert"):
        specials = _special_tokens(cfg, "bert", specials_map, cfg_where)
        try:
            vocab = tk.models.WordPiece.read_file(files["vocab.txt"])
        except Exception as e:
            raise ConfigError(f"vocabulary {files['vocab.txt']} cannot be read: {e}") from None
        unk = specials.get("unk_token", ("[UNK]", None))[0]
        if unk not in vocab:
            raise ConfigError(f"vocabulary {files['vocab.txt']} lacks the unknown token {unk!r}")
        try:
            backend = build_wordpiece(vocab, cfg, specials, cfg_where)
        except Exception as e:  # tokenizers raises a bare Exception for an unusable vocabulary
            if isinstance(e, (ConfigError, InputError)):
                raise
            raise ConfigError(f"vocabulary {files['vocab.txt']} cannot be used: {e}") from None
    elif exists["vocab.json"] and family in (None, "roberta"):
        vocab, merges = read_bpe_files(files["vocab.json"], files["merges.txt"])
        specials = _special_tokens(cfg, "roberta", specials_map, cfg_where)
        try:
            backend = build_bytelevel_bpe(vocab, merges, cfg, specials, cfg_where)
        except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
            if isinstance(e, (ConfigError, InputError)):
                raise
            raise ConfigError(f"BPE files {files['vocab.json']} / {files['merges.txt']} cannot be used: {e}") from None
    elif family == "other":
        raise ConfigError(f"{cfg_where}: field 'tokenizer_class' = {cfg['tokenizer_class']!r} cannot be built "
                          f"from vocabulary files; supported: BertTokenizer (vocab.txt), RobertaTokenizer or "
                          f"CLIPTokenizer (vocab.json + merges.txt), or any class with a tokenizer.json")
    else:
        raise FileNotFoundError(f"no tokenizer files in {directory}: expected tokenizer.json, vocab.txt, "
                                f"or vocab.json + merges.txt")
    padding = getattr(backend, "padding", None)
    pad_token = specials.get("pad_token", (None,))[0] or (padding or {}).get("pad_token")
    limit = _model_limit(directory, cfg, model_type)
    if family == "clip":
        extra = dict(model_input_names=CLIP_INPUTS, default_max_length=limit or CLIP_MAX_LENGTH)
    elif family in ("siglip", *GEMMA_FAMILIES):
        names = cfg.get("model_input_names", CLIP_INPUTS)
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{cfg_where}: field 'model_input_names' must be a list of names, got {names!r:.80}")
        extra = dict(model_input_names=tuple(names), default_max_length=limit or SIGLIP_MAX_LENGTH)
        if family == "siglip":
            extra["encoder"] = backend
    else:
        extra = {}
    if family != "siglip":
        backend.encode_special_tokens = encode_specials
    return backend, dict(
        pad_token=pad_token, model_max_length=limit, **sides, **extra,
        special_tokens={name: content for name, (content, _) in specials.items()},
        tokenizer_class=cfg.get("tokenizer_class") or FAMILY_CLASSES.get(family), where=directory)


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
            backend, loaded = _load(backend)
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
        """The texts whose words the vocabulary maps to the unknown token: {text: [those words]} (empty when the
        tokenizer has no unknown token or knows every word)."""
        unk = self.unk_token_id
        if unk is None:
            return {}
        found = {}
        for text in texts:
            if unk in self([text], padding="longest")["input_ids"][0]:
                words = [w for w in text.split() if unk in self([w], padding="longest")["input_ids"][0]]
                found[text] = words or [text]
        return found

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
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        if not texts:
            raise InputError("texts is an empty list")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} must be a string, got {type(text).__name__}: {text!r:.80}")
        if padding is True:
            padding = "longest"
        if padding not in ("max_length", "longest"):
            raise InputError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        length = self.max_length if max_length is None else self._check_max_length(max_length)
        if self._encoder is not None:
            try:
                rows = [(ids, 1, 0) for ids in self._encoder(list(texts), length)]
            except ConfigError as e:
                raise ConfigError(f"tokenizer {self.where}: {e}") from None
        else:
            rows = [(e.ids, e.attention_mask, e.type_ids) for e in self._encode(list(texts), length)]
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

    def _encode(self, texts: list[str], length: int) -> list:
        """The backend's encodings, truncated to `length` with special tokens, unpadded."""
        target = dict(max_length=length, stride=0, strategy="longest_first", direction=self.truncation_side)
        with self._lock:
            current = self._backend.truncation
            if current is None or {k: current.get(k) for k in target} != target:
                self._backend.enable_truncation(**target)
            if self._backend.padding is not None:
                self._backend.no_padding()
            try:
                return self._backend.encode_batch(texts, add_special_tokens=True)
            except Exception as e:  # tokenizers raises a bare Exception when its files cannot encode a text
                raise ConfigError(f"tokenizer {self.where} cannot encode these texts: {e}") from None

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
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        if isinstance(self._backend, spiece.SiglipSentencePiece):
            config = {**self.special_tokens, "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                      "model_input_names": list(self.model_input_names)}
            if self.model_max_length is not None:
                config["model_max_length"] = self.model_max_length
            self._backend.save_pretrained(path, config)
            return
        if self._encoder is None:
            backend, special_tokens = self._backend, self.special_tokens
        else:
            from dualenc.processing import clip_bpe

            backend, special_tokens = clip_bpe.transformers_backend(self._backend), FAMILY_SPECIALS["clip"]
        data = self._backend_dict(backend)
        cfg = self._transformers_config(data, special_tokens)
        write_text_atomic(os.path.join(path, "tokenizer.json"), json.dumps(data, ensure_ascii=False, indent=2))
        write_json_atomic(os.path.join(path, "tokenizer_config.json"), cfg)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.where!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"model_max_length={self.model_max_length}, pad_token={self.pad_token!r})")
