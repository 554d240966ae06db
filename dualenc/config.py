"""Frozen, hashable configs for every tower and the dual encoder; transformers' config.json in and out.

Configs are static pytrees (no leaves), so `jax.jit(dualenc.apply)` takes one as an ordinary argument.
Every field is validated on construction, before anything is allocated: a size that is missing, not an
int, zero, negative or absurd, or an option value dualenc does not implement, raises ConfigError naming
the field and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar, Mapping

import jax

from dualenc.errors import ConfigError

# Parameter-free activations transformers accepts for hidden_act/pooler_act; layers.ACTIVATIONS implements them.
ACTIVATION_NAMES = (
    "gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
    "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2",
    "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh",
)
# More parameters than this is not a model anyone can run here; refuse before allocating.
MAX_PARAMS = 20_000_000_000


def _int(default, lo=1, hi=1 << 16, *, required=True):
    return dataclasses.field(default=default, metadata={"kind": "int", "lo": lo, "hi": hi, "required": required})


def _float(default, lo=0.0, hi=math.inf, *, lo_open=False, hi_open=False):
    return dataclasses.field(default=default, metadata={
        "kind": "float", "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


def _rate(default):
    return _float(default, 0.0, 1.0, hi_open=True)


def _choice(default, choices):
    return dataclasses.field(default=default, metadata={"kind": "choice", "choices": tuple(choices)})


def _bool(default):
    return dataclasses.field(default=default, metadata={"kind": "bool"})


def _fail(where, name, msg):
    raise ConfigError(f"{where}: field '{name}' {msg}")


def _check_int(where, name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        _fail(where, name, f"must be in [{lo}, {hi}], got {value}")


class _Config:
    """Shared validation and config.json (de)serialisation for the frozen config dataclasses."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Keys of config.json that change the computation in ways dualenc does not implement, with the one value
    # (or predicate) it accepts; anything else raises instead of being ignored.
    rejected: ClassVar[Mapping[str, Any]] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            kind = meta.get("kind")
            if kind == "int":
                if value is None and not meta["required"]:
                    continue
                _check_int(self.name, f.name, value, meta["lo"], meta["hi"])
            elif kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    _fail(self.name, f.name, f"must be a finite number, got {value!r}")
                lo_bad = value <= meta["lo"] if meta["lo_open"] else value < meta["lo"]
                hi_bad = value >= meta["hi"] if meta["hi_open"] else value > meta["hi"]
                if lo_bad or hi_bad:
                    lb = "(" if meta["lo_open"] else "["
                    rb = ")" if meta["hi_open"] else "]"
                    _fail(self.name, f.name, f"must be in {lb}{meta['lo']}, {meta['hi']}{rb}, got {value}")
            elif kind == "choice":
                if value not in meta["choices"]:
                    _fail(self.name, f.name, f"must be one of {list(meta['choices'])}, got {value!r}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    _fail(self.name, f.name, f"must be true or false, got {value!r}")
        self._validate()

    def _validate(self):
        hidden, heads = self.hidden_size, self.num_attention_heads
        if hidden % heads:
            _fail(self.name, "num_attention_heads",
                  f"must divide hidden_size: {hidden} is not a multiple of {heads}")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"{self.name}: sizes give {self.num_params():,} parameters, over the limit of "
                              f"{MAX_PARAMS:,}; check hidden_size, intermediate_size, num_hidden_layers")

    def _encoder_params(self) -> int:
        d, i = self.hidden_size, self.intermediate_size
        return self.num_hidden_layers * (4 * d * d + 2 * d * i + 9 * d + i)

    # ---------------------------------------------------------------- config.json

    def to_dict(self) -> dict:
        out = {"model_type": self.model_types[0]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None, fill_missing: bool = False):
        """Builds the config from a transformers config.json dict.

        Args:
          d: the parsed JSON object.
          where: how errors name the source (a file, or a key path inside it).
          fill_missing: take transformers' defaults for missing sizes. Only right for the nested vision_config of
            a CLIP config, which transformers 4.x wrote as a diff against the defaults.
        """
        where = where or cls.__name__
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", cls.model_types[0] if fill_missing else None)
        if model_type not in cls.model_types:
            raise ConfigError(f"{where}: field 'model_type' must be one of {list(cls.model_types)} "
                              f"for {cls.__name__}, got {model_type!r}")
        for key, accept in cls.rejected.items():
            if key in d and not (accept(d[key], d) if callable(accept) else d[key] == accept):
                want = getattr(accept, "__doc__", None) if callable(accept) else repr(accept)
                raise ConfigError(f"{where}: field '{key}' = {d[key]!r} is not implemented; supported: {want}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                value = d[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            elif f.metadata.get("required") and not fill_missing:
                raise ConfigError(f"{where}: missing field '{f.name}'")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _same_head_dim(value, d):
    """hidden_size // num_attention_heads"""
    try:
        return value == d["hidden_size"] // d["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError):
        return False


def _empty(value, d):
    """no pruned heads"""
    return not value


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _VisionConfig(_Config):
    rejected: ClassVar[Mapping[str, Any]] = {"head_dim": _same_head_dim}

    def _validate(self):
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            parts = value if isinstance(value, tuple) else (value,)
            if not isinstance(self, ViTConfig) and isinstance(value, tuple):
                _fail(self.name, name, f"must be an integer, got {value!r}")
            if isinstance(value, tuple) and len(value) != 2:
                _fail(self.name, name, f"must be an integer or a pair, got {value!r}")
            for part in parts:
                _check_int(self.name, name, part, 1, 8192)
        for img, patch in zip(self.image_hw, self.patch_hw):
            if patch > img:
                _fail(self.name, "patch_size", f"{self.patch_size} is larger than image_size {self.image_size}")
        if self.num_patches > 1 << 16:
            _fail(self.name, "image_size", f"gives {self.num_patches} patches, over the limit of {1 << 16}")
        super()._validate()

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(i // p for i, p in zip(self.image_hw, self.patch_hw))

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def num_params(self) -> int:
        d = self.hidden_size
        ph, pw = self.patch_hw
        return (self.num_channels * ph * pw * d + (self.num_patches + 2) * d + self._encoder_params()
                + 4 * d + d * d + d)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ViTConfig(_VisionConfig):
    """transformers' ViTConfig (model_type "vit"): a ViTModel with its pooler."""

    model_types: ClassVar[tuple[str, ...]] = ("vit",)

    hidden_size: int = _int(768)
    num_hidden_layers: int = _int(12, hi=1024)
    num_attention_heads: int = _int(12, hi=4096)
    intermediate_size: int = _int(3072, hi=1 << 18)
    hidden_act: str = _choice("gelu", ACTIVATION_NAMES)
    hidden_dropout_prob: float = _rate(0.0)
    attention_probs_dropout_prob: float = _rate(0.0)
    initializer_range: float = _float(0.02)
    layer_norm_eps: float = _float(1e-12, hi=1.0, lo_open=True)
    image_size: int | tuple[int, int] = dataclasses.field(default=224, metadata={"required": True})
    patch_size: int | tuple[int, int] = dataclasses.field(default=16, metadata={"required": True})
    num_channels: int = _int(3, hi=64)
    qkv_bias: bool = _bool(True)
    encoder_stride: int = _int(16, hi=1 << 16, required=False)
    pooler_output_size: int | None = _int(None, required=False)
    pooler_act: str = _choice("tanh", ACTIVATION_NAMES)

    def _validate(self):
        super()._validate()
        if self.pooler_output_size is not None and self.pooler_output_size != self.hidden_size:
            _fail(self.name, "pooler_output_size",
                  f"= {self.pooler_output_size} is not implemented; supported: None or hidden_size "
                  f"({self.hidden_size})")
        object.__setattr__(self, "pooler_output_size", None)  # one spelling of the default, for equality

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["pooler_output_size"] = self.hidden_size
        return out


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_VisionConfig):
    """transformers' CLIPVisionConfig (model_type "clip_vision_model", or the vision_config of a "clip")."""

    model_types: ClassVar[tuple[str, ...]] = ("clip_vision_model",)

    hidden_size: int = _int(768)
    intermediate_size: int = _int(3072, hi=1 << 18)
    projection_dim: int = _int(512, required=False)
    num_hidden_layers: int = _int(12, hi=1024)
    num_attention_heads: int = _int(12, hi=4096)
    num_channels: int = _int(3, hi=64)
    image_size: int = dataclasses.field(default=224, metadata={"required": True})
    patch_size: int = dataclasses.field(default=32, metadata={"required": True})
    hidden_act: str = _choice("quick_gelu", ACTIVATION_NAMES)
    layer_norm_eps: float = _float(1e-5, hi=1.0, lo_open=True)
    attention_dropout: float = _rate(0.0)
    initializer_range: float = _float(0.02)
    initializer_factor: float = _float(1.0)


@dataclasses.dataclass(frozen=True)
class _TextConfig(_Config):
    """Fields BERT and RoBERTa share (BERT's defaults)."""

    rejected: ClassVar[Mapping[str, Any]] = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "pruned_heads": _empty,
    }

    vocab_size: int = _int(30522, hi=1 << 23)
    hidden_size: int = _int(768)
    num_hidden_layers: int = _int(12, hi=1024)
    num_attention_heads: int = _int(12, hi=4096)
    intermediate_size: int = _int(3072, hi=1 << 18)
    hidden_act: str = _choice("gelu", ACTIVATION_NAMES)
    hidden_dropout_prob: float = _rate(0.1)
    attention_probs_dropout_prob: float = _rate(0.1)
    max_position_embeddings: int = _int(512, hi=1 << 20)
    type_vocab_size: int = _int(2, hi=1 << 12)
    initializer_range: float = _float(0.02)
    layer_norm_eps: float = _float(1e-12, hi=1.0, lo_open=True)
    pad_token_id: int | None = 0

    def _validate(self):
        if self.pad_token_id is not None:
            _check_int(self.name, "pad_token_id", self.pad_token_id, 0, self.vocab_size - 1)
        super()._validate()

    @property
    def max_length(self) -> int:
        """The longest input_ids the position table allows."""
        return self.max_position_embeddings

    def num_params(self) -> int:
        d = self.hidden_size
        return ((self.vocab_size + self.max_position_embeddings + self.type_vocab_size + 2) * d
                + self._encoder_params() + d * d + d)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BertConfig(_TextConfig):
    """transformers' BertConfig (model_type "bert"): a BertModel with its pooler."""

    model_types: ClassVar[tuple[str, ...]] = ("bert",)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RobertaConfig(_TextConfig):
    """transformers' RobertaConfig ("roberta"; "xlm-roberta" loads as the same architecture and keeps its name).

    Position ids start after pad_token_id, so the longest input is max_position_embeddings - pad_token_id - 1.
    """

    model_types: ClassVar[tuple[str, ...]] = ("roberta", "xlm-roberta")

    vocab_size: int = _int(50265, hi=1 << 23)
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = _choice("roberta", ("roberta", "xlm-roberta"))

    def _validate(self):
        if self.pad_token_id is None:
            _fail(self.name, "pad_token_id", "is required: RoBERTa's position ids start after it")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                _fail(self.name, name, f"must be a token id or null, got {value!r}")
        super()._validate()
        if self.max_length < 1:
            _fail(self.name, "max_position_embeddings",
                  f"= {self.max_position_embeddings} leaves no positions after pad_token_id {self.pad_token_id}")

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings - self.pad_token_id - 1


VisionConfig = ViTConfig | CLIPVisionConfig
TextConfig = BertConfig | RobertaConfig


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """transformers' VisionTextDualEncoderConfig: the two towers, the projection size and logit_scale's init.

    logit_bias_init_value adds SigLIP's learnable logit bias (its init: -10, with logit_scale log 10);
    None, the default, is the plain transformers model.
    """

    vision: VisionConfig
    text: TextConfig
    projection_dim: int = _int(512)
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float | None = None

    def __post_init__(self):
        if not isinstance(self.vision, (ViTConfig, CLIPVisionConfig)):
            raise ConfigError(f"DualEncoderConfig: field 'vision' must be a ViTConfig or CLIPVisionConfig, "
                              f"got {type(self.vision).__name__}")
        if not isinstance(self.text, (BertConfig, RobertaConfig)):
            raise ConfigError(f"DualEncoderConfig: field 'text' must be a BertConfig or RobertaConfig, "
                              f"got {type(self.text).__name__}")
        _check_int("DualEncoderConfig", "projection_dim", self.projection_dim, 1, 1 << 16)
        for name in ("logit_scale_init_value", "logit_bias_init_value"):
            v = getattr(self, name)
            if v is None and name == "logit_bias_init_value":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail("DualEncoderConfig", name, f"must be a finite number, got {v!r}")

    def to_dict(self) -> dict:
        out = {
            "model_type": "vision-text-dual-encoder",
            "architectures": ["VisionTextDualEncoderModel"],
            "vision_config": self.vision.to_dict(),
            "text_config": self.text.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }
        if self.logit_bias_init_value is not None:
            out["logit_bias_init_value"] = self.logit_bias_init_value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> "DualEncoderConfig":
        where = where or "DualEncoderConfig"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "vision-text-dual-encoder":
            raise ConfigError(f"{where}: field 'model_type' must be 'vision-text-dual-encoder', "
                              f"got {d.get('model_type')!r}")
        towers = {}
        for key, allowed in (("vision_config", VISION_TYPES), ("text_config", TEXT_TYPES)):
            if d.get(key) is None:
                raise ConfigError(f"{where}: missing field '{key}' (dualenc does not default a tower)")
            towers[key] = tower_config_from_dict(d[key], where=f"{where}: {key}", allowed=allowed)
        if "projection_dim" not in d:
            raise ConfigError(f"{where}: missing field 'projection_dim'")
        try:
            return cls(vision=towers["vision_config"], text=towers["text_config"],
                       projection_dim=d["projection_dim"],
                       logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
                       logit_bias_init_value=d.get("logit_bias_init_value"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


VISION_TYPES = {"vit": ViTConfig, "clip_vision_model": CLIPVisionConfig}
TEXT_TYPES = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": RobertaConfig}


def tower_config_from_dict(d: Mapping[str, Any], *, where: str = "config",
                           allowed: Mapping[str, type] | None = None) -> VisionConfig | TextConfig:
    """The tower config for a config.json dict, chosen by its model_type; never falls back to another tower.

    A "clip" config gives its vision tower (missing vision fields take CLIP's defaults, as transformers 4.x
    wrote only the differences).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    allowed = allowed or {**VISION_TYPES, "clip": CLIPVisionConfig, **TEXT_TYPES}
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in allowed:
        raise ConfigError(f"{where}: field 'model_type' must be one of {sorted(allowed)}, got {model_type!r}")
    if model_type == "clip":
        vision = d.get("vision_config")
        if vision is None:
            raise ConfigError(f"{where}: missing field 'vision_config' of the CLIP config")
        return CLIPVisionConfig.from_dict(vision, where=f"{where}: vision_config", fill_missing=True)
    return allowed[model_type].from_dict(d, where=where)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Reads a JSON object from `path`; every failure is an error naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    if len(raw) >= 64 << 20:
        raise ConfigError(f"{what} {path} is over 64 MiB; refusing to parse it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike) -> DualEncoderConfig | VisionConfig | TextConfig:
    """Reads a config.json (or the directory holding one): a dual encoder config or a single tower's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    d = read_json(path, "config")
    if d.get("model_type") == "vision-text-dual-encoder":
        return DualEncoderConfig.from_dict(d, where=path)
    return tower_config_from_dict(d, where=path)
