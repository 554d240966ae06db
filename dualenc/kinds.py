"""The kinds of whole model dualenc reads and writes, one row each: what a config's model_type means.

Towers say what is computed; the kind says how the towers meet (projections, logits, the loss), how the model
is saved (transformers' architecture, its config keys and tensor layout) and how texts are prepared for it.
Code asks the row (`kind(model_type).projections`, ...) instead of comparing model types.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from dualenc.errors import ConfigError

# The contrastive losses by name (dualenc.losses: "clip" the softmax over exp(logit_scale) * cos, "siglip" the
# sigmoid with a logit bias), each with the init a new logit_scale and logit_bias (None: none) take for it:
# CLIP's log(1 / 0.07), big_vision's SigLIP init (log 10, -10).
LOGIT_INIT = {"clip": (2.6592, None), "siglip": (math.log(10.0), -10.0)}
LOSSES = tuple(LOGIT_INIT)
PROJECTIONS = ("none", "bias-free", "bias")
# "exp_scale": logits = exp(logit_scale) * cos (+ logit_bias where the params have one), softmax over classes;
# "sigmoid_bias": the same with a logit bias the model always has, each label its own sigmoid;
# "temperature": logits = cos / temperature (ALIGN): the checkpoint holds `temperature`, and dualenc keeps
# log(1 / temperature) as its logit_scale, so the model, losses and zero-shot are exp_scale's.
LOGIT_RULES = ("exp_scale", "sigmoid_bias", "temperature")
TEXT_PADDINGS = ("max_length", "longest")
SCALAR_SHAPES = ((), (1,))  # logit_scale / logit_bias in checkpoints: scalars, or SigLIP's one-element vectors


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of whole model.

    Fields:
      model_type: config.json's model_type.
      architecture: the transformers class that loads it (AutoModel) and config.json's "architectures".
      projections: "none" (the towers' pooled outputs are the embeddings: the towers carry their own heads),
        "bias-free" (visual_projection / text_projection kernels) or "bias" (kernels and biases).
      logit_rule: one of LOGIT_RULES.
      default_loss: the loss it is trained with (a name in LOSSES), whose LOGIT_INIT is its default
        logit_scale (and logit_bias) init.
      towers: side -> the tower model_type it is made of ("vision"/"text"); None for any registered towers.
        With fixed towers, its sub-configs are read as transformers reads its own: missing fields take the
        defaults, a legacy `<key>_dict` overrides, and one tower can be loaded alone.
      config_keys: side -> the key of config.json holding that tower's config.
      modules: side -> the prefix of that tower's tensors in the checkpoint.
      projection_dim: config.json's default projection_dim; None where it must be given (or, without
        projections, it is the towers' pooled size).
      inits_key: None where config.json holds logit_scale_init_value (and dualenc's logit_bias_init_value);
        else the key under which dualenc keeps [logit_scale, logit_bias] inits (the transformers config has
        neither field).
      scalar_shape: the shape of logit_scale / logit_bias tensors in its checkpoints.
      text_padding: how texts are padded ("max_length": to the text tower's length, as trained); None for the
        text tower's own rule (Family.text_padding).
      tokenizer: the tokenizer family AutoTokenizer takes for it where tokenizer_config.json names no class;
        tokenizer_always: whatever the file names.
    """

    model_type: str
    architecture: str
    projections: str
    logit_rule: str
    default_loss: str
    towers: Mapping[str, str] | None = None
    config_keys: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"vision": "vision_config", "text": "text_config"})
    modules: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"vision": "vision_model.", "text": "text_model."})
    projection_dim: int | None = None
    inits_key: str | None = None
    scalar_shape: tuple[int, ...] = ()
    text_padding: str | None = None
    tokenizer: str | None = None
    tokenizer_always: bool = False

    def __post_init__(self):
        where = f"Kind {self.model_type!r}"
        for name, allowed in (("projections", PROJECTIONS), ("logit_rule", LOGIT_RULES),
                              ("default_loss", LOSSES), ("text_padding", (None, *TEXT_PADDINGS)),
                              ("scalar_shape", SCALAR_SHAPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}: field '{name}' must be one of {list(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.logit_rule == "sigmoid_bias" and LOGIT_INIT[self.default_loss][1] is None:
            raise ConfigError(f"{where}: a logit bias needs a default loss with a logit bias init")

    @property
    def has_projections(self) -> bool:
        return self.projections != "none"

    @property
    def own_bias(self) -> bool:
        """Whether the model always has a logit bias, saved as a tensor of its own (else a logit bias is
        dualenc's addition, kept in the weights' metadata)."""
        return self.logit_rule == "sigmoid_bias"

    @property
    def scale_entry(self) -> tuple[str, str]:
        """(checkpoint name, tables transform) of the logit scale."""
        if self.logit_rule == "temperature":
            return "temperature", "temperature"
        return "logit_scale", {(): "id", (1,): "scalar"}[self.scalar_shape]

    @property
    def logit_init(self) -> tuple[float, float | None]:
        """The default (logit_scale, logit_bias) init: its default loss's."""
        return LOGIT_INIT[self.default_loss]


KINDS: dict[str, Kind] = {k.model_type: k for k in (
    Kind("vision-text-dual-encoder", "VisionTextDualEncoderModel", "bias-free", "exp_scale", "clip"),
    Kind("clip", "CLIPModel", "bias-free", "exp_scale", "clip",
         towers={"vision": "clip_vision_model", "text": "clip_text_model"}, projection_dim=512, tokenizer="clip"),
    Kind("metaclip_2", "MetaClip2Model", "bias-free", "exp_scale", "clip",
         towers={"vision": "metaclip_2_vision_model", "text": "metaclip_2_text_model"}, projection_dim=512),
    Kind("siglip", "SiglipModel", "none", "sigmoid_bias", "siglip",
         towers={"vision": "siglip_vision_model", "text": "siglip_text_model"}, inits_key="dualenc_logit_init",
         scalar_shape=(1,), text_padding="max_length", tokenizer="siglip"),
    Kind("siglip2", "Siglip2Model", "none", "sigmoid_bias", "siglip",
         towers={"vision": "siglip2_vision_model", "text": "siglip2_text_model"}, inits_key="dualenc_logit_init",
         scalar_shape=(1,), text_padding="max_length", tokenizer="siglip2", tokenizer_always=True),
    # a VisionTextDualEncoder trained with the sigmoid loss (open_clip's NLLB-CLIP SigLIP pairs: a timm SigLIP ViT,
    # an HF text tower, a logit bias): VisionTextDualEncoderModel's layout plus logit_bias, no transformers class
    Kind("vision-text-dual-encoder-siglip", "VisionTextDualEncoderModel", "bias-free", "sigmoid_bias", "siglip"),
    Kind("chinese_clip", "ChineseCLIPModel", "bias-free", "exp_scale", "clip",
         towers={"vision": "chinese_clip_vision_model", "text": "chinese_clip_text_model"}, projection_dim=512,
         tokenizer="bert"),
)}
MODEL_TYPES = tuple(KINDS)


def kind(model_type) -> Kind:
    """The row of a model_type; ConfigError naming the known ones for anything else."""
    try:
        return KINDS[model_type]
    except (KeyError, TypeError):
        raise ConfigError(f"field 'model_type' must be one of {list(KINDS)}, got {model_type!r}") from None
