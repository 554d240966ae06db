"""What a tower family declares about itself: the `Family` record each tower module lists in its `FAMILIES`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from dualenc.errors import ConfigError

SIDES = ("vision", "text")
# The inputs a side's towers take unless their family says otherwise (in this order, after (params, config)).
SIDE_INPUTS = {"vision": ("pixel_values",), "text": ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
# How a tower pools (big_vision's `pool_type`), each with what it reads.
POOLINGS = {
    "first": "the first (class) token",
    "eos": "the end-of-text token (by the config's rule)",
    "last": "the last position",
    "map": "an attention-pooling head that reads every token",
    "gap": "the mean of every token or position",
}
# Keyword options of a tower's apply beyond the ones every tower takes (dropout_key, dtype); model.apply passes
# an option only to the families that list it, and refuses a non-default value for the others.
OPTIONS = ("output_hidden_states", "output_attentions", "remat_policy", "interpolate_pos_encoding", "attention",
           "patch_dropout", "patch_key", "keep_indices")
ENCODER_OPTIONS = ("output_hidden_states", "output_attentions", "remat_policy", "attention")  # transformer towers
IGNORABLE = ("attention",)  # options that only choose how a computation runs: dropped for families without them


@dataclasses.dataclass(frozen=True)
class Family:
    """What the rest of dualenc knows about a tower family; its module declares it (`FAMILIES` at its bottom).

    The module gives `specs(config)` (its params, each declared once: dualenc.params.Param, from which the dual
    encoder's init, checkpoint tables, decay mask and sharding come), `init(key, config, *, stacked=False) ->
    params` and `apply(params, config, *inputs, dropout_key=None, dtype=None, **options) -> TowerOutput` (a
    NamedTuple with `pooler_output`); `table(config)` (its transformers key table) where it has one.

    Fields:
      name: the family's name in messages.
      side: "vision" or "text".
      configs: config.json model_type -> config class (every config class belongs to one family).
      module: the family's module.
      pooling: one of POOLINGS; an option that only makes sense for one pooling is refused for the others.
      pooled_only: apply(pooled_only=True) is supported (the pooled position is known before the encoder).
      inputs: apply's positional inputs after (params, config); () for the side's usual (SIDE_INPUTS).
      options: the keyword options of OPTIONS that apply takes.
      pooled_size: the config field giving the width of pooler_output.
      stacks: top-level params that hold per-layer stacks (a leading depth axis; a tuple of per-layer dicts
        in the per-layer layout, see model.unstack_layers).
      state: top-level params that hold state rather than weights, such as BatchNorm's running statistics
        (flax's "batch_stats" collection). They live in the tower's params beside its weights, so init makes
        them, check_params, checkpoints and layer layouts carry them and apply reads them; but they take no
        gradient and no weight decay: model.split_state(params, config) gives (weights, state) to
        differentiate the weights alone, model.join_state puts them back. In training (a dropout_key given)
        such a tower's apply returns its new values in a `state` field of its output ({name: value}), which
        model.updated_state(params, config, output) writes back.
      check: check(config, *inputs, **options) -> None, value checks of the inputs outside jit
        (model.check_inputs; vision towers), raising InputError; None for none.
      prefixes, anchor, optional: single-tower checkpoints: where the tower sits in each transformers class's
        names, a tensor every one of its checkpoints holds (to find the prefix), params such a checkpoint may
        lack (initialised anew).
      tokenizer: the tokenizer family AutoTokenizer takes for a config.json of one of these model_types when
        tokenizer_config.json names no class (None: none).
    """

    name: str
    side: str
    configs: Mapping[str, type]
    module: Any
    pooling: str
    pooled_only: bool = False
    inputs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    pooled_size: str = "hidden_size"
    stacks: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    check: Callable | None = None
    prefixes: tuple[str, ...] = ("",)
    anchor: str | None = None
    optional: tuple[str, ...] = ()
    tokenizer: str | None = None

    def __post_init__(self):
        where = f"Family {self.name!r}"
        if self.side not in SIDES:
            raise ConfigError(f"{where}: field 'side' must be one of {list(SIDES)}, got {self.side!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"{where}: field 'pooling' must be one of {list(POOLINGS)}, got {self.pooling!r}")
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{where}: field 'options' holds {unknown}; known: {list(OPTIONS)}")
        if not self.configs:
            raise ConfigError(f"{where}: field 'configs' is empty")
        for name in ("specs", "init", "apply"):
            if not callable(getattr(self.module, name, None)):
                raise ConfigError(f"{where}: its module has no {name}()")

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inputs or SIDE_INPUTS[self.side]

    @property
    def text_padding(self) -> str:
        """How texts for this tower are padded: "max_length" for one that pools the last position (it was
        trained on text padded to its length; a shorter padding gives other embeddings), else "longest"."""
        return "max_length" if self.pooling == "last" else "longest"

    def pooled_width(self, config) -> int:
        return getattr(config, self.pooled_size)

    def specs(self, config) -> list:
        return self.module.specs(config)

    @property
    def build(self) -> Callable:
        return self.module._build

    @property
    def apply(self) -> Callable:
        return self.module.apply

    @property
    def init(self) -> Callable:
        return self.module.init

    def table(self, config) -> list:
        return self.module.table(config)
