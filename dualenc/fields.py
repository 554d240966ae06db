"""The config machinery every tower shares: validated fields, the frozen base class, config.json in and out.

Configs are static pytrees (no leaves), so `jax.jit(dualenc.apply)` takes one as an ordinary argument.
Every field is validated on construction, before anything is allocated: a size that is missing, not an
int, zero, negative or absurd, or an option value dualenc does not implement, raises ConfigError naming
the field and what is supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from dualenc.errors import ConfigError

# Parameter-free activations transformers accepts for hidden_act/pooler_act; layers.ACTIVATIONS implements them.
ACTIVATION_NAMES = (
    "gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
    "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2",
    "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh",
)
# More parameters than this is not a model anyone can run here; refuse before allocating.
MAX_PARAMS = 20_000_000_000


def int_field(default, lo=1, hi=1 << 16, *, required=True):
    return dataclasses.field(default=default, metadata={"kind": "int", "lo": lo, "hi": hi, "required": required})


def float_field(default, lo=0.0, hi=math.inf, *, lo_open=False, hi_open=False):
    return dataclasses.field(default=default, metadata={
        "kind": "float", "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


def rate_field(default):
    return float_field(default, 0.0, 1.0, hi_open=True)


def choice_field(default, choices):
    return dataclasses.field(default=default, metadata={"kind": "choice", "choices": tuple(choices)})


def bool_field(default):
    return dataclasses.field(default=default, metadata={"kind": "bool"})


def fail(where, name, msg):
    raise ConfigError(f"{where}: field '{name}' {msg}")


def check_int(where, name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        fail(where, name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        fail(where, name, f"must be in [{lo}, {hi}], got {value}")


class TowerConfig:
    """Shared validation and config.json (de)serialisation for the frozen config dataclasses."""

    model_types: ClassVar[tuple[str, ...]] = ()
    _builder: ClassVar[Any] = None  # the tower's build(normal, config) -> params; set by `builds`
    # Keys of config.json that change the computation in ways dualenc does not implement, with the one value
    # (or predicate) it accepts; anything else raises instead of being ignored.
    rejected: ClassVar[Mapping[str, Any]] = {}
    size_fields: ClassVar[str] = "the sizes"  # what a ConfigError for too many parameters asks to check

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
                check_int(self.name, f.name, value, meta["lo"], meta["hi"])
            elif kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    fail(self.name, f.name, f"must be a finite number, got {value!r}")
                lo_bad = value <= meta["lo"] if meta["lo_open"] else value < meta["lo"]
                hi_bad = value >= meta["hi"] if meta["hi_open"] else value > meta["hi"]
                if lo_bad or hi_bad:
                    lb = "(" if meta["lo_open"] else "["
                    rb = ")" if meta["hi_open"] else "]"
                    fail(self.name, f.name, f"must be in {lb}{meta['lo']}, {meta['hi']}{rb}, got {value}")
            elif kind == "choice":
                if value not in meta["choices"]:
                    fail(self.name, f.name, f"must be one of {list(meta['choices'])}, got {value!r}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    fail(self.name, f.name, f"must be true or false, got {value!r}")
        self._validate()

    def _validate(self):
        """Checks across fields, after each field's own check; subclasses add theirs and call this last."""
        count = self.num_params()
        if count > MAX_PARAMS:
            raise ConfigError(f"{self.name}: sizes give {count:,} parameters, over the limit of "
                              f"{MAX_PARAMS:,}; check {self.size_fields}")

    def num_params(self) -> int:
        """How many parameters the tower's init makes, from the shapes alone (nothing is allocated)."""
        def normal(shape, std):
            return jnp.zeros(shape, jnp.float32)

        shapes = jax.eval_shape(lambda: type(self)._builder(normal, self))
        return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))

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


class TransformerConfig(TowerConfig):
    """The config base of a transformer tower: hidden_size splits into num_attention_heads heads."""

    size_fields: ClassVar[str] = "hidden_size, intermediate_size, num_hidden_layers"

    def _validate(self):
        hidden, heads = self.hidden_size, self.num_attention_heads
        if hidden % heads:
            fail(self.name, "num_attention_heads",
                  f"must divide hidden_size: {hidden} is not a multiple of {heads}")
        super()._validate()


def same_head_dim(value, d):
    """hidden_size // num_attention_heads"""
    try:
        return value == d["hidden_size"] // d["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError):
        return False


def no_pruned_heads(value, d):
    """no pruned heads"""
    return not value


def pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)



def builds(*config_classes):
    """Marks fn(normal, config) -> params as the builder of these config classes, whose num_params counts it."""
    def mark(fn):
        for cls in config_classes:
            cls._builder = staticmethod(fn)
        return fn
    return mark
