"""Setting checks and pixel steps shared by the transformers and open_clip image pipelines."""

from __future__ import annotations

import math
import os

import numpy as np

from dualenc.errors import ConfigError, InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SIDE = 1 << 14


def pil():
    """PIL.Image and PIL.ImageOps, or an ImportError naming the extra to install."""
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ImportError("dualenc.ImageProcessor needs pillow: pip install dualenc[processing]") from None
    return PIL.Image, PIL.ImageOps


def fail(where, name, msg):
    raise ConfigError(f"{where}: field '{name}' {msg}")


def is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_bool(where, name, value):
    if not isinstance(value, bool):
        fail(where, name, f"must be true or false, got {value!r}")
    return value


def check_side(where, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        fail(where, name, f"sizes must be integers in [1, {MAX_SIDE}], got {value!r}")
    return value


def check_stats(where, name, value, channels, positive=False):
    """A number, or a list with one of `channels` lengths of finite numbers: a float or a tuple of floats."""
    values = (value,) if is_number(value) else value
    if not isinstance(values, (list, tuple)) or len(values) not in channels or not all(map(is_number, values)):
        fail(where, name, f"must be a number or a list of {' or '.join(map(str, channels))} finite numbers "
                          f"(one per channel), got {value!r}")
    if positive and any(v <= 0 for v in values):
        fail(where, name, f"must be positive, got {value!r}")
    return float(value) if len(values) == 1 and not isinstance(value, (list, tuple)) else tuple(map(float, values))


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(image - mean) / std per channel of a (C, H, W) array, in its float dtype (float32 for integer images)."""
    channels = image.shape[0]
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    for name, value in (("image_mean", mean), ("image_std", std)):
        if isinstance(value, tuple) and len(value) != channels:
            raise ValueError(f"{name} has {len(value)} values but the image has {channels} channels "
                             f"(set do_convert_rgb to convert it to RGB)")
    mean = np.array(mean if isinstance(mean, tuple) else [mean] * channels, dtype=image.dtype)
    std = np.array(std if isinstance(std, tuple) else [std] * channels, dtype=image.dtype)
    return (image - mean[:, None, None]) / std[:, None, None]


def open_image(path: str, index: int, mode: str | None = "RGB"):
    """Opens a local image file as transformers' load_image does: EXIF transpose, then convert to `mode`.

    Args:
      path: the file.
      index: its place in the batch, for errors.
      mode: the PIL mode to convert to, or None to keep the file's own (the image is loaded either way, and
        the file closed).

    Returns:
      PIL.Image.Image.
    """
    Image, ImageOps = pil()
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {index}: file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"image {index} ({path}) is a directory, not an image file")
    try:
        with Image.open(path) as opened:
            if 0 in opened.size:
                raise InputError(f"image {index} ({path}) is empty: size {opened.size}")
            image = ImageOps.exif_transpose(opened)
            if mode is not None:
                return image.convert(mode)
            image.load()
            return image
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {index} ({path}) refused: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; truncated files too
        raise InputError(f"image {index} ({path}) cannot be read: {e}") from None
