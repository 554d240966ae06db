"""The two encoders as standalone functions of (weights, inputs) with a symbolic batch size, and what a consumer
needs to feed them: input specs, the preprocessing settings and the logit rule, for the manifest."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dualenc import model
from dualenc.config import DualEncoderConfig
from dualenc.errors import InputError
from dualenc.evaluate import zero_shot_logit_rule
from dualenc.processing import NaFlexImageProcessor, Processor
from dualenc.processing.processor import image_inputs

BATCH = "batch"  # the symbolic leading dimension of every input and output
SIDES = {"image": ("vision", "visual_projection", "image_embeds"), "text": ("text", "text_projection", "text_embeds")}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
SEPARATOR = "."


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One exportable encoder.

    Fields:
      name: "image" or "text".
      fn: fn(weights, *inputs) -> L2-normalised float32 (batch, projection_dim), weights a flat {name: array}.
      weights: the flat weights this encoder reads (its tower and projection only), as numpy arrays.
      inputs: input name -> jax.ShapeDtypeStruct whose first dimension is the symbolic batch.
      output: the output's name.
    """

    name: str
    fn: Callable[..., jax.Array]
    weights: dict[str, np.ndarray]
    inputs: dict[str, jax.ShapeDtypeStruct]
    output: str

    def embedded(self) -> Callable[..., jax.Array]:
        """fn with the weights bound as constants: fn(*inputs)."""
        weights = {k: jnp.asarray(v) for k, v in self.weights.items()}
        return lambda *inputs: self.fn(weights, *inputs)


def flatten(tree) -> dict[str, Any]:
    """A nested params dict (per-layer tuples included) as {"vision.encoder.0.attention.query.kernel": leaf}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {SEPARATOR.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def _encoder(config: DualEncoderConfig, params, side: str, inputs: dict[str, np.ndarray]) -> Encoder:
    tower, projection, output = SIDES[side]
    own = {k: params[k] for k in (tower, projection) if k in params}
    weights = {k: np.asarray(v) for k, v in flatten(own).items()}
    names = list(weights)
    treedef = jax.tree_util.tree_structure(own)
    # The other side's params only satisfy check_params: zeros built inside the program, never read, so XLA
    # drops them and they are no input of the exported function.
    rest = {k: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), v)
            for k, v in params.items() if k not in own}
    order = list(inputs)

    def fn(flat_weights: dict, *arrays):
        missing = sorted(set(names) - set(flat_weights))
        if missing:
            raise InputError(f"weights lack {missing[:5]} ({len(missing)} missing)")
        full = {**jax.tree_util.tree_unflatten(treedef, [flat_weights[k] for k in names]),
                **jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), rest)}
        given = dict(zip(order, arrays))
        if side == "image":
            features = model.get_image_features(full, config, **given)
        else:
            features = model.get_text_features(full, config, **given)
        return model.normalize(features)

    batch, = jax.export.symbolic_shape(BATCH)
    specs = {k: jax.ShapeDtypeStruct((batch, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in inputs.items()}
    return Encoder(side, fn, weights, specs, output)


def sample_inputs(config: DualEncoderConfig, processor: Processor) -> dict[str, dict[str, np.ndarray]]:
    """One processed image and text: {"image": {name: array}, "text": {name: array}}, the encoders' inputs in
    the dtypes and (but for the batch) the shapes the processor gives; texts padded to the tokenizer's
    max_length."""
    from dualenc import towers

    if not isinstance(processor, Processor):
        raise InputError(f"processor must be a dualenc.Processor, got {type(processor).__name__}")
    image = {k: np.asarray(v) for k, v in image_inputs(processor, [np.full((8, 8, 3), 128, np.uint8)]).items()}
    image = {k: v.astype(np.float32 if k == "pixel_values" else np.int32 if v.dtype.kind in "iu" else v.dtype)
             for k, v in image.items()}
    tokenizer = processor.tokenizer
    taken = towers.family(config.text).input_names
    enc = tokenizer(["a"], max_length=tokenizer.max_length, padding="max_length")
    if getattr(config.text, "type_vocab_size", None) is None:  # a tower without token types refuses them
        taken = [k for k in taken if k != "token_type_ids"]
    text = {k: np.asarray(enc[k], np.int32) for k in TEXT_INPUTS if k in enc and k in taken}
    return {"image": image, "text": text}


def make_encoders(config: DualEncoderConfig, params, processor: Processor) -> dict[str, Encoder]:
    """The image and text encoders of a model: {"image": Encoder, "text": Encoder}. Each computes what
    dualenc.encode_images / encode_texts compute, normalize(get_*_features(params, config, ...)), in float32."""
    model.check_params(params, config)
    samples = sample_inputs(config, processor)
    return {side: _encoder(config, params, side, samples[side]) for side in SIDES}


def shape_of(spec: jax.ShapeDtypeStruct) -> list:
    return [d if isinstance(d, int) else str(d) for d in spec.shape]


def preprocessing(processor: Processor, encoder: Encoder) -> dict:
    """The image and text preprocessing a consumer must repeat, for the manifest."""
    image_processor = processor.image_processor
    out = {"image_processor": image_processor.to_dict()}
    if isinstance(image_processor, NaFlexImageProcessor):
        out["resize_rule"] = "SigLIP 2 NaFlex: patch sequences with a mask and patch grid shapes"
    elif getattr(image_processor, "open_clip", None) is not None:
        transform = image_processor.open_clip
        out["open_clip"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dataclasses.asdict(transform).items()}
        out["resize_rule"] = f"open_clip {transform.resize_mode}, {transform.interpolation}"
    else:
        out["resize_rule"] = _resize_rule(image_processor.to_dict())
        out["resample"] = PIL_FILTERS.get(image_processor.resample, image_processor.resample)
    pixels = encoder.inputs.get("pixel_values")
    if pixels is not None and len(pixels.shape) == 4:
        out["image_size"] = [int(pixels.shape[2]), int(pixels.shape[3])]
    tokenizer = processor.tokenizer
    out["tokenizer"] = {"max_length": tokenizer.max_length, "padding": "max_length",
                        "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                        "pad_token_id": tokenizer.pad_token_id}
    return out


def _resize_rule(settings: dict) -> str:
    size, rule = settings.get("size") or {}, []
    if settings.get("do_resize"):
        if "shortest_edge" in size:
            rule.append(f"resize the shortest edge to {size['shortest_edge']} keeping the aspect ratio")
        else:
            rule.append(f"resize to {size.get('height')}x{size.get('width')} (height x width)")
    if settings.get("do_center_crop") and settings.get("crop_size"):
        crop = settings["crop_size"]
        rule.append(f"center crop {crop.get('height')}x{crop.get('width')}")
    if settings.get("do_rescale"):
        rule.append(f"multiply by {settings.get('rescale_factor')}")
    if settings.get("do_normalize"):
        rule.append("subtract image_mean, divide by image_std per channel; channels first (C, H, W)")
    return "; ".join(rule) or "none"


def logit_rule(params) -> dict:
    """How the embeddings become logits and probabilities, for the manifest."""
    rule = zero_shot_logit_rule(params)
    out = {"logits": "logit_scale * image_embeds @ text_embeds.T" + (" + logit_bias" if "logit_bias" in rule else ""),
           "logit_scale": rule["logit_scale"],
           "probabilities": "sigmoid" if "logit_bias" in rule else "softmax over the texts"}
    if "logit_bias" in rule:
        out["logit_bias"] = rule["logit_bias"]
    return out
