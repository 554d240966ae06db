"""Tokenizer directories: which tokenizer a directory's files make (transformers' BERT/RoBERTa/CLIP/Gemma/SigLIP 2
pipelines, SigLIP's SentencePiece, open_clip's) and the Tokenizer settings that go with it."""

from __future__ import annotations

import os
from typing import Any, Mapping

from dualenc.errors import ConfigError, InputError
from dualenc.files import read_json
from dualenc.layouts import OPEN_CLIP_CONFIG, is_open_clip_dir
from dualenc.processing import spiece
from dualenc.processing.backends import (
    CLIP_INPUTS, CLIP_MAX_LENGTH, FAMILY_CLASSES, GEMMA_FAMILIES, SANE_MAX_LENGTH, SIGLIP_MAX_LENGTH,
    add_tokens, model_types, tokenizer_family, flag,
    special_tokens, tokenizers_module, added_tokens_from_file, build_bytelevel_bpe, build_gemma, build_wordpiece, post_processor,
    read_bpe_files, read_tokenizer_json,
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
    types = model_types()
    if model_type in types.siglip:
        return _siglip_limit(os.path.join(directory, "config.json"), model_type)
    if model_type in types.text:
        from dualenc.config import config_from_dict  # the text tower's length rule, only when a model is read

        path = os.path.join(directory, "config.json")
        try:
            config = config_from_dict(read_json(path, "config"), where=path)
        except ConfigError:
            if model_type not in types.clip:
                raise
            config = None  # a CLIP config dualenc cannot read: the tokenizer's own limit stands
        limit = getattr(getattr(config, "text", config), "max_length", None)
        if isinstance(limit, int):
            return limit
    value = cfg.get("model_max_length")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= SANE_MAX_LENGTH:
        return value
    return None


def load_tokenizer_dir(path: str | os.PathLike) -> tuple[Any, dict]:
    """(backend, Tokenizer keyword arguments) for a directory of tokenizer files.

    An open_clip directory (open_clip_config.json and no config.json) gives open_clip's tokenizer; where both
    configs are present, config.json wins and the tokenizer files are read as transformers reads them. A
    tokenizer_config.json holding the open_clip settings dualenc saves (open_clip_hf.SAVED_FIELD) gives open_clip's
    HFTokenizer again.
    """
    tk = tokenizers_module()
    directory = os.fspath(path)
    if os.path.isfile(directory):  # a tokenizer.json or vocabulary file: its directory
        directory = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    config_path = os.path.join(directory, "config.json")
    has_config = os.path.isfile(config_path)
    open_clip = None
    if is_open_clip_dir(directory):
        from dualenc.processing import clip_bpe, open_clip_hf

        open_clip = open_clip_hf.settings(os.path.join(directory, OPEN_CLIP_CONFIG))
        if open_clip is None:
            return clip_bpe.load_open_clip(directory)
        # an hf_tokenizer_name: the directory's transformers tokenizer, as open_clip's HFTokenizer wraps it
    model_type = read_json(config_path, "config").get("model_type") if has_config else None
    files = {name: os.path.join(directory, name) for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
        "merges.txt")}
    exists = {name: os.path.isfile(p) for name, p in files.items()}
    cfg_where = files["tokenizer_config.json"]
    cfg = read_json(cfg_where, "tokenizer config") if exists["tokenizer_config.json"] else {}
    if open_clip is None:  # a directory dualenc saved from open_clip's HFTokenizer: the settings it wrote
        from dualenc.processing import open_clip_hf

        open_clip = open_clip_hf.saved_settings(cfg, cfg_where)
    specials_map = (read_json(files["special_tokens_map.json"], "special tokens map")
                    if exists["special_tokens_map.json"] else None)
    family = tokenizer_family(cfg.get("tokenizer_class"))
    own, always = model_types().tokenizers.get(model_type, (None, False)) if isinstance(model_type, str) else (None, False)
    if own is not None and (family is None or always):  # as AutoTokenizer: the model's own class
        family = own
    sides = {}
    for key in ("padding_side", "truncation_side"):
        # GemmaTokenizer and Siglip2Tokenizer pad on the left unless the config says otherwise
        sides[key] = cfg.get(key, "left" if key == "padding_side" and family in GEMMA_FAMILIES else "right")
        if sides[key] not in ("right", "left"):
            raise ConfigError(f"{cfg_where}: field '{key}' must be 'right' or 'left', got {sides[key]!r}")
    encode_specials = flag(cfg, "split_special_tokens", False, cfg_where)
    if family == "siglip":
        specials = special_tokens(cfg, family, specials_map, cfg_where)
        backend = spiece.load_siglip(directory, cfg, specials, cfg_where, truncation_side=sides["truncation_side"],
                                     split_special_tokens=encode_specials)
    elif family in GEMMA_FAMILIES:
        if not exists["tokenizer.json"]:
            raise FileNotFoundError(f"no tokenizer.json in {directory}: {FAMILY_CLASSES[family]} is read from "
                                    f"tokenizer.json")
        where = files["tokenizer.json"]
        vocab, merges, added, post = read_tokenizer_json(where, "BPE", f"a {FAMILY_CLASSES[family]}")
        post = post_processor(post, f"tokenizer file {where}")
        specials = special_tokens(cfg, family, specials_map, cfg_where)
        backend = build_gemma(vocab, merges, post, added_tokens_from_file(cfg, added), specials, where,
                              lowercase=family == "siglip2")
    elif family == "clip":
        from dualenc.processing import clip_bpe

        specials = special_tokens(cfg, "clip", specials_map, cfg_where)
        backend = clip_bpe.load_clip(files, exists, cfg, specials, cfg_where)
    elif exists["tokenizer.json"]:
        where = files["tokenizer.json"]
        try:
            backend = tk.Tokenizer.from_file(where)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"tokenizer file {where} cannot be loaded: {e}") from None
        specials = special_tokens(cfg, family, specials_map, cfg_where)
        add_tokens(backend, cfg, specials, cfg_where)
    elif exists["vocab.txt"] and family in (None, "bert"):
        specials = special_tokens(cfg, "bert", specials_map, cfg_where)
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
        specials = special_tokens(cfg, "roberta", specials_map, cfg_where)
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
    if open_clip is not None:
        extra, limit = open_clip_hf.wrap(backend, extra, open_clip, sides["truncation_side"],
                                         {name: content for name, (content, _) in specials.items()})
    if family != "siglip":
        backend.encode_special_tokens = encode_specials
    return backend, dict(
        pad_token=pad_token, model_max_length=limit, **sides, **extra,
        special_tokens={name: content for name, (content, _) in specials.items()},
        tokenizer_class=cfg.get("tokenizer_class") or FAMILY_CLASSES.get(family), where=directory)
