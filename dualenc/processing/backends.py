"""Tokenizer backends: transformers' BERT, RoBERTa, CLIP and Gemma (SigLIP 2) pipelines built in `tokenizers` from
vocabulary files, with special and added tokens resolved as transformers resolves them."""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any, Mapping, NamedTuple, Sequence

from dualenc.errors import ConfigError
from dualenc.files import read_json


class HoldsLock:
    """Picklable although it holds a `_lock` (grain sends tokenizers to its decoding workers): the lock is left out
    of the pickled state and made anew."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


DEFAULT_MAX_LENGTH = 64
CLIP_MAX_LENGTH = 77  # CLIP's context length, the default where the model's limit is unknown
# SigLIP and SigLIP 2 pool the last position and were trained on text padded to this length.
SIGLIP_MAX_LENGTH = 64
METASPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space
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
    "siglip": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
              "mask_token": "<mask>"},
}
FAMILY_SPECIALS["siglip2"] = FAMILY_SPECIALS["gemma"]
FAMILY_CLASSES = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer", "clip": "CLIPTokenizer",
                  "siglip": "SiglipTokenizer", "gemma": "GemmaTokenizer", "siglip2": "Siglip2Tokenizer"}
GEMMA_FAMILIES = ("gemma", "siglip2")  # Siglip2Tokenizer is GemmaTokenizer with lowercased text
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CLIP_INPUTS = ("input_ids", "attention_mask")  # transformers' CLIPTokenizer returns no token types
AS_IS_CLASS = "PreTrainedTokenizerFast"  # transformers loads tokenizer.json unchanged for this class
class ModelTypes(NamedTuple):
    """What processing needs to know of config.json model types (whole models: dualenc.kinds; towers: the
    registry)."""

    tokenizers: dict  # model type -> (the tokenizer family AutoTokenizer takes from the model where
    # tokenizer_config.json names no class, whether it does so whatever the file names): CLIP's, SigLIP's, and
    # Siglip2Tokenizer for a siglip2 model
    clip: tuple  # CLIP's
    siglip: tuple  # whose texts are padded to the text tower's length (SigLIP's): text_config's
    # max_position_embeddings is the tokenizer's limit
    text: tuple  # the others that hold a text tower, whose limit is that tower's max_length (read from the config)


@functools.cache
def model_types() -> ModelTypes:
    """The tables, made on first use: the tower registry (and jax with it) is imported only when a tokenizer
    directory is read, not when the tokenizer module is."""
    from dualenc import kinds, towers

    
    tokenizers = {**{f_type: (f.tokenizer, False) for f in towers.FAMILIES if f.tokenizer for f_type in f.configs},
                  **{t: (k.tokenizer, k.tokenizer_always) for t, k in kinds.KINDS.items() if k.tokenizer}}
    siglip = tuple(t for t, k in kinds.KINDS.items() if k.text_padding == "max_length")
    text = (*(t for t in kinds.KINDS if t not in siglip),
            *(t for t in towers.types("text") if towers.type_family(t).text_padding != "max_length"))
    return ModelTypes(tokenizers, tuple(t for t, (family, _) in tokenizers.items() if family == "clip"), siglip, text)


def tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("dualenc.Tokenizer needs the tokenizers library: pip install dualenc[processing]") from None
    return tokenizers


def tokenizer_family(tokenizer_class: Any) -> str | None:
    if tokenizer_class is None:
        return None
    name = str(tokenizer_class).removesuffix("Fast")
    for family, cls in FAMILY_CLASSES.items():
        if name == cls:
            return family
    return "other"


def flag(cfg: Mapping, key: str, default, where: str, nullable: bool = False):
    value = cfg.get(key, default)
    if not (isinstance(value, bool) or (nullable and value is None)):
        raise ConfigError(f"{where}: field '{key}' must be true or false{' or null' if nullable else ''}, "
                          f"got {value!r}")
    return value


def special_tokens(cfg: Mapping, family: str | None, specials_map: Mapping | None, where: str) -> dict:
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


def add_tokens(backend, cfg: Mapping, specials: Mapping, where: str) -> None:
    """Adds the config's added tokens, then any special token missing from the backend, as transformers does."""
    tk = tokenizers_module()
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


def unknown_spans(backend, texts: Sequence[str], encodings: Sequence, unk_token: str) -> list[list[str]]:
    """Per text, the stretches its `tokenizers` encoding reads as the unknown token, in order, each once.

    A position counts where it holds the unknown token's id, the post-processor did not add it (CLIP's unknown
    token is also its end of text token) and its text is not the unknown token itself written out (an added token
    matched in the text, before or after the normalizer). Touching positions make one stretch: a WordPiece word,
    or the characters a BPE or Unigram vocabulary lacks.

    Args:
      backend: the tokenizers.Tokenizer that gave `encodings`.
      texts: the encoded texts (offsets index them).
      encodings: one tokenizers.Encoding per text.
      unk_token: the unknown token's content.
    """
    unk_id = backend.token_to_id(unk_token)
    normalizer = backend.normalizer
    out = []
    for text, encoding in zip(texts, encodings):
        ids = encoding.ids
        if unk_id is None or unk_id not in ids:
            out.append([])
            continue
        stretches: list[list[int]] = []
        for index, special, (start, end) in zip(ids, encoding.special_tokens_mask, encoding.offsets):
            written = text[start:end].strip()
            if index != unk_id or special or written == unk_token or (
                    normalizer is not None and normalizer.normalize_str(written) == unk_token):
                continue
            if stretches and start <= stretches[-1][1]:
                stretches[-1][1] = max(stretches[-1][1], end)
            else:
                stretches.append([start, end])
        out.append(list(dict.fromkeys(text[start:end] for start, end in stretches if end > start)))
    return out


def build_wordpiece(vocab: dict, cfg: Mapping, specials: Mapping, where: str):
    """BERT's WordPiece tokenizer as transformers' BertTokenizer builds it from a vocabulary."""
    tk = tokenizers_module()
    unk = specials.get("unk_token", ("[UNK]", None))[0]
    backend = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=unk))
    backend.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=flag(cfg, "tokenize_chinese_chars", True, where),
        strip_accents=flag(cfg, "strip_accents", None, where, nullable=True),
        lowercase=flag(cfg, "do_lower_case", True, where))
    backend.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tk.decoders.WordPiece(prefix="##")
    add_tokens(backend, cfg, specials, where)
    cls, sep = specials.get("cls_token", ("[CLS]",))[0], specials.get("sep_token", ("[SEP]",))[0]
    cls_id, sep_id = backend.token_to_id(cls), backend.token_to_id(sep)
    backend.post_processor = tk.processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, 2 if cls_id is None else cls_id), (sep, 3 if sep_id is None else sep_id)])
    return backend


def build_bytelevel_bpe(vocab: dict, merges: list, cfg: Mapping, specials: Mapping, where: str):
    """RoBERTa's byte-level BPE tokenizer as transformers' RobertaTokenizer builds it from vocab and merges."""
    tk = tokenizers_module()
    add_prefix_space = flag(cfg, "add_prefix_space", False, where)
    trim_offsets = flag(cfg, "trim_offsets", True, where)
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = tk.decoders.ByteLevel()
    add_tokens(backend, cfg, specials, where)
    cls, sep = specials.get("cls_token", ("<s>",))[0], specials.get("sep_token", ("</s>",))[0]
    backend.post_processor = tk.processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)), (cls, backend.token_to_id(cls)), trim_offsets, add_prefix_space)
    return backend


def read_bpe_files(vocab_path: str, merges_path: str) -> tuple[dict, list]:
    """(vocab, merges) from a vocab.json and the merges.txt beside it."""
    if not os.path.isfile(merges_path):
        raise FileNotFoundError(f"BPE merges file not found: {merges_path} (beside vocab.json)")
    try:
        return tokenizers_module().models.BPE.read_file(vocab_path, merges_path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"BPE files {vocab_path} / {merges_path} cannot be read: {e}") from None


def read_tokenizer_json(path: str, model_type: str, what: str) -> tuple[dict, list | None, list, Any]:
    """(vocab, merges, added tokens, the raw "post_processor" section (see post_processor) or None) of a
    tokenizer.json holding a `model_type` model.

    Args:
      path: the tokenizer.json.
      model_type: "BPE" (merges are returned as pairs) or another model type (merges None).
      what: the tokenizer the file is read for, as errors name it.
    """
    data = read_json(path, "tokenizer file")
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("type") != model_type:
        got = model.get("type") if isinstance(model, Mapping) else model
        raise ConfigError(f"tokenizer file {path}: field 'model' must be a {model_type} model for {what}, "
                          f"got {got!r}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, Mapping) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                 for k, v in vocab.items()):
        raise ConfigError(f"tokenizer file {path}: field 'model.vocab' must map tokens to integer ids")
    pairs = None
    if model_type == "BPE":
        pairs = []
        for merge in merges if isinstance(merges, list) else [None]:
            pair = (tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) if isinstance(merge, list)
                    else ())
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ConfigError(f"tokenizer file {path}: field 'model.merges' must list pairs of tokens, got "
                                  f"{merge!r:.80}")
            pairs.append(pair)
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, Mapping) for t in added):
        raise ConfigError(f"tokenizer file {path}: field 'added_tokens' must be a list of objects")
    return dict(vocab), pairs, added, data.get("post_processor")


def post_processor(section: Any, where: str):
    """The `tokenizers` post-processor of a tokenizer.json's "post_processor" section (None for none)."""
    if section is None:
        return None
    shell = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": None, "post_processor": section, "decoder": None,
             "model": {"type": "BPE", "vocab": {}, "merges": []}}
    try:  # parsed by `tokenizers` itself, in an otherwise empty tokenizer
        return tokenizers_module().Tokenizer.from_str(json.dumps(shell)).post_processor
    except Exception as e:  # tokenizers raises a bare Exception for a malformed section
        raise ConfigError(f"{where}: field 'post_processor' cannot be used: {e}") from None


def added_tokens_from_file(cfg: Mapping, added: list) -> Mapping:
    """tokenizer_config.json's fields, with tokenizer.json's added tokens as its added_tokens_decoder where it lists
    none (transformers then takes them from tokenizer.json)."""
    if "added_tokens_decoder" in cfg:
        return cfg
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return {**cfg, "added_tokens_decoder": {t.get("id"): {k: t[k] for k in keys if k in t} for t in added}}


def build_gemma(vocab: dict, merges: list, post_processor, cfg: Mapping, specials: Mapping, where: str,
                lowercase: bool = False):
    """transformers' GemmaTokenizer pipeline (Siglip2Tokenizer's with `lowercase`) around a vocabulary and merges.

    As transformers (v5) does for these classes, only the BPE model's vocabulary and merges and the post-processor
    come from tokenizer.json: spaces become "\u2581", one BPE over the text with byte fallback, no dummy prefix.
    tokenizer_config.json's add_bos_token / add_eos_token are not read: transformers drops them where a
    tokenizer.json is present, so its post-processor alone adds <bos> / <eos> (SigLIP 2's appends <eos>).

    Args:
      vocab, merges: the BPE model ({token: id}, [(left, right)]).
      post_processor: a `tokenizers` post-processor, or None for none.
      cfg: tokenizer_config.json's fields (added_tokens_decoder, extra special tokens).
      specials: {name: (content, AddedToken properties or None)}, as special_tokens gives them.
      where: how errors name the files.
      lowercase: lowercase the text first (Siglip2Tokenizer: SigLIP 2 was trained on lowercased text).

    Returns:
      tokenizers.Tokenizer.
    """
    tk = tokenizers_module()
    unk = specials.get("unk_token", ("<unk>", None))[0]
    try:
        model = tk.models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, unk_token=unk,
                              byte_fallback=True)
    except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
        raise ConfigError(f"{where}: the BPE vocabulary and merges cannot be used: {e}") from None
    backend = tk.Tokenizer(model)
    spaces = tk.normalizers.Replace(" ", METASPACE)
    backend.normalizer = tk.normalizers.Sequence([tk.normalizers.Lowercase(), spaces]) if lowercase else spaces
    backend.pre_tokenizer = tk.pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    backend.decoder = tk.decoders.Sequence([tk.decoders.Replace(METASPACE, " "), tk.decoders.ByteFallback(),
                                            tk.decoders.Fuse()])
    add_tokens(backend, cfg, specials, where)
    if post_processor is not None:
        backend.post_processor = post_processor
    return backend
