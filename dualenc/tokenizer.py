"""Text into token ids: a `tokenizers` backend, loaded or built as transformers' fast BERT/RoBERTa tokenizers are."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from dualenc.config import load_config, read_json
from dualenc.files import write_json_atomic, write_text_atomic
from dualenc.errors import ConfigError, InputError

DEFAULT_MAX_LENGTH = 64
# Above this a tokenizer_config's model_max_length is transformers' "no limit" sentinel, not a model limit.
SANE_MAX_LENGTH = 1 << 20
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FAMILY_SPECIALS = {
    "bert": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"},
}
FAMILY_CLASSES = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer"}
AS_IS_CLASS = "PreTrainedTokenizerFast"  # transformers loads tokenizer.json unchanged for this class
_TEXT_CONFIG_TYPES = ("vision-text-dual-encoder", "bert", "roberta", "xlm-roberta")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("dualenc.Tokenizer needs the tokenizers library: pip install dualenc[processing]") from None
    return tokenizers


def _family(tokenizer_class: Any) -> str | None:
    if tokenizer_class is None:
        return None
    name = str(tokenizer_class).removesuffix("Fast")
    for family, cls in FAMILY_CLASSES.items():
        if name == cls:
            return family
    return "other"


def _flag(cfg: Mapping, key: str, default, where: str, nullable: bool = False):
    value = cfg.get(key, default)
    if not (isinstance(value, bool) or (nullable and value is None)):
        raise ConfigError(f"{where}: field '{key}' must be true or false{' or null' if nullable else ''}, "
                          f"got {value!r}")
    return value


def _special_tokens(cfg: Mapping, family: str | None, specials_map: Mapping | None, where: str) -> dict:
    """{name: (content, AddedToken properties or None)} as transformers resolves them."""
    out = {k: (v, None) for k, v in FAMILY_SPECIALS.get(family, {}).items()}
    sources = [cfg] + ([specials_map] if specials_map is not None and "added_tokens_decoder" not in cfg else [])
    for source in sources:
        for name in SPECIAL_NAMES:
            if name not in source:
                continue
            value = source[name]
            if value is None:
                out.pop(name, None)
            elif isinstance(value, str):
                out[name] = (value, None)
            elif isinstance(value, Mapping) and isinstance(value.get("content"), str):
                props = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized")}
                out[name] = (value["content"], props)
            else:
                raise ConfigError(f"{where}: field '{name}' must be a string or an AddedToken object, got {value!r}")
    return out


def _add_tokens(backend, cfg: Mapping, specials: Mapping, where: str) -> None:
    """Adds the config's added tokens, then any special token missing from the backend, as transformers does."""
    tk = _tokenizers()
    added = []
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise ConfigError(f"{where}: field 'added_tokens_decoder' must be an object, got {type(decoder).__name__}")
    try:
        for _, props in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            props = {k: v for k, v in props.items() if k != "__type"}
            added.append(tk.AddedToken(**props))
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: field 'added_tokens_decoder' is invalid: {e}") from None
    present = {str(t.content) for t in backend.get_added_tokens_decoder().values()} | {t.content for t in added}
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, Mapping) else extra
    extra = [t if isinstance(t, str) else t.get("content") if isinstance(t, Mapping) else None for t in extra]
    named = [specials[n] for n in SPECIAL_NAMES if n in specials]
    for content, props in named + [(t, None) for t in extra if isinstance(t, str)]:
        if content not in present:
            added.append(tk.AddedToken(content, **{**(props or {}), "special": True}))
            present.add(content)
    if added:
        backend.add_tokens(added)


def build_wordpiece(vocab: dict, cfg: Mapping, specials: Mapping, where: str):
    """BERT's WordPiece tokenizer as transformers' BertTokenizer builds it from a vocabulary."""
    tk = _tokenizers()
    unk = specials.get("unk_token", ("[UNK]", None))[0]
    backend = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=unk))
    backend.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=_flag(cfg, "tokenize_chinese_chars", True, where),
        strip_accents=_flag(cfg, "strip_accents", None, where, nullable=True),
        lowercase=_flag(cfg, "do_lower_case", True, where))
    backend.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tk.decoders.WordPiece(prefix="##")
    _add_tokens(backend, cfg, specials, where)
    cls, sep = specials.get("cls_token", ("[CLS]",))[0], specials.get("sep_token", ("[SEP]",))[0]
    cls_id, sep_id = backend.token_to_id(cls), backend.token_to_id(sep)
    backend.post_processor = tk.processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, 2 if cls_id is None else cls_id), (sep, 3 if sep_id is None else sep_id)])
    return backend


def build_bytelevel_bpe(vocab: dict, merges: list, cfg: Mapping, specials: Mapping, where: str):
    """RoBERTa's byte-level BPE tokenizer as transformers' RobertaTokenizer builds it from vocab and merges."""
    tk = _tokenizers()
    add_prefix_space = _flag(cfg, "add_prefix_space", False, where)
    trim_offsets = _flag(cfg, "trim_offsets", True, where)
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = tk.decoders.ByteLevel()
    _add_tokens(backend, cfg, specials, where)
    cls, sep = specials.get("cls_token", ("<s>",))[0], specials.get("sep_token", ("</s>",))[0]
    backend.post_processor = tk.processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)), (cls, backend.token_to_id(cls)), trim_offsets, add_prefix_space)
    return backend


def _model_limit(directory: str, cfg: Mapping) -> int | None:
    """The longest input the text tower takes: config.json's, else a sane tokenizer_config model_max_length."""
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path) and read_json(config_path, "config").get("model_type") in _TEXT_CONFIG_TYPES:
        config = load_config(config_path)
        return (config.text if hasattr(config, "text") else config).max_length
    value = cfg.get("model_max_length")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= SANE_MAX_LENGTH:
        return value
    return None


def _load(path: str | os.PathLike) -> tuple[Any, dict]:
    """(backend, Tokenizer keyword arguments) for a directory of tokenizer files."""
    tk = _tokenizers()
    directory = os.fspath(path)
    if os.path.isfile(directory):  # a tokenizer.json or vocabulary file: its directory
        directory = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    files = {name: os.path.join(directory, name) for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
        "merges.txt")}
    exists = {name: os.path.isfile(p) for name, p in files.items()}
    cfg_where = files["tokenizer_config.json"]
    cfg = read_json(cfg_where, "tokenizer config") if exists["tokenizer_config.json"] else {}
    specials_map = (read_json(files["special_tokens_map.json"], "special tokens map")
                    if exists["special_tokens_map.json"] else None)
    family = _family(cfg.get("tokenizer_class"))
    if exists["tokenizer.json"]:
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
        if not exists["merges.txt"]:
            raise FileNotFoundError(f"BPE merges file not found: {files['merges.txt']} (beside vocab.json)")
        specials = _special_tokens(cfg, "roberta", specials_map, cfg_where)
        try:
            vocab, merges = tk.models.BPE.read_file(files["vocab.json"], files["merges.txt"])
        except Exception as e:
            raise ConfigError(f"BPE files {files['vocab.json']} / {files['merges.txt']} cannot be read: {e}") from None
        try:
            backend = build_bytelevel_bpe(vocab, merges, cfg, specials, cfg_where)
        except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
            if isinstance(e, (ConfigError, InputError)):
                raise
            raise ConfigError(f"BPE files {files['vocab.json']} / {files['merges.txt']} cannot be used: {e}") from None
    elif family == "other":
        raise ConfigError(f"{cfg_where}: field 'tokenizer_class' = {cfg['tokenizer_class']!r} cannot be built "
                          f"from vocabulary files; supported: BertTokenizer (vocab.txt), RobertaTokenizer "
                          f"(vocab.json + merges.txt), or any class with a tokenizer.json")
    else:
        raise FileNotFoundError(f"no tokenizer files in {directory}: expected tokenizer.json, vocab.txt, "
                                f"or vocab.json + merges.txt")
    padding = backend.padding
    pad_token = specials.get("pad_token", (None,))[0] or (padding or {}).get("pad_token")
    sides = {}
    for key in ("padding_side", "truncation_side"):
        sides[key] = cfg.get(key, "right")
        if sides[key] not in ("right", "left"):
            raise ConfigError(f"{cfg_where}: field '{key}' must be 'right' or 'left', got {sides[key]!r}")
    encode_specials = _flag(cfg, "split_special_tokens", False, cfg_where)
    backend.encode_special_tokens = encode_specials
    return backend, dict(
        pad_token=pad_token, model_max_length=_model_limit(directory, cfg), **sides,
        special_tokens={name: content for name, (content, _) in specials.items()},
        tokenizer_class=cfg.get("tokenizer_class"), where=directory)


class Tokenizer:
    """Texts into padded int64 id arrays, identical to transformers' fast tokenizer on the same files.

    Build it with `Tokenizer.from_pretrained(path)` (or `Tokenizer(path)`), or around a `tokenizers.Tokenizer`.
    """

    def __init__(self, backend, *, max_length: int | None = None, pad_token: str | None = None,
                 model_max_length: int | None = None, special_tokens: Mapping[str, str] | None = None,
                 padding_side: str = "right", truncation_side: str = "right", tokenizer_class: str | None = None,
                 where: str | None = None):
        """Args:
          backend: a `tokenizers.Tokenizer`, or a directory to load as `from_pretrained` does.
          max_length: default length to pad and truncate to; at most model_max_length. Default: model_max_length
            capped at 64 (64 where the limit is unknown).
          pad_token: the padding token (default: special_tokens' pad_token, then "[PAD]" or "<pad>" if known).
          model_max_length: the longest input the text model takes (None: unknown).
          special_tokens: {"cls_token": "[CLS]", ...}, written back by save_pretrained.
          padding_side, truncation_side: "right" or "left".
          tokenizer_class: the transformers class named in tokenizer_config.json, if any.
          where: how errors name the tokenizer.
        """
        if isinstance(backend, (str, os.PathLike)):
            backend, loaded = _load(backend)
            given = dict(pad_token=pad_token, model_max_length=model_max_length, special_tokens=special_tokens,
                         tokenizer_class=tokenizer_class, where=where)
            loaded.update({k: v for k, v in given.items() if v is not None})
            self.__init__(backend, max_length=max_length, **loaded)
            return
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
        default = min(model_max_length or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        self.max_length = default if max_length is None else self._check_max_length(max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_length: int | None = None) -> "Tokenizer":
        """Loads tokenizer.json, else builds the tokenizer from vocab.txt or vocab.json + merges.txt.

        Args:
          path: a directory holding the tokenizer files (and optionally the model's config.json, which sets the
            length limit).
          max_length: overrides the default length (see Tokenizer).

        Returns:
          Tokenizer.
        """
        return cls(path, max_length=max_length)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def pad_token_id(self) -> int:
        return self._backend.token_to_id(self.pad_token)

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
          {"input_ids", "attention_mask", "token_type_ids"}: (n_texts, length) int64 arrays.
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
        target = dict(max_length=length, stride=0, strategy="longest_first", direction=self.truncation_side)
        with self._lock:
            current = self._backend.truncation
            if current is None or {k: current.get(k) for k in target} != target:
                self._backend.enable_truncation(**target)
            if self._backend.padding is not None:
                self._backend.no_padding()
            try:
                encodings = self._backend.encode_batch(list(texts), add_special_tokens=True)
            except Exception as e:  # tokenizers raises a bare Exception when its files cannot encode a text
                raise ConfigError(f"tokenizer {self.where} cannot encode these texts: {e}") from None
        width = length if padding == "max_length" else max(len(e.ids) for e in encodings)
        out = {"input_ids": np.full((len(texts), width), self.pad_token_id, np.int64),
               "attention_mask": np.zeros((len(texts), width), np.int64),
               "token_type_ids": np.zeros((len(texts), width), np.int64)}
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            out["input_ids"][row, cols] = enc.ids
            out["attention_mask"][row, cols] = enc.attention_mask
            out["token_type_ids"][row, cols] = enc.type_ids
        return out

    # ------------------------------------------------------------------------------------------------ saving

    def _backend_dict(self) -> dict:
        data = json.loads(self._backend.to_str())
        data["truncation"] = data["padding"] = None
        return data

    def _transformers_config(self, data: dict) -> dict:
        """tokenizer_config.json: the BERT/RoBERTa class where transformers would rebuild this exact tokenizer."""
        added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                 "special")} for t in data.get("added_tokens", [])}
        base: dict[str, Any] = {**self.special_tokens, "added_tokens_decoder": added,
                                "padding_side": self.padding_side, "truncation_side": self.truncation_side}
        if self.model_max_length is not None:
            base["model_max_length"] = self.model_max_length
        as_is = {**base, "tokenizer_class": AS_IS_CLASS}
        model, norm = data.get("model") or {}, data.get("normalizer") or {}
        pre, post = data.get("pre_tokenizer") or {}, data.get("post_processor") or {}
        if model.get("type") == "WordPiece" and norm.get("type") == "BertNormalizer":
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
        # transformers rebuilds a BERT/RoBERTa class from the vocabulary and these flags; keep the class only
        # where that rebuild is this very tokenizer, else let it load tokenizer.json unchanged.
        try:
            if family == "bert":
                rebuilt = build_wordpiece(dict(model["vocab"]), cfg, specials, "")
            else:
                merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
                rebuilt = build_bytelevel_bpe(dict(model["vocab"]), merges, cfg, specials, "")
        except Exception:  # noqa: BLE001 - anything tokenizers refuses is simply not rebuildable
            rebuilt = None
        if rebuilt is not None and json.loads(rebuilt.to_str()) == data:
            return {**cfg, "tokenizer_class": FAMILY_CLASSES[family]}
        return as_is

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json into `path` (created if missing; other files kept).

        transformers' AutoTokenizer loads the directory as an equivalent fast tokenizer. Each file is replaced
        atomically.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        data = self._backend_dict()
        cfg = self._transformers_config(data)
        write_text_atomic(os.path.join(path, "tokenizer.json"), json.dumps(data, ensure_ascii=False, indent=2))
        write_json_atomic(os.path.join(path, "tokenizer_config.json"), cfg)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.where!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"model_max_length={self.model_max_length}, pad_token={self.pad_token!r})")
