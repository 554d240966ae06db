"""open_clip's eval image transform (`open_clip.image_transform(..., is_train=False)`) read from open_clip_config.json.

The steps are those of open_clip and torchvision on PIL images, in their order: resize in the image's own mode,
center crop (or pad), convert to RGB, to float32 / 255, normalize. Unlike open_clip, 16- and 32-bit grayscale
images ("I;16*", "I", "F") are first scaled to 8-bit "L" by their range (common.to_8bit) rather than clipped, and
images with transparency are first composited onto white (common.opaque) rather than losing their alpha band in
the conversion to RGB, as every dualenc image processor reads them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.processing.pixels import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_float32,
    check_side,
    check_stats,
    fail,
    is_number,
    normalize,
    EncodedImage,
    opaque,
    open_input,
    pil,
    to_8bit,
)

RESIZE_MODES = ("shortest", "longest", "squash")
# open_clip maps "random" to bicubic outside training; values are pillow filter codes.
INTERPOLATIONS = {"bicubic": 3, "bilinear": 2, "random": 3}
BICUBIC = 3


def _image_size(where, name, value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return check_side(where, name, value[0]), check_side(where, name, value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        return check_side(where, name, value), value
    fail(where, name, f"must be an int or [height, width], got {value!r}")


def _stats(where, name, value, default) -> tuple[float, float, float]:
    # open_clip's `mean or OPENAI_DATASET_MEAN`: an empty list or a zero takes the default too.
    if value is None or (isinstance(value, (list, tuple)) and not value) or (is_number(value) and value == 0):
        return default
    values = check_stats(where, name, value, (1, 3), positive=name.endswith("std"))
    values = values if isinstance(values, tuple) else (values,)
    return values * 3 if len(values) == 1 else values


def _choice(where, name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        fail(where, name, f"= {value!r} is not implemented; supported: {list(allowed)}")
    return value


def _fill(where, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        fail(where, name, f"must be an integer in [0, 255], got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class OpenClipTransform:
    """open_clip's eval transform for one image size: resize, center crop or pad, RGB, normalize.

    Attributes:
      size: (height, width) of the output.
      mean, std: per-channel normalization (three floats each).
      interpolation: "bicubic", "bilinear" or "random" (bicubic at eval, as open_clip).
      resize_mode: "shortest" (resize the shortest edge, center crop), "longest" (resize the longest edge, pad
        with fill_color) or "squash" (resize to size, ignoring the aspect ratio).
      fill_color: the 0..255 value "longest" pads with, in every channel.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        where = "OpenClipTransform"
        set_ = object.__setattr__
        set_(self, "size", _image_size(where, "size", self.size))
        set_(self, "mean", _stats(where, "mean", self.mean, OPENAI_CLIP_MEAN))
        set_(self, "std", _stats(where, "std", self.std, OPENAI_CLIP_STD))
        check_float32(where, self.mean, self.std, 1.0, names=("mean", "std", None))
        _choice(where, "interpolation", self.interpolation, INTERPOLATIONS)
        _choice(where, "resize_mode", self.resize_mode, RESIZE_MODES)
        _fill(where, "fill_color", self.fill_color)

    @classmethod
    def from_config(cls, d: Mapping, *, where: str = "open_clip config") -> "OpenClipTransform":
        """The eval transform open_clip builds from an open_clip_config.json object.

        As open_clip's create_model: the size is model_cfg.vision_cfg.image_size (preprocess_cfg.size is
        replaced by it); missing or null preprocess_cfg keys take PreprocessCfg's defaults (OpenAI mean and
        std, bicubic, shortest, fill 0); keys other than PreprocessCfg's are ignored. Unlike open_clip, a
        missing image_size is an error rather than 224.

        Args:
          d: the parsed JSON object.
          where: how errors name its source.

        Returns:
          OpenClipTransform.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        model_cfg = d.get("model_cfg")
        if not isinstance(model_cfg, Mapping):
            fail(where, "model_cfg", f"must be an object, got {model_cfg!r}")
        vision = model_cfg.get("vision_cfg")
        if not isinstance(vision, Mapping):
            fail(where, "model_cfg.vision_cfg", f"must be an object, got {vision!r}")
        if vision.get("image_size") is None:
            fail(where, "model_cfg.vision_cfg.image_size", "is missing")
        size = _image_size(where, "model_cfg.vision_cfg.image_size", vision["image_size"])
        pp = d.get("preprocess_cfg")
        if pp is None:
            pp = {}
        if not isinstance(pp, Mapping):
            fail(where, "preprocess_cfg", f"must be an object, got {pp!r}")
        pp = {k: v for k, v in pp.items() if v is not None}
        _choice(where, "preprocess_cfg.mode", pp.get("mode", "RGB"), ("RGB",))
        mean = _stats(where, "preprocess_cfg.mean", pp.get("mean"), OPENAI_CLIP_MEAN)
        std = _stats(where, "preprocess_cfg.std", pp.get("std"), OPENAI_CLIP_STD)
        check_float32(where, mean, std, 1.0, names=("preprocess_cfg.mean", "preprocess_cfg.std", None))
        return cls(
            size=size,
            mean=mean,
            std=std,
            interpolation=_choice(where, "preprocess_cfg.interpolation", pp.get("interpolation", "bicubic"),
                                  INTERPOLATIONS),
            resize_mode=_choice(where, "preprocess_cfg.resize_mode", pp.get("resize_mode", "shortest"),
                                RESIZE_MODES),
            fill_color=_fill(where, "preprocess_cfg.fill_color", pp.get("fill_color", 0)))

    def transformers_settings(self) -> dict:
        """The closest CLIPImageProcessor: ImageProcessor keyword arguments (what a converted model saves).

        Same mean, std, output size and filter. For RGB and grayscale images "squash" gives the same pixels
        (0.0 measured on scikit-learn's two sample photos and crops of them); the other modes differ, most near
        the edges (normalized units, on the 427x640 photos): square "shortest" crops at floor((n - size) / 2)
        where torchvision rounds half to even, a one-pixel shift when that half is odd (max 2.5, mean 0.15;
        0.0 otherwise); non-square "shortest" resizes the shortest edge to max(size), which never pads but
        scales otherwise (max 3.6, mean 0.42); "longest" becomes shortest_edge / longest_edge, whose rounding
        of the resized sides and split of the padding shift by a pixel (square: max 3.8, mean 0.13; non-square
        also scales otherwise: mean up to 0.62), and pads with 0 whatever fill_color. In every mode transformers
        converts to RGB before resizing (transparency composited onto white), open_clip after the crop.
        """
        height, width = self.size
        settings = dict(image_processor_type="CLIPImageProcessor", do_resize=True, resample=self.resample,
                        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(self.mean),
                        image_std=list(self.std), do_convert_rgb=True,
                        crop_size={"height": height, "width": width})
        if self.resize_mode == "squash":
            return {**settings, "size": {"height": height, "width": width}, "do_center_crop": False}
        if self.resize_mode == "longest":
            size = {"shortest_edge": min(self.size), "longest_edge": max(self.size)}
        else:
            size = {"shortest_edge": max(self.size)}
        return {**settings, "size": size, "do_center_crop": True}

    @property
    def resample(self) -> int:
        """The pillow filter open_clip resizes with."""
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            return BICUBIC  # open_clip builds ResizeKeepRatio(image_size) here without passing interpolation
        return INTERPOLATIONS[self.interpolation]

    def __call__(self, image) -> np.ndarray:
        """open_clip's pixel values for one PIL image.

        Args:
          image: a PIL image of any mode. Transparency is composited onto white first (common.opaque: "L" for
            grayscale images, else "RGB"), where open_clip's convert("RGB") drops the alpha band and shows the
            colours stored under it; other images are converted to RGB after the crop, as open_clip does.

        Returns:
          (3, height, width) float32 array.
        """
        image = opaque(image)
        height, width = self.size
        new_size = self._resized_size(image.height, image.width)
        if new_size != (image.height, image.width):
            Image, _ = pil()
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and new_size[0] * new_size[1] > 2 * limit:
                raise ValueError(f"resizing to {new_size[0]}x{new_size[1]} exceeds pillow's decompression "
                                 f"bomb limit ({2 * limit} pixels)")
            image = image.resize(new_size[::-1], self.resample)
        if self.resize_mode != "squash":
            fill = self.fill_color if self.resize_mode == "longest" else 0  # torchvision's CenterCrop pads with 0
            image = _center_crop_or_pad(image, height, width, fill)
        pixels = np.moveaxis(np.asarray(image.convert("RGB"), dtype=np.uint8), -1, 0)
        # torchvision's to_tensor divides in float32 (transformers multiplies by 1/255 in float64).
        return normalize(pixels.astype(np.float32) / np.float32(255), self.mean, self.std)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) torchvision's Resize or open_clip's ResizeKeepRatio gives an image of that size."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            return target_h, target_w
        if self.resize_mode == "shortest" and target_h == target_w:
            # torchvision's Resize(int): the long side is truncated, not rounded.
            short, long = min(height, width), max(height, width)
            new_long = int(target_h * long / short)
            return (new_long, target_h) if width <= height else (target_h, new_long)
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        # Python's round: half to even, as ResizeKeepRatio.
        return round(height / ratio), round(width / ratio)


def _center_crop_or_pad(image, height: int, width: int, fill: int):
    """torchvision's center_crop / open_clip's center_crop_or_pad of a PIL image to (height, width)."""
    if width > image.width or height > image.height:
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        image = _pad(image, (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill)
        if image.size == (width, height):
            return image
    # Python's round of a half-integer goes to the even neighbour: offsets 0, 2, 2, 4 for excesses 1, 3, 5, 7.
    top, left = int(round((image.height - height) / 2.0)), int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _pad(image, border: tuple[int, int, int, int], fill: int):
    """torchvision's constant pad of a PIL image: `fill` in every band, the palette of "P" images kept."""
    _, ImageOps = pil()
    bands = len(image.getbands())
    color = (fill,) * bands if bands > 1 else fill
    padded = ImageOps.expand(image, border=border, fill=color)
    if image.mode == "P":
        padded.putpalette(image.getpalette())
    return padded


def as_pil(image, index: int):
    """One input for the open_clip transform as a PIL image, and its name for errors.

    Args:
      image: a PIL image (used as it is), a path or an EncodedImage (opened and EXIF-rotated as transformers'
        load_image, its mode kept), or a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array (the L, RGB or RGBA image
        PIL.Image.fromarray makes of it). 16- and 32-bit grayscale images become 8-bit (common.to_8bit).
      index: its place in the batch, for errors.

    Returns:
      (PIL.Image.Image, name).
    """
    Image, _ = pil()
    name = type(image).__name__
    if isinstance(image, (str, os.PathLike, EncodedImage)):
        image, name = open_input(image, index, mode=None)
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if image.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
            raise InputError(f"image {index}: the open_clip transform takes uint8 arrays of shape (H, W) or "
                             f"(H, W, C) with 1, 3 or 4 channels, got {image.dtype} {image.shape}")
        if array.size == 0:
            raise InputError(f"image {index} is empty: shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(array))
    if not isinstance(image, Image.Image):
        raise InputError(f"image {index}: expected a PIL image, a path, an EncodedImage or a numpy array, got "
                         f"{name}")
    if 0 in image.size:
        raise InputError(f"image {index} ({name}) is empty: size {image.size}")
    try:
        return to_8bit(image), name
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"image {index} ({name}) cannot be read: {e}") from None
