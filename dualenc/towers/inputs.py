"""Input checks the towers share: shapes and dtypes that hold under jit (shapes are static)."""

from __future__ import annotations

import jax.numpy as jnp

from dualenc.errors import InputError


def _check_integer(name, value, shape):
    if value is None:
        return
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise InputError(f"{name} must be an array, got {type(value).__name__}")
    if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.bool_)):
        raise InputError(f"{name} must hold integers, got dtype {value.dtype}")
    if name == "position_ids":
        ok = value.ndim in (1, 2) and value.shape[-1] == shape[1] and (value.ndim == 1 or value.shape[0] in (1, shape[0]))
    else:
        ok = tuple(value.shape) == tuple(shape)
    if not ok:
        raise InputError(f"{name} has shape {tuple(value.shape)}, input_ids has shape {tuple(shape)}")


def check_text_inputs(config, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
    """Shape and dtype checks that hold under jit (shapes are static)."""
    if not hasattr(input_ids, "shape") or len(input_ids.shape) != 2:
        raise InputError(f"input_ids must be a 2-D (batch, sequence) array, got shape "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    _check_integer("input_ids", input_ids, input_ids.shape)
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
        _check_integer(name, value, input_ids.shape)
    if token_type_ids is not None and getattr(config, "type_vocab_size", None) is None:
        raise InputError(f"token_type_ids was given, but the {type(config).__name__} tower has no token types; "
                         f"leave it out")
    length = input_ids.shape[1]
    limit = config.max_length if position_ids is None else config.max_position_embeddings
    if length > limit:
        extra = (f" (max_position_embeddings {config.max_position_embeddings} - pad_token_id "
                 f"{config.pad_token_id} - 1)") if limit != config.max_position_embeddings else ""
        raise InputError(f"input_ids has sequence length {length}, longer than the {limit} positions the "
                         f"text tower allows{extra}; truncate the input")
    if length == 0:
        raise InputError("input_ids has sequence length 0; the pooler needs at least one token")


def check_image_layout(config, pixel_values):
    """What every image tower needs of pixel_values: a 4-D (batch, channels, height, width) float array with the
    config's num_channels at axis 1 (a channels-last array is named as such). Each tower checks its sizes itself."""
    shape = getattr(pixel_values, "shape", None)
    c = config.num_channels
    if shape is None or len(shape) != 4:
        raise InputError(f"pixel_values must be a 4-D (batch, channels, height, width) array, got shape {shape}")
    if shape[1] != c:
        hint = " (it looks channels-last: transpose to NCHW)" if shape[-1] == c else ""
        raise InputError(f"pixel_values has {shape[1]} channels at axis 1, the config has num_channels={c}; "
                         f"shape {tuple(shape)}{hint}")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise InputError(f"pixel_values must be floating point (processed images), got {pixel_values.dtype}")
