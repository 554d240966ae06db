"""Tokenizer backends: transformers' BERT, RoBERTa and CLIP pipelines built in `tokenizers` from vocabulary files,
with special and added tokens resolved as transformers resolves them."""

from __future__ import annotations

import os
from typing import Any, Mapping

from dualenc.errors import ConfigError

DEFAULT_MAX_LENGTH = 64
CLIP_MAX_LENGTH = 77  # CLIP's context length, the default where the model's limit is unknown
# Above this a tokenizer_config's model_max_length is transformers' "no limit" sentinel, not a model limit.
SANE_MAX_LENGTH = 1 << 20
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FAMILY_SPECIALS = {
    "bert": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"},
    "clip": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"},
}
FAMILY_CLASSES = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer", "clip": "CLIPTokenizer"}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CLIP_INPUTS = ("input_ids", "attention_mask")  # transformers' CLIPTokenizer returns no token types
AS_IS_CLASS = "PreTrainedTokenizerFast"  # transformers loads tokenizer.json unchanged for this class
_CLIP_CONFIG_TYPES = ("clip", "clip_text_model")
_TEXT_CONFIG_TYPES = ("vision-text-dual-encoder", "bert", "roberta", "xlm-roberta", *_CLIP_CONFIG_TYPES)


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
    # As transformers: skip a special token only when an equal one (same content and properties) is already
    # listed; where two with the same content differ, `tokenizers` keeps the last one's properties.
    listed = set()
    for content, props in named + [(t, None) for t in extra if isinstance(t, str)]:
        key = (content, None if props is None else tuple(sorted(props.items())))
        if content not in present and key not in listed:
            added.append(tk.AddedToken(content, **{**(props or {}), "special": True}))
            listed.add(key)
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


def read_bpe_files(vocab_path: str, merges_path: str) -> tuple[dict, list]:
    """(vocab, merges) from a vocab.json and the merges.txt beside it."""
    if not os.path.isfile(merges_path):
        raise FileNotFoundError(f"BPE merges file not found: {merges_path} (beside vocab.json)")
    try:
        return _tokenizers().models.BPE.read_file(vocab_path, merges_path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"BPE files {vocab_path} / {merges_path} cannot be read: {e}") from None
