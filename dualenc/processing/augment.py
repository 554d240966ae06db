"""Training augmentation, as open_clip's train transform (`image_transform(..., is_train=True, aug_cfg=...)`).

A random resized crop to the model's image size (bicubic, torchvision's RandomResizedCrop), then, each with its
probability, colour jitter (torchvision's ColorJitter: brightness, contrast, saturation, hue in a random order)
and grayscale (three equal channels), then the processor's own rescale and normalisation. The random draws come
from a numpy Generator the caller makes (see `generator`: a function of the run's seed, the step and the row, so
a resumed run decodes the same pixels); nothing reads global random state. The pillow steps are torchvision's
own, so given the same crop box and factors the pixels are open_clip's (see tests/test_augment.py).

Processors: an open_clip transform (ImageProcessor.open_clip) crops in the image's own mode and converts to RGB
after the crop, as open_clip; transformers' ViT / CLIP / SigLIP processors read the image as they do (RGB
conversion first), crop to crop_size (with do_center_crop) or to a fixed {"height", "width"} size, then rescale
and normalise with their own steps. SigLIP 2's NaFlex processor (patches at a size that follows each image's
aspect ratio) has no fixed image size to crop to: augmentation refuses it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.processing.images import ImageProcessor
from dualenc.processing.naflex import NaFlexImageProcessor
from dualenc.processing.open_clip import as_pil
from dualenc.processing.pixels import (
    channels_first,
    is_number,
    normalize,
    opaque,
    pil,
    rescale,
    three_channels,
)

BICUBIC = 3  # open_clip's train transform crops with bicubic whatever the processor's interpolation
STREAM = 0x61756731  # "aug1": keeps augmentation's draws apart from the other uses of the run's seed
JITTER = ("brightness", "contrast", "saturation", "hue")
_WHERE = "Augment"


def _fail(name: str, message: str):
    raise ConfigError(f"{_WHERE}: field '{name}' {message}")


def _pair(name: str, value, low: float, high: float, *, open_low: bool) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_number, value))):
        _fail(name, f"must be two finite numbers (min, max), got {value!r}")
    a, b = map(float, value)
    if not ((a > low if open_low else a >= low) and a <= b <= high):
        bound = f"({low:g}" if open_low else f"[{low:g}"
        _fail(name, f"must satisfy min <= max within {bound}, {high:g}], got {value!r}")
    return a, b


def _probability(name: str, value) -> float:
    if not is_number(value) or not 0 <= value <= 1:
        _fail(name, f"must be a probability in [0, 1], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Augment:
    """open_clip's AugmentationCfg for its own (non-timm) train transform.

    Attributes:
      scale: the range of the crop's share of the image's area (open_clip's default (0.9, 1.0)); within (0, 1].
      ratio: the range of the crop's width / height (torchvision's default (3/4, 4/3), which open_clip keeps).
      color_jitter: (brightness, contrast, saturation, hue) strengths, or None: factors are drawn uniformly from
        [max(0, 1 - v), 1 + v] for the first three and [-hue, hue] for hue (hue at most 0.5), as ColorJitter.
      color_jitter_prob: the probability of jittering an image (needs color_jitter; open_clip's
        color_jitter_prob).
      gray_scale_prob: the probability of making an image gray (three equal channels).
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "scale", _pair("scale", self.scale, 0.0, 1.0, open_low=True))
        set_(self, "ratio", _pair("ratio", self.ratio, 0.0, math.inf, open_low=True))
        set_(self, "color_jitter_prob", _probability("color_jitter_prob", self.color_jitter_prob))
        set_(self, "gray_scale_prob", _probability("gray_scale_prob", self.gray_scale_prob))
        jitter = self.color_jitter
        if jitter is not None:
            if not (isinstance(jitter, (list, tuple)) and len(jitter) == 4 and all(map(is_number, jitter))):
                _fail("color_jitter", f"must be four finite numbers (brightness, contrast, saturation, hue), "
                                      f"got {jitter!r}")
            if min(jitter) < 0 or jitter[3] > 0.5:
                _fail("color_jitter", f"strengths must be non-negative and hue at most 0.5, got {jitter!r}")
            set_(self, "color_jitter", tuple(map(float, jitter)))
        if (jitter is None) != (self.color_jitter_prob == 0):
            _fail("color_jitter_prob" if jitter is not None else "color_jitter",
                  "and color_jitter / color_jitter_prob go together: give both (a probability above 0 and the "
                  "four strengths) or neither")

    def to_dict(self) -> dict:
        """The fields as JSON values (lists for the pairs)."""
        return {"scale": list(self.scale), "ratio": list(self.ratio),
                "color_jitter": None if self.color_jitter is None else list(self.color_jitter),
                "color_jitter_prob": self.color_jitter_prob, "gray_scale_prob": self.gray_scale_prob}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Augment":
        """The inverse of to_dict; unknown keys are a ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{_WHERE}: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{_WHERE}: unknown fields {unknown}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Draw:
    """One image's random choices.

    Attributes:
      box: (top, left, height, width) of the crop (torchvision's (i, j, h, w)).
      jitter: None (not jittered), or (order, factors): the order of the four adjustments (a permutation of
        0..3: brightness, contrast, saturation, hue) and their factors (None for a strength of 0), as
        ColorJitter.get_params returns them.
      gray: whether the image is made gray.
    """

    box: tuple[int, int, int, int]
    jitter: tuple[tuple[int, ...], tuple[float | None, ...]] | None = None
    gray: bool = False


def generator(seed: int, step: int, row: int) -> np.random.Generator:
    """The Generator of one training row: a function of the run's seed, the global step and the row's place in
    the global batch alone (numpy's SeedSequence), so a resumed run, or another process, draws the same."""
    return np.random.default_rng(np.random.SeedSequence([STREAM, seed, step, row]))


def crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with numpy draws: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # the fallback: a center crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def jitter_ranges(strengths) -> tuple[tuple[float, float] | None, ...]:
    """ColorJitter's ranges of the four factors from their strengths (None where a strength is 0)."""
    out = []
    for name, value in zip(JITTER, strengths):
        center = 0.0 if name == "hue" else 1.0
        low = -value if name == "hue" else max(0.0, 1.0 - value)
        out.append(None if low == center + value == center else (low, center + value))
    return tuple(out)


def draw(augment: Augment, rng: np.random.Generator, height: int, width: int) -> Draw:
    """The random choices for one image of (height, width): the crop box, then (with color_jitter_prob) whether
    to jitter and the order and factors, then (with gray_scale_prob) whether to make it gray."""
    box = crop_box(rng, height, width, augment.scale, augment.ratio)
    jitter = None
    if augment.color_jitter_prob and rng.random() < augment.color_jitter_prob:
        order = tuple(int(i) for i in rng.permutation(4))
        factors = tuple(None if r is None else float(rng.uniform(*r)) for r in jitter_ranges(augment.color_jitter))
        jitter = (order, factors)
    gray = bool(augment.gray_scale_prob and rng.random() < augment.gray_scale_prob)
    return Draw(box, jitter, gray)


def _adjust_hue(image, factor: float):
    """torchvision's PIL adjust_hue: the hue band shifted by int(factor * 255), wrapping around."""
    Image, _ = pil()
    if image.mode in ("L", "1", "I", "F"):
        return image
    h, s, v = image.convert("HSV").split()
    hue = np.array(h, dtype=np.uint8)
    hue += np.int32(factor * 255).astype(np.uint8)  # wraps, as torchvision's
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert(image.mode)


def apply(d: Draw, image, size: tuple[int, int], mode: str | None = "RGB"):
    """A PIL image through the draw: crop `d.box` and resize to size (height, width) bicubic, convert to `mode`
    (None: keep the image's), jitter, make gray. The same pillow calls as torchvision's PIL functions.

    Returns:
      PIL.Image.Image.
    """
    from PIL import ImageEnhance

    top, left, h, w = d.box
    image = image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), BICUBIC)
    if mode is not None:
        image = image.convert(mode)
    if d.jitter is not None:
        order, factors = d.jitter
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in order:
            if factors[i] is not None:
                image = _adjust_hue(image, factors[i]) if i == 3 else enhancers[i](image).enhance(factors[i])
    if d.gray:
        Image, _ = pil()
        bands = len(image.getbands())
        image = image.convert("L")
        if bands == 3:
            gray = np.array(image, dtype=np.uint8)
            image = Image.fromarray(np.dstack([gray, gray, gray]), "RGB")
    return image


def output_size(image_processor) -> tuple[int, int]:
    """The (height, width) an image processor gives every image, which the crop is resized to; a ConfigError
    for a processor without one (NaFlex, or a shortest-edge resize without a center crop)."""
    image_processor = getattr(image_processor, "image_processor", image_processor)
    if isinstance(image_processor, NaFlexImageProcessor):
        raise ConfigError("augmentation does not apply to SigLIP 2's NaFlex processor: it resizes each image to "
                          "a size that follows its aspect ratio, so there is no fixed image size to crop to; "
                          "train without augmentation")
    if not isinstance(image_processor, ImageProcessor):
        raise ConfigError(f"augmentation needs an ImageProcessor (or a Processor holding one), got "
                          f"{type(image_processor).__name__}")
    if image_processor.open_clip is not None:
        return tuple(image_processor.open_clip.size)
    if image_processor.do_center_crop:
        return image_processor.crop_size["height"], image_processor.crop_size["width"]
    if image_processor.do_resize and "height" in image_processor.size:
        return image_processor.size["height"], image_processor.size["width"]
    raise ConfigError(f"augmentation crops to the processor's image size, but this one ({image_processor!r}) "
                      f"gives images of varying size (no center crop, and no fixed {{'height', 'width'}} size)")


def _pil_input(image_processor: ImageProcessor, image, index: int):
    """One input as the processor reads it, as a PIL image (for transformers' processors: converted as they
    convert it; 8-bit arrays only)."""
    if image_processor.open_clip is not None:
        image, name = as_pil(image, index)
        return opaque(image), name
    p = image_processor
    array, name = channels_first(image, index, p.do_convert_rgb, three_channels(p.image_mean, p.image_std))
    if array.dtype != np.uint8:
        integral = array.dtype == bool or np.issubdtype(array.dtype, np.integer)
        if not integral or array.min() < 0 or array.max() > 255:
            raise InputError(f"image {index} ({name}): augmentation takes 8-bit images (uint8 arrays, or integer "
                             f"values 0..255), got {array.dtype}")
        array = array.astype(np.uint8)
    if array.shape[0] not in (1, 3):
        raise InputError(f"image {index} ({name}): augmentation takes 1- or 3-channel images, got "
                         f"{array.shape[0]} channels")
    Image, _ = pil()
    return Image.fromarray(array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)), name


def augment_pixels(augment: Augment, image_processor, image, rng: np.random.Generator, *,
                   index: int = 0) -> np.ndarray:
    """One image's augmented pixel values, in the processor's layout and normalisation.

    Args:
      augment: the augmentation.
      image_processor: an ImageProcessor (or a Processor holding one); see output_size for those refused.
      image: as the processor takes one image (a PIL image, a path, an EncodedImage, an 8-bit array).
      rng: the draws (see generator).
      index: the image's place in a batch, for errors.

    Returns:
      (C, height, width) float32 array.
    """
    p = getattr(image_processor, "image_processor", image_processor)
    size = output_size(p)
    image, name = _pil_input(p, image, index)
    if 0 in image.size:
        raise InputError(f"image {index} ({name}) is empty: size {image.size}")
    try:
        out = apply(draw(augment, rng, image.height, image.width), image, size,
                    "RGB" if p.open_clip is not None else None)
        pixels = np.asarray(out, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"image {index} ({name}): {e}") from None
    pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    if p.open_clip is not None:
        # torchvision's to_tensor divides in float32, then Normalize.
        return normalize(pixels.astype(np.float32) / np.float32(255), p.open_clip.mean, p.open_clip.std)
    if p.do_rescale:
        pixels = rescale(pixels, p.rescale_factor)
    if p.do_normalize:
        pixels = normalize(pixels, p.image_mean, p.image_std)
    return pixels.astype(np.float32, copy=False)
