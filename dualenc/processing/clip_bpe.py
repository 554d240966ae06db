"""CLIP's byte-level BPE tokenizers: transformers' CLIPTokenizer pipeline, and open_clip's SimpleTokenizer.

transformers' CLIPTokenizer is a `tokenizers` pipeline (NFC, whitespace runs to one space, lowercase, CLIP's word
split, byte-level, BPE with "</w>" word ends). open_clip's SimpleTokenizer cleans text in Python first (ftfy,
HTML unescaping, whitespace collapsing, lowercase) and splits words with the `regex` module; that part runs here
in Python, exactly as open_clip runs it, and only the BPE of each word runs in `tokenizers`.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import string
import sys
import threading
import zlib
from typing import Any, Callable, Mapping, Sequence

from dualenc.errors import ConfigError
from dualenc.fields import check_int
from dualenc.files import read_json
from dualenc.layouts import OPEN_CLIP_CONFIG
from dualenc.processing.backends import CLIP_MAX_LENGTH, FAMILY_SPECIALS, SANE_MAX_LENGTH, HoldsLock, add_tokens, \
    tokenizers_module, read_bpe_files, read_tokenizer_json

CLIP_SPECIALS = FAMILY_SPECIALS["clip"]
BOS, EOS = CLIP_SPECIALS["bos_token"], CLIP_SPECIALS["eos_token"]
WORD_END = "</w>"
# transformers' CLIPTokenizer keeps the matches of this pattern as words and drops everything between them.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# open_clip's pattern (compiled case-insensitively): its own names for the two special tokens.
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
OPEN_CLIP_SPLIT = "|".join(OPEN_CLIP_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
# open_clip reads this many merges from the .gz file; with 2 x 256 byte symbols and 2 specials, 49408 ids.
NUM_MERGES = 49152 - 256 - 2
MAX_GZ_BYTES = 64 << 20
CACHE_LIMIT = 1 << 17
CLEAN_MODES = ("lower", "whitespace", "canonicalize")


def _ftfy():
    try:
        import ftfy
    except ImportError:
        raise ImportError("open_clip's tokenizer needs the ftfy library: pip install ftfy") from None
    return ftfy


def _regex():
    try:
        import regex
    except ImportError:
        raise ImportError("open_clip's tokenizer needs the regex library: pip install regex") from None
    return regex


def byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen...) are shifted to
    U+0100 and up, in byte order, so that no symbol is whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


# ------------------------------------------------------------------------------------------ vocabulary files


def read_bpe_gz(path: str) -> tuple[dict, list]:
    """(vocab, merges) from open_clip's bpe_simple_vocab_16e6.txt.gz, laid out as OpenAI's vocab.json.

    Ids as open_clip assigns them: the byte symbols, the same with "</w>", one per merge, then the start and
    end of text tokens (named "<|startoftext|>" / "<|endoftext|>" as in transformers' files).
    """
    try:
        with gzip.open(path) as f:
            raw = f.read(MAX_GZ_BYTES)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"BPE vocabulary not found: {path}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ConfigError(f"BPE vocabulary {path} cannot be read: {e}") from None
    if len(raw) >= MAX_GZ_BYTES:
        raise ConfigError(f"BPE vocabulary {path} is over {MAX_GZ_BYTES >> 20} MiB uncompressed; refusing it")
    merges = []
    for number, line in enumerate(text.split("\n")[1:NUM_MERGES + 1], start=2):
        parts = tuple(line.split())
        if len(parts) != 2:
            raise ConfigError(f"BPE vocabulary {path}: line {number} is not a merge of two symbols: {line!r:.80}")
        merges.append(parts)
    symbols = byte_symbols()
    tokens = symbols + [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError(f"BPE vocabulary {path}: merges repeat a token, so ids would not be open_clip's")
    return vocab, merges


def build_clip(vocab: dict, merges: list, cfg: Mapping, specials: Mapping, where: str):
    """transformers' CLIPTokenizer pipeline around a vocabulary and merges, with the config's added tokens.

    Args:
      vocab, merges: the BPE model ({token: id}, [(left, right)]).
      cfg: tokenizer_config.json's fields (added_tokens_decoder, extra special tokens).
      specials: {name: (content, AddedToken properties or None)}, as tokenizer.special_tokens gives them.
      where: how errors name the files.

    Returns:
      tokenizers.Tokenizer.
    """
    tk = tokenizers_module()
    unk = specials.get("unk_token", (EOS,))[0]
    try:
        model = tk.models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix=WORD_END, fuse_unk=False, unk_token=unk)
    except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
        raise ConfigError(f"{where}: the BPE vocabulary and merges cannot be used: {e}") from None
    backend = tk.Tokenizer(model)
    backend.normalizer = tk.normalizers.Sequence([
        tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Lowercase()])
    backend.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(CLIP_SPLIT), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = tk.decoders.ByteLevel()
    add_tokens(backend, cfg, specials, where)
    bos, eos = specials.get("bos_token", (BOS,))[0], specials.get("eos_token", (EOS,))[0]
    ids = {token: backend.token_to_id(token) for token in (bos, eos)}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"{where}: the CLIP vocabulary lacks the special token(s) {missing}")
    backend.post_processor = tk.processors.RobertaProcessing((eos, ids[eos]), (bos, ids[bos]), trim_offsets=False,
                                                             add_prefix_space=False)
    return backend


def load_clip(files: Mapping[str, str], exists: Mapping[str, bool], cfg: Mapping, specials: Mapping,
              cfg_where: str):
    """transformers' CLIPTokenizer from tokenizer.json (its vocabulary and merges) or vocab.json + merges.txt.

    As transformers does for this class, a tokenizer.json gives only its BPE model and, where tokenizer_config
    lists no added_tokens_decoder, its added tokens; the pipeline around them is always CLIP's.
    """
    if exists["tokenizer.json"]:
        vocab, merges, added, _ = read_tokenizer_json(files["tokenizer.json"], "BPE", "a CLIP tokenizer")
        where = files["tokenizer.json"]
        if "added_tokens_decoder" not in cfg:
            keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
            cfg = {**cfg, "added_tokens_decoder": {t.get("id"): {k: t[k] for k in keys if k in t} for t in added}}
    elif exists["vocab.json"]:
        vocab, merges = read_bpe_files(files["vocab.json"], files["merges.txt"])
        where = f"{files['vocab.json']} / {files['merges.txt']}"
    else:
        raise FileNotFoundError(f"no CLIP tokenizer files beside {cfg_where}: expected tokenizer.json, or "
                                f"vocab.json + merges.txt")
    return build_clip(vocab, merges, cfg, specials, where)


# ------------------------------------------------------------------------------------------- open_clip


def _basic_clean(ftfy, text: str) -> str:
    """open_clip's basic_clean: ftfy.fix_text, HTML unescaped twice, stripped."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _collapse(text: str) -> str:
    """Runs of whitespace (str.split's) to one space, none at the ends."""
    return " ".join(text.split())


def _canonicalize(text: str) -> str:
    """open_clip's canonicalize_text: underscores to spaces, ASCII punctuation removed, lowercased, collapsed."""
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return _collapse(text)


def open_clip_cleaner(mode: str = "lower") -> Callable[[str], str]:
    """open_clip's text cleaning `clean=mode`: ftfy.fix_text, HTML unescaped twice, stripped, then per mode.

    "lower": whitespace runs collapsed to one space, lowercased; "whitespace": collapsed only; "canonicalize":
    underscores to spaces, ASCII punctuation removed, lowercased, collapsed.
    """
    return _Cleaner(mode)


def _lower(text: str) -> str:
    return _collapse(text).lower()


_AFTER_CLEAN = {"lower": _lower, "whitespace": _collapse, "canonicalize": _canonicalize}


class _Cleaner:
    """open_clip_cleaner's function: picklable (a tokenizer goes to grain's decoding workers), so it holds the mode
    and not the ftfy module."""

    def __init__(self, mode: str):
        self._after = _AFTER_CLEAN[mode]
        _ftfy()  # a missing ftfy is an error now, not at the first text

    def __call__(self, text: str) -> str:
        return self._after(_basic_clean(_ftfy(), text))


class OpenClipEncoder(HoldsLock):
    """open_clip's SimpleTokenizer encoding: Python cleaning and word split, each new word's BPE in `tokenizers`.

    Called with (texts, max_length) it returns one id list per text: start of text, the words' BPE ids, end of
    text, where too long the first max_length kept and the last forced to end of text (open_clip's truncation).
    """

    def __init__(self, backend, sot_id: int, eot_id: int, clean: str = "lower"):
        """Args:
          backend: a tokenizers.Tokenizer holding CLIP's BPE model behind a byte-level pre-tokenizer (no regex).
          sot_id, eot_id: the start and end of text ids.
          clean: open_clip's clean mode (see open_clip_cleaner).
        """
        regex = _regex()
        self.clean = open_clip_cleaner(clean)
        self._pattern = regex.compile(OPEN_CLIP_SPLIT, regex.IGNORECASE)
        self._backend = backend
        self.sot_id, self.eot_id = sot_id, eot_id
        # As open_clip, only these exact words (not their case variants) are the special tokens.
        self._seed = {OPEN_CLIP_SPECIALS[0]: [sot_id], OPEN_CLIP_SPECIALS[1]: [eot_id]}
        self._cache = dict(self._seed)
        self._lock = threading.Lock()

    def words(self, text: str) -> list[str]:
        """The words open_clip's SimpleTokenizer splits `text` into, after cleaning."""
        return self._pattern.findall(self.clean(text))

    def __call__(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """One list of ids per text (see the class); max_length counts the two special tokens."""
        words = [self.words(text) for text in texts]
        unique = dict.fromkeys(w for row in words for w in row)
        with self._lock:
            new = [w for w in unique if w not in self._cache]
            if len(self._cache) + len(new) > CACHE_LIMIT:
                self._cache = dict(self._seed)
                new = [w for w in unique if w not in self._cache]
            if new:
                backend = self._backend
                if backend.truncation is not None:
                    backend.no_truncation()
                if backend.padding is not None:
                    backend.no_padding()
                try:
                    encodings = backend.encode_batch(new, add_special_tokens=False)
                except Exception as e:  # tokenizers raises a bare Exception when its model cannot encode a word
                    raise ConfigError(f"the BPE vocabulary cannot encode these texts: {e}") from None
                self._cache.update(zip(new, (e.ids for e in encodings)))
            cache = self._cache
            ids = [[i for w in row for i in cache[w]] for row in words]
        return [[self.sot_id, *row[:max_length - 2], self.eot_id] for row in ids]


def open_clip_backend(vocab: dict, merges: list, where: str):
    """The tokenizers.Tokenizer behind OpenClipEncoder: CLIP's BPE on byte symbols, start/end of text around."""
    tk = tokenizers_module()
    symbols = byte_symbols()
    missing = [s for s in symbols + [s + WORD_END for s in symbols] if s not in vocab]
    if missing:
        raise ConfigError(f"{where}: not a CLIP byte-level vocabulary: it lacks {len(missing)} of the 512 byte "
                          f"symbols, e.g. {missing[:3]}")
    specials = [t for t in (BOS, EOS) if t not in vocab]
    if specials:
        raise ConfigError(f"{where}: the vocabulary lacks the special token(s) {specials}")
    try:
        model = tk.models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix=WORD_END, fuse_unk=False)
    except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
        raise ConfigError(f"{where}: the BPE vocabulary and merges cannot be used: {e}") from None
    backend = tk.Tokenizer(model)
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tk.decoders.ByteLevel()
    backend.post_processor = tk.processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return backend


def _package_bpe() -> str | None:
    """The bpe_simple_vocab_16e6.txt.gz inside the installed open_clip package, found without importing it."""
    for entry in sys.path:  # where Python would find the package; nothing of it is imported or run
        path = os.path.join(entry or os.curdir, "open_clip", BPE_GZ)
        if os.path.isfile(path):
            return path
    return None


def open_clip_text_cfg(path: str) -> dict:
    """The tokenizer settings of an open_clip_config.json: {"context_length", "vocab_size", "clean"}.

    Refuses, naming the field, whatever would make open_clip use another tokenizer than SimpleTokenizer (an
    hf_tokenizer_name) or change SimpleTokenizer in a way not reproduced here.
    """
    data = read_json(path, "open_clip config")
    model_cfg = data.get("model_cfg")
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"{path}: field 'model_cfg' must be an object, got {model_cfg!r:.80}")
    text_cfg = model_cfg.get("text_cfg", {})
    if not isinstance(text_cfg, Mapping):
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg' must be an object, got {text_cfg!r:.80}")
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:  # open_clip then uses its HFTokenizer, with its own cleaning
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg.hf_tokenizer_name' = {hf_name!r} is not "
                          f"implemented: dualenc reproduces open_clip's SimpleTokenizer (no hf_tokenizer_name) only")
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{path}: field 'model_cfg.text_cfg.tokenizer_kwargs' must be an object, got {kwargs!r:.80}")
    clean = "lower"
    for key, value in kwargs.items():
        field = f"model_cfg.text_cfg.tokenizer_kwargs.{key}"
        if key == "clean" and value in CLEAN_MODES:
            clean = value
        elif key == "clean":
            raise ConfigError(f"{path}: field '{field}' = {value!r} is not implemented; supported: {list(CLEAN_MODES)}")
        elif key in ("reduction_mask", "additional_special_tokens") and not value:  # open_clip's defaults
            continue
        else:
            raise ConfigError(f"{path}: field '{field}' = {value!r} is not implemented; supported: clean "
                              f"{list(CLEAN_MODES)}, and reduction_mask / additional_special_tokens left empty")
    out = {"context_length": text_cfg.get("context_length", CLIP_MAX_LENGTH),
           "vocab_size": text_cfg.get("vocab_size", 49408), "clean": clean}
    for key, lo in (("context_length", 2), ("vocab_size", 1)):
        check_int(path, f"model_cfg.text_cfg.{key}", out[key], lo, SANE_MAX_LENGTH)
    return out


def load_open_clip(directory: str) -> tuple[Any, dict]:
    """(backend, Tokenizer keyword arguments) reproducing open_clip's tokenizer for an open_clip directory.

    What `open_clip.get_tokenizer("local-dir:" + directory)` builds when text_cfg names no hf_tokenizer_name:
    SimpleTokenizer, whose ids are reproduced exactly: ftfy, HTML unescaped twice, whitespace collapsed,
    lowercased (text_cfg.tokenizer_kwargs.clean may choose open_clip's other modes), its word split, then the
    BPE; padded with id 0 (attention_mask 0 there; open_clip itself gives no mask), a truncated row ending with
    the end of text token; text_cfg.context_length is the default length and the limit. The vocabulary:
    vocab.json + merges.txt in the directory, else its tokenizer.json, else a bpe_simple_vocab_16e6.txt.gz in
    it, else the one in the installed open_clip package. Other text_cfg settings that change the tokenizer
    (hf_tokenizer_name, other tokenizer_kwargs, a vocab_size the vocabulary does not have) raise ConfigError.

    Args:
      directory: the directory holding open_clip_config.json.

    Returns:
      (tokenizers.Tokenizer with the BPE only, {Tokenizer keyword: value}).
    """
    config_path = os.path.join(directory, OPEN_CLIP_CONFIG)
    settings = open_clip_text_cfg(config_path)
    names = {n: os.path.join(directory, n) for n in ("vocab.json", "merges.txt", "tokenizer.json", BPE_GZ)}
    if os.path.isfile(names["vocab.json"]):
        vocab, merges = read_bpe_files(names["vocab.json"], names["merges.txt"])
        where = f"{names['vocab.json']} / {names['merges.txt']}"
    elif os.path.isfile(names["tokenizer.json"]):
        vocab, merges, _, _ = read_tokenizer_json(names["tokenizer.json"], "BPE", "a CLIP tokenizer")
        where = names["tokenizer.json"]
    else:
        where = names[BPE_GZ] if os.path.isfile(names[BPE_GZ]) else _package_bpe()
        if where is None:
            raise FileNotFoundError(
                f"no vocabulary for the open_clip tokenizer in {directory}: add vocab.json + merges.txt (open_clip's "
                f"hub files) or {BPE_GZ}, or install open_clip (pip install open-clip-torch), which ships it")
        vocab, merges = read_bpe_gz(where)
    if len(vocab) != settings["vocab_size"]:
        raise ConfigError(f"{config_path}: field 'model_cfg.text_cfg.vocab_size' = {settings['vocab_size']} does "
                          f"not match the {len(vocab)} tokens of the vocabulary {where}")
    backend = open_clip_backend(vocab, merges, where)
    encoder = OpenClipEncoder(backend, vocab[BOS], vocab[EOS], settings["clean"])
    length = settings["context_length"]
    return backend, dict(
        pad_token=backend.id_to_token(0), model_max_length=length, default_max_length=length,
        special_tokens={"bos_token": BOS, "eos_token": EOS}, model_input_names=("input_ids", "attention_mask"),
        encoder=encoder, where=directory)


def transformers_backend(backend) -> Any:
    """transformers' CLIPTokenizer pipeline on the vocabulary and merges of an open_clip backend."""
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return build_clip(dict(model["vocab"]), merges, {}, {n: (c, None) for n, c in CLIP_SPECIALS.items()},
                      "open_clip tokenizer")
