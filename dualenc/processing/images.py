"""Images into the pixel values dualenc.apply takes, as transformers' PIL image processors or open_clip give them.

ImageProcessor repeats transformers' PIL backend step by step (the same pillow calls on the same arrays, the same
float64/float32 casts), so its pixel values are those of ViTImageProcessor / CLIPImageProcessor /
SiglipImageProcessor (use_fast=False). Built from an open_clip_config.json, it repeats open_clip's eval transform
instead (see OpenClipTransform). SigLIP 2's NaFlex processor (patches, not images) is NaFlexImageProcessor (naflex.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.hub import resolve
from dualenc.files import read_json
from dualenc.layouts import OPEN_CLIP_CONFIG, is_open_clip_dir
from dualenc.processing.pixels import (
    IMAGENET_STANDARD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_batch,
    channels_first,
    check_bool,
    check_float32,
    check_resample,
    check_rescale_factor,
    check_side,
    check_stats,
    fail,
    normalize,
    read_settings,
    rescale,
    resize,
    save_settings,
    three_channels,
)
from dualenc.processing.naflex import TYPE_NAMES as NAFLEX_TYPES
from dualenc.processing.open_clip import OpenClipTransform, as_pil

# transformers' class attributes: what a missing (or null) setting means for each processor type.
DEFAULTS = {
    "ViTImageProcessor": dict(
        do_resize=True, size={"height": 224, "width": 224}, resample=2, do_center_crop=False, crop_size=None,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD,
        image_std=IMAGENET_STANDARD, do_convert_rgb=False, default_to_square=True),
    "CLIPImageProcessor": dict(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True, default_to_square=False),
    "SiglipImageProcessor": dict(
        do_resize=True, size={"height": 224, "width": 224}, resample=3, do_center_crop=False, crop_size=None,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD,
        image_std=IMAGENET_STANDARD, do_convert_rgb=True, default_to_square=False),
}
DEFAULTS["ChineseCLIPImageProcessor"] = DEFAULTS["CLIPImageProcessor"]  # the same class attributes
TYPE_ALIASES = {alias: name for name in DEFAULTS for alias in (
    name, name + "Pil", name + "Fast", name.replace("ImageProcessor", "FeatureExtractor"))}
SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
# Settings transformers accepts that would change the output in ways not implemented here: the values allowed.
REJECTED = {"do_pad": (None, False), "data_format": (None, "channels_first"),
            "input_data_format": (None, "channels_last")}
OPEN_CLIP_FILE = OPEN_CLIP_CONFIG
_NAFLEX_HINT = ("; SigLIP 2's NaFlex processor gives patches, not images: read it with "
                "dualenc.processing.NaFlexImageProcessor.from_pretrained, or read any image processor with "
                "dualenc.processing.AutoImageProcessor.from_pretrained")


def _size(where, name, value, default_to_square):
    """transformers' get_size_dict: an int, (height, width) or a dict with one of SIZE_KEYS."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, Mapping) or set(value) not in SIZE_KEYS:
        fail(where, name, f"must be an int, [height, width], or a dict with keys height and width, "
                           f"shortest_edge, or shortest_edge and longest_edge; got {value!r}")
    return {k: check_side(where, name, v) for k, v in value.items()}


class ImageProcessor:
    """Images into (n, C, H, W) float32 pixel values, as transformers' ViT/CLIP/SigLIP image processors (PIL backend).

    With `open_clip` set (from_pretrained of an open_clip directory, or from_open_clip), images go through
    open_clip's eval transform instead, and the other settings are the closest CLIPImageProcessor: what to_dict
    and save_pretrained write, since transformers has no open_clip transform.

    Channels and modes, where this departs from transformers (which refuses such images with a channel
    mismatch, or clips 16-bit ones): image_mean or image_std with 3 values means the model takes RGB, so
    images without 3 channels are converted to RGB even when do_convert_rgb is false (the ViT default):
    grayscale ("1", "L", "I", "F", 16-bit), palette ("P", with or without transparency, "PA"), CMYK, alpha
    ("LA", "RGBA") and (H, W), (H, W, 1) or (H, W, 4) arrays. There is no opt-out: a 3-value mean/std means 3
    channels. Images with 3 channels (RGB, YCbCr...) are kept as they are, as before. With one value for both
    (a number or a one-value list), images keep their channels: grayscale stays one channel. Every conversion
    to RGB composites transparency onto white. PIL images of 16- and 32-bit modes are first scaled to 8 bits:
    "I;16*" (16-bit PNGs) from 0..65535 to 0..255, rounded; "I" and "F" by the values they hold (within 0..255
    as they are, "F" within [0, 1] times 255, within 0..65535 as 16 bits, else their own min..max; see
    common.to_8bit). Paths (and EncodedImage bytes) are read as transformers' load_image does, EXIF-rotated
    and converted to RGB, except that transparency is composited onto white where load_image drops the alpha
    band (transparent pixels then show the colours stored under them, black in most PNGs).

    Transparency, one rule for every input and every processor (this one, its open_clip transform and
    NaFlexImageProcessor): an image with an alpha band ("RGBA", "LA", "PA") or a transparent value
    ("P" / "L" / "RGB" with info["transparency"]), whether a path, EncodedImage bytes or a PIL image, and every
    (H, W, 4) array, is composited onto white before any other step; grayscale stays grayscale where the
    settings keep channels. transformers does so for PIL images and arrays it converts to RGB only; open_clip
    never does (its convert("RGB") drops the alpha band). Arrays keep transformers' meaning: integers are
    0..255 whatever their dtype (a 16-bit array is refused when resized if it holds values over 255;
    Image.fromarray of it gives an "I;16" image, which is scaled).
    """

    def __init__(self, *, image_processor_type: str = "ViTImageProcessor", do_resize: bool | None = None,
                 size=None, resample: int | None = None, do_center_crop: bool | None = None, crop_size=None,
                 do_rescale: bool | None = None, rescale_factor: float | None = None,
                 do_normalize: bool | None = None, image_mean=None, image_std=None,
                 do_convert_rgb: bool | None = None, default_to_square: bool | None = None,
                 open_clip: OpenClipTransform | None = None, where: str = "ImageProcessor"):
        """Args (None takes the default of image_processor_type, as transformers does):
          image_processor_type: "ViTImageProcessor" (default: 224x224 bilinear, mean/std 0.5, no RGB conversion),
            "CLIPImageProcessor" (shortest edge 224 bicubic, center crop 224, CLIP mean/std, RGB conversion) or
            "SiglipImageProcessor" (224x224 bicubic, no crop, mean/std 0.5, RGB conversion).
          do_resize, size: resize to {"height", "width"}, or the shortest edge to {"shortest_edge"} keeping the
            aspect ratio (optionally with "longest_edge"); an int means a square (ViT) or the shortest edge (CLIP,
            SigLIP).
          resample: pillow filter code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
          do_center_crop, crop_size: crop the middle {"height", "width"}, zero-padding smaller images.
          do_rescale, rescale_factor: multiply by rescale_factor (1/255).
          do_normalize, image_mean, image_std: (x - mean) / std per channel.
          do_convert_rgb: convert every image to RGB (transparency composited onto white) first; when false,
            images without 3 channels are still converted if image_mean or image_std has 3 values.
          open_clip: process images as open_clip does (see OpenClipTransform); the settings above must then be
            left unset, as they are derived from it (OpenClipTransform.transformers_settings).
          where: how errors name the source of these settings.
        """
        given = dict(do_resize=do_resize, size=size, resample=resample, do_center_crop=do_center_crop,
                     crop_size=crop_size, do_rescale=do_rescale, rescale_factor=rescale_factor,
                     do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
                     do_convert_rgb=do_convert_rgb, default_to_square=default_to_square)
        if open_clip is not None:
            if not isinstance(open_clip, OpenClipTransform):
                fail(where, "open_clip", f"must be an OpenClipTransform, got {type(open_clip).__name__}")
            for name, value in given.items():
                if value is not None:
                    fail(where, name, "cannot be set with open_clip: the settings are derived from it")
            given = open_clip.transformers_settings()
            image_processor_type = given.pop("image_processor_type")
        self.open_clip = open_clip
        type_name = TYPE_ALIASES.get(image_processor_type) if isinstance(image_processor_type, str) else None
        if type_name is None:
            fail(where, "image_processor_type", f"must be one of {sorted(DEFAULTS)}, got {image_processor_type!r}"
                 + _NAFLEX_HINT * (image_processor_type in NAFLEX_TYPES))
        s = {**DEFAULTS[type_name], **{k: v for k, v in given.items() if v is not None}}
        self.image_processor_type = type_name
        self.where = where
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb",
                     "default_to_square"):
            setattr(self, name, check_bool(where, name, s[name]))
        self.size = _size(where, "size", s["size"], self.default_to_square)
        self.crop_size = None if s["crop_size"] is None else _size(where, "crop_size", s["crop_size"], True)
        if self.crop_size is not None and set(self.crop_size) != {"height", "width"}:
            fail(where, "crop_size", f"must have keys height and width, got {sorted(self.crop_size)}")
        if self.do_center_crop and self.crop_size is None:
            fail(where, "crop_size", "is required when do_center_crop is true")
        self.resample = check_resample(where, "resample", s["resample"])
        self.rescale_factor = check_rescale_factor(where, "rescale_factor", s["rescale_factor"])
        channels = (3,) if self.do_convert_rgb else (1, 3)
        self.image_mean = check_stats(where, "image_mean", s["image_mean"], channels)
        self.image_std = check_stats(where, "image_std", s["image_std"], channels, positive=True)
        check_float32(where, self.image_mean, self.image_std, 255 * (self.rescale_factor if self.do_rescale else 1))

    # ------------------------------------------------------------------------------------- config files

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "image processor config") -> "ImageProcessor":
        """Builds the processor from a preprocessor_config.json dict (unknown keys are ignored, as transformers does).

        A SigLIP 2 config (image_processor_type "Siglip2ImageProcessor") is refused with a ConfigError naming
        NaFlexImageProcessor, which reads it: its output is patches with a mask, not (n, C, H, W) pixel values.

        Args:
          d: the parsed JSON object.
          where: how errors name its source.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        type_key = "image_processor_type" if "image_processor_type" in d else "feature_extractor_type"
        type_name = d.get(type_key) or "ViTImageProcessor"
        if not isinstance(type_name, str) or type_name not in TYPE_ALIASES:
            fail(where, type_key, f"= {type_name!r} is not implemented; supported: {sorted(DEFAULTS)}"
                 + _NAFLEX_HINT * (type_name in NAFLEX_TYPES))
        for key, allowed in REJECTED.items():
            if d.get(key) not in allowed:
                supported = [a for a in allowed if a is not None]
                fail(where, key, f"= {d[key]!r} is not implemented; supported: {supported}")
        keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square")
        return cls(image_processor_type=type_name, where=where, **{k: d[k] for k in keys if k in d})

    @classmethod
    def from_open_clip(cls, d: Mapping[str, Any], *, where: str = "open_clip config") -> "ImageProcessor":
        """Builds the processor of open_clip's eval transform from an open_clip_config.json dict.

        Args:
          d: the parsed JSON object ({"model_cfg": {"vision_cfg": {"image_size"...}}, "preprocess_cfg": {...}}).
          where: how errors name its source.

        Returns:
          ImageProcessor with `open_clip` set (see OpenClipTransform.from_config).
        """
        return cls(open_clip=OpenClipTransform.from_config(d, where=where), where=where)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        """Reads the image processor settings of a model directory, or of one JSON file.

        A directory in open_clip's layout (open_clip_config.json and no config.json, see layouts.is_open_clip_dir)
        gives open_clip's eval transform (see from_open_clip), as load_pretrained and Tokenizer read it too.
        Otherwise the "image_processor" entry of processor_config.json comes first (as in transformers 5), then
        preprocessor_config.json (see common.read_settings). SigLIP 2 settings are refused (see from_dict).

        Args:
          path: a directory, or a preprocessor_config.json / processor_config.json / open_clip_config.json file,
            or a Hugging Face Hub model id (see dualenc.hub.resolve).

        Returns:
          ImageProcessor.
        """
        path = resolve(path)
        if os.path.isdir(path) and is_open_clip_dir(path):
            where = os.path.join(path, OPEN_CLIP_FILE)
            return cls.from_open_clip(read_json(where, "open_clip config"), where=where)
        d, where = read_settings(path)
        if os.path.isfile(where) and (os.path.basename(where) == OPEN_CLIP_FILE or (
                "model_cfg" in d and not {"image_processor_type", "feature_extractor_type"} & set(d))):
            return cls.from_open_clip(d, where=where)
        return cls.from_dict(d, where=where)

    def to_dict(self) -> dict:
        """The settings as transformers writes them in preprocessor_config.json."""
        out = {"image_processor_type": self.image_processor_type, "do_resize": self.do_resize,
               "size": dict(self.size), "resample": self.resample, "do_center_crop": self.do_center_crop,
               "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
               "do_normalize": self.do_normalize, "do_convert_rgb": self.do_convert_rgb}
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        if self.crop_size is not None:
            out["crop_size"] = dict(self.crop_size)
        return out

    def save_pretrained(self, path: str | os.PathLike, *, processor_class: str | None = None) -> None:
        """Writes preprocessor_config.json into `path` (created if missing; other files kept), atomically.

        An existing processor_config.json that holds image processor settings gets the new ones too, since
        transformers reads that entry first. With `open_clip` set, the file is the closest CLIPImageProcessor
        (see OpenClipTransform.transformers_settings), and from_pretrained of the directory then reads it, not
        an open_clip_config.json beside it.
        """
        save_settings(path, self.to_dict(), processor_class)

    def __repr__(self) -> str:
        settings = {**self.to_dict(), **({"open_clip": self.open_clip} if self.open_clip else {})}
        return f"ImageProcessor({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

    # ------------------------------------------------------------------------------------------ images

    def __call__(self, images) -> np.ndarray:
        """Pixel values for one image or a list of them.

        Args:
          images: a PIL image, a path (str or os.PathLike; opened, EXIF-rotated and converted to RGB as
            transformers' load_image does, transparency composited onto white) or an EncodedImage, an (H, W, C)
            array with 1, 3 or 4 channels or an (H, W) array
            (uint8 0..255; other dtypes as transformers treats them), a list of these, or an (n, H, W, C) array.
            Converted to RGB or scaled to 8 bits as the class docstring says.
            With `open_clip` set, paths keep their mode until the crop (as open_clip's transform of
            Image.open(path), EXIF-rotated) and arrays must be uint8 (see openclip.as_pil).

        Returns:
          (n, C, H, W) float32 array.
        """
        out = [self._process(image, i) for i, image in enumerate(as_batch(images))]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise InputError(f"the images have different shapes after processing ({sorted(shapes)}); set "
                             f"do_center_crop or a fixed size {{'height', 'width'}} to stack them")
        return np.stack(out).astype(np.float32, copy=False)

    def _process(self, image, index: int) -> np.ndarray:
        if self.open_clip is not None:
            image, name = as_pil(image, index)
            try:
                return self.open_clip(image)
            except (ValueError, OSError, MemoryError, SyntaxError) as e:  # pillow's errors of corrupt data
                raise InputError(f"image {index} ({name}): {e}") from None
        rgb = three_channels(self.image_mean, self.image_std)
        image, name = channels_first(image, index, self.do_convert_rgb, rgb)
        try:
            if self.do_resize:
                image = resize(image, self._output_size(image.shape[-2:]), self.resample)
            if self.do_center_crop:
                image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
            if self.do_rescale:
                image = rescale(image, self.rescale_factor)
            if self.do_normalize:
                image = normalize(image, self.image_mean, self.image_std)
        except (ValueError, OSError, MemoryError) as e:
            raise InputError(f"image {index} ({name}): {e}") from None
        return image

    def _output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """transformers' get_resize_output_image_size(default_to_square=False) and get_size_with_aspect_ratio."""
        size = self.size
        height, width = hw
        if "height" in size:
            return size["height"], size["width"]
        if "longest_edge" in size:
            edge, max_size = size["shortest_edge"], size["longest_edge"]
            raw = None
            short, long = float(min(hw)), float(max(hw))
            if long / short * edge > max_size:
                raw = max_size * short / long
                edge = int(round(raw))
            if (height <= width and height == edge) or (width <= height and width == edge):
                return height, width
            if width < height:
                return int((edge if raw is None else raw) * height / width), edge
            return edge, int((edge if raw is None else raw) * width / height)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers' image_transforms.center_crop of a (C, H, W) array: zero-pads what is smaller than the crop."""
    height, width = image.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    bottom, right = top + crop_height, left + crop_width
    if top >= 0 and bottom <= height and left >= 0 and right <= width:
        return image[..., top:bottom, left:right]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros_like(image, shape=image.shape[:-2] + (new_height, new_width))
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded[..., top_pad:top_pad + height, left_pad:left_pad + width] = image
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[..., max(0, top):min(new_height, bottom), max(0, left):min(new_width, right)]
