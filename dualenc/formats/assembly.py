"""Model assembly: the dual encoder and processor a run starts from (`start_from`), composed from two towers or
loaded whole; `from_vision_text_pretrained` (dualenc.formats.transformers) composes two tower directories."""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax

from dualenc import files, layouts
from dualenc.config import DualEncoderConfig
from dualenc.errors import ConfigError
from dualenc.formats import open_clip
from dualenc.formats.configs import load_config
from dualenc.formats.pretrained import load_pretrained
from dualenc.formats.transformers import NewlyInitializedWarning, from_vision_text_pretrained
from dualenc.hub import resolve
from dualenc.kinds import LOGIT_INIT
from dualenc.processing import Processor, Tokenizer
from dualenc.processing.processor import load_image_processor


def _whole_model(vision_path: str | None, text_path: str | None, model_path: str | None):
    """(directory, config) of the whole dual encoder that start_from trains with these (resolved) paths: model_path,
    or one directory of a kind without projections (SigLIP, SigLIP 2: its towers carry their own heads) given
    as both towers; None when it composes two towers (or model_path holds no dual encoder, which
    load_pretrained reports). Reads config files only."""
    if model_path is not None:
        if layouts.is_open_clip_dir(model_path):
            where = os.path.join(model_path, layouts.OPEN_CLIP_CONFIG)
            return model_path, open_clip.config_from_dict(files.read_json(where, "open_clip config"), where)
        config = load_config(model_path)
        return (model_path, config) if isinstance(config, DualEncoderConfig) else None  # load_pretrained says why
    if vision_path is not None and text_path is not None and \
            os.path.realpath(vision_path) == os.path.realpath(text_path) and \
            os.path.isfile(os.path.join(vision_path, "config.json")):
        whole = load_config(vision_path)
        if isinstance(whole, DualEncoderConfig) and not whole.kind.has_projections:
            return vision_path, whole
    return None


def check_start(vision_path: str | None = None, text_path: str | None = None, *, model_path: str | None = None,
                projection_dim: int | None = None) -> None:
    """Raises ConfigError when start_from would refuse these arguments, from the config files alone (no weights
    read): both a whole model and towers, or neither; a projection_dim for a whole model that embeds with
    another (or, a SigLIP model, with its towers' own heads)."""
    vision_path, text_path, model_path = (p if p is None else resolve(p) for p in (vision_path, text_path, model_path))
    if model_path is not None and (vision_path is not None or text_path is not None):
        raise ConfigError("give either a whole model (model_path) or two towers (vision_path, text_path)")
    if model_path is None and (vision_path is None or text_path is None):
        raise ConfigError("give a whole model (model_path) or both towers (vision_path and text_path)")
    whole = None if projection_dim is None else _whole_model(vision_path, text_path, model_path)
    if whole is None:
        return
    path, config = whole
    if model_path is None:
        raise ConfigError(f"{path} is a whole {config.model_type} model, which embeds with its towers' own heads: a "
                          f"projection_dim does not apply to it")
    if projection_dim != config.projection_dim:
        raise ConfigError(f"{path} embeds with projection_dim {config.projection_dim}; a projection_dim of "
                          f"{projection_dim} does not apply to a whole model (compose towers for new ones)")


def start_from(vision_path: str | None = None, text_path: str | None = None, *, key: jax.Array,
               model_path: str | None = None, projection_dim: int | None = None, loss: str | None = None,
               max_length: int | None = None):
    """The model and processor a training run starts from, as `dualenc train` builds them.

    model_path: a whole dual encoder (any directory load_pretrained reads: VisionTextDualEncoder, CLIP, open_clip,
    SigLIP, SigLIP 2) to fine-tune with its projections, logit scale (and bias) and its processor files; with
    loss "siglip" a model without a logit bias gets one at SigLIP's init, -10. Or vision_path and text_path:

    One SigLIP or SigLIP 2 directory for both towers is the whole model: its heads, logit scale and logit bias
    are kept (it has no projections, so projection_dim must not be given). Otherwise the towers are combined
    with from_vision_text_pretrained (new projections of projection_dim unless both carry trained ones); with
    loss "siglip" a new logit scale takes SigLIP's init, log 10, and a logit bias of -10 is added.

    Each path may also be a Hugging Face Hub model id (see dualenc.hub.resolve). check_start checks the
    arguments first.

    Returns:
      (config, params, processor): the processor is the vision directory's image processor (a
      NaFlexImageProcessor for SigLIP 2) with the text directory's tokenizer.
    """
    scale, bias = LOGIT_INIT.get(loss, (None, None))  # what a new logit scale (and bias) takes for the loss
    check_start(vision_path, text_path, model_path=model_path, projection_dim=projection_dim)
    vision_path, text_path, model_path = (p if p is None else resolve(p) for p in (vision_path, text_path, model_path))
    if model_path is not None:
        config, params = load_pretrained(model_path)
        if bias is not None and "logit_bias" not in params:
            config = dataclasses.replace(config, logit_bias_init_value=bias)
            params["logit_bias"] = jax.numpy.asarray(bias, jax.numpy.float32)
        return config, params, Processor.from_pretrained(model_path, max_length=max_length)
    processor = Processor(load_image_processor(vision_path), Tokenizer.from_pretrained(text_path,
                                                                                       max_length=max_length))
    if _whole_model(vision_path, text_path, None) is not None:
        config, params = load_pretrained(vision_path)
        return config, params, processor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewlyInitializedWarning)
        config, params = from_vision_text_pretrained(
            vision_path, text_path, key=key, projection_dim=projection_dim,
            **({} if scale is None else {"logit_scale_init_value": scale}))
    if bias is not None:
        config = dataclasses.replace(config, logit_bias_init_value=bias)
        params["logit_bias"] = jax.numpy.asarray(bias, jax.numpy.float32)
    return config, params, processor
