"""Images and texts into the arrays dualenc.apply takes, as transformers' PIL image processors and tokenizers give them.

ImageProcessor repeats transformers' PIL backend step by step (the same pillow calls on the same arrays, the same
float64/float32 casts), so its pixel values are those of ViTImageProcessor / CLIPImageProcessor (use_fast=False).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from dualenc.config import read_json
from dualenc.errors import ConfigError, InputError
from dualenc.files import write_json_atomic
from dualenc.tokenizer import Tokenizer

__all__ = ["ImageProcessor", "Processor", "Tokenizer"]

IMAGENET_STANDARD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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
}
TYPE_ALIASES = {alias: name for name in DEFAULTS for alias in (
    name, name + "Pil", name + "Fast", name.replace("ImageProcessor", "FeatureExtractor"))}
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
MAX_SIDE = 1 << 14
# Settings transformers accepts that would change the output in ways not implemented here: the values allowed.
REJECTED = {"do_pad": (None, False), "data_format": (None, "channels_first"),
            "input_data_format": (None, "channels_last")}
PROCESSOR_CLASS = "VisionTextDualEncoderProcessor"


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ImportError("dualenc.ImageProcessor needs pillow: pip install dualenc[processing]") from None
    return PIL.Image, PIL.ImageOps


def _fail(where, name, msg):
    raise ConfigError(f"{where}: field '{name}' {msg}")


def _bool(where, name, value):
    if not isinstance(value, bool):
        _fail(where, name, f"must be true or false, got {value!r}")
    return value


def _side(where, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        _fail(where, name, f"sizes must be integers in [1, {MAX_SIDE}], got {value!r}")
    return value


def _size(where, name, value, default_to_square):
    """transformers' get_size_dict: an int, (height, width) or a dict with one of SIZE_KEYS."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, Mapping) or set(value) not in SIZE_KEYS:
        _fail(where, name, f"must be an int, [height, width], or a dict with keys height and width, "
                           f"shortest_edge, or shortest_edge and longest_edge; got {value!r}")
    return {k: _side(where, name, v) for k, v in value.items()}


def _stats(where, name, value, channels):
    values = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (not isinstance(values, (list, tuple)) or len(values) not in channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        _fail(where, name, f"must be a number or a list of {' or '.join(map(str, channels))} finite numbers "
                           f"(one per channel), got {value!r}")
    if name == "image_std" and any(v <= 0 for v in values):
        _fail(where, name, f"must be positive, got {value!r}")
    return float(value) if len(values) == 1 and not isinstance(value, (list, tuple)) else tuple(map(float, values))


class ImageProcessor:
    """Images into (n, C, H, W) float32 pixel values, as transformers' ViT/CLIP image processors (PIL backend)."""

    def __init__(self, *, image_processor_type: str = "ViTImageProcessor", do_resize: bool | None = None,
                 size=None, resample: int | None = None, do_center_crop: bool | None = None, crop_size=None,
                 do_rescale: bool | None = None, rescale_factor: float | None = None,
                 do_normalize: bool | None = None, image_mean=None, image_std=None,
                 do_convert_rgb: bool | None = None, default_to_square: bool | None = None,
                 where: str = "ImageProcessor"):
        """Args (None takes the default of image_processor_type, as transformers does):
          image_processor_type: "ViTImageProcessor" (default: 224x224 bilinear, mean/std 0.5, no RGB conversion)
            or "CLIPImageProcessor" (shortest edge 224 bicubic, center crop 224, CLIP mean/std, RGB conversion).
          do_resize, size: resize to {"height", "width"}, or the shortest edge to {"shortest_edge"} keeping the
            aspect ratio (optionally with "longest_edge"); an int means a square (ViT) or the shortest edge (CLIP).
          resample: pillow filter code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
          do_center_crop, crop_size: crop the middle {"height", "width"}, zero-padding smaller images.
          do_rescale, rescale_factor: multiply by rescale_factor (1/255).
          do_normalize, image_mean, image_std: (x - mean) / std per channel.
          do_convert_rgb: convert every image to RGB (transparency composited onto white) first.
          where: how errors name the source of these settings.
        """
        type_name = TYPE_ALIASES.get(image_processor_type) if isinstance(image_processor_type, str) else None
        if type_name is None:
            _fail(where, "image_processor_type", f"must be one of {sorted(DEFAULTS)}, got {image_processor_type!r}")
        given = dict(do_resize=do_resize, size=size, resample=resample, do_center_crop=do_center_crop,
                     crop_size=crop_size, do_rescale=do_rescale, rescale_factor=rescale_factor,
                     do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
                     do_convert_rgb=do_convert_rgb, default_to_square=default_to_square)
        s = {**DEFAULTS[type_name], **{k: v for k, v in given.items() if v is not None}}
        self.image_processor_type = type_name
        self.where = where
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb",
                     "default_to_square"):
            setattr(self, name, _bool(where, name, s[name]))
        self.size = _size(where, "size", s["size"], self.default_to_square)
        self.crop_size = None if s["crop_size"] is None else _size(where, "crop_size", s["crop_size"], True)
        if self.crop_size is not None and set(self.crop_size) != {"height", "width"}:
            _fail(where, "crop_size", f"must have keys height and width, got {sorted(self.crop_size)}")
        if self.do_center_crop and self.crop_size is None:
            _fail(where, "crop_size", "is required when do_center_crop is true")
        self.resample = s["resample"]
        if type(self.resample) is not int or self.resample not in RESAMPLE:
            _fail(where, "resample", f"must be a pillow filter code {RESAMPLE}, got {self.resample!r}")
        factor = s["rescale_factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            _fail(where, "rescale_factor", f"must be a positive finite number, got {factor!r}")
        self.rescale_factor = float(factor)
        channels = (3,) if self.do_convert_rgb else (1, 3)
        self.image_mean = _stats(where, "image_mean", s["image_mean"], channels)
        self.image_std = _stats(where, "image_std", s["image_std"], channels)

    # ------------------------------------------------------------------------------------- config files

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "image processor config") -> "ImageProcessor":
        """Builds the processor from a preprocessor_config.json dict (unknown keys are ignored, as transformers does).

        Args:
          d: the parsed JSON object.
          where: how errors name its source.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        type_key = "image_processor_type" if "image_processor_type" in d else "feature_extractor_type"
        type_name = d.get(type_key) or "ViTImageProcessor"
        if not isinstance(type_name, str) or type_name not in TYPE_ALIASES:
            _fail(where, type_key, f"= {type_name!r} is not implemented; supported: {sorted(DEFAULTS)}")
        for key, allowed in REJECTED.items():
            if d.get(key) not in allowed:
                supported = [a for a in allowed if a is not None]
                _fail(where, key, f"= {d[key]!r} is not implemented; supported: {supported}")
        keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square")
        return cls(image_processor_type=type_name, where=where, **{k: d[k] for k in keys if k in d})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        """Reads the image processor settings of a model directory, or of one JSON file.

        In a directory, the "image_processor" entry of processor_config.json comes first (as in transformers 5),
        then preprocessor_config.json.

        Args:
          path: a directory, or a preprocessor_config.json / processor_config.json file.

        Returns:
          ImageProcessor.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            nested = os.path.join(path, "processor_config.json")
            if os.path.isfile(nested):
                entry = read_json(nested, "processor config").get("image_processor")
                if isinstance(entry, Mapping):
                    return cls.from_dict(entry, where=f"{nested}: image_processor")
            path = os.path.join(path, "preprocessor_config.json")
        d = read_json(path, "image processor config")
        if "image_processor_type" not in d and isinstance(d.get("image_processor"), Mapping):
            return cls.from_dict(d["image_processor"], where=f"{path}: image_processor")
        return cls.from_dict(d, where=path)

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
        transformers reads that entry first.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        d = self.to_dict()
        if processor_class:
            d["processor_class"] = processor_class
        write_json_atomic(os.path.join(path, "preprocessor_config.json"), d)
        nested = os.path.join(path, "processor_config.json")
        if os.path.isfile(nested):
            processor_config = read_json(nested, "processor config")
            if "image_processor" in processor_config:
                processor_config["image_processor"] = self.to_dict()
                write_json_atomic(nested, processor_config)

    def __repr__(self) -> str:
        return f"ImageProcessor({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # ------------------------------------------------------------------------------------------ images

    def __call__(self, images) -> np.ndarray:
        """Pixel values for one image or a list of them.

        Args:
          images: a PIL image, a path (str or os.PathLike; opened, EXIF-rotated and converted to RGB as
            transformers' load_image does), an (H, W, C) array with 1, 3 or 4 channels or an (H, W) array
            (uint8 0..255; other dtypes as transformers treats them), a list of these, or an (n, H, W, C) array.

        Returns:
          (n, C, H, W) float32 array.
        """
        if isinstance(images, (list, tuple)):
            batch = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            batch = list(images)
        else:
            batch = [images]
        if not batch:
            raise InputError("images is an empty list")
        out = [self._process(image, i) for i, image in enumerate(batch)]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise InputError(f"the images have different shapes after processing ({sorted(shapes)}); set "
                             f"do_center_crop or a fixed size {{'height', 'width'}} to stack them")
        return np.stack(out).astype(np.float32, copy=False)

    def _process(self, image, index: int) -> np.ndarray:
        image, name = self._channels_first(image, index)
        try:
            if self.do_resize:
                image = _resize(image, self._output_size(image.shape[-2:]), self.resample)
            if self.do_center_crop:
                image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
            if self.do_rescale:
                image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                image = _normalize(image, self.image_mean, self.image_std)
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

    def _channels_first(self, image, index: int) -> tuple[np.ndarray, str]:
        """One input as a (C, H, W) array, converted as transformers' PilBackend.process_image does."""
        Image, _ = _pil()
        name = type(image).__name__
        if isinstance(image, (str, os.PathLike)):
            name = os.fspath(image)
            image = _open(name, index)
        if isinstance(image, Image.Image):
            if 0 in image.size:
                raise InputError(f"image {index} ({name}) is empty: size {image.size}")
            try:
                if self.do_convert_rgb:
                    if "A" in image.getbands() or image.info.get("transparency") is not None:
                        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                        image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
                    else:
                        image = image.convert("RGB")
                array = np.array(image)
            except (OSError, ValueError, SyntaxError) as e:
                raise InputError(f"image {index} ({name}) cannot be read: {e}") from None
            return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)), name
        if not isinstance(image, np.ndarray):
            raise InputError(f"image {index}: expected a PIL image, a path or a numpy array, got {name}")
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise InputError(f"image {index}: expected an (H, W) array or (H, W, C) with 1, 3 or 4 channels, "
                             f"got shape {image.shape}")
        if array.size == 0:
            raise InputError(f"image {index} is empty: shape {image.shape}")
        if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)
                or np.issubdtype(array.dtype, np.floating)):
            raise InputError(f"image {index}: unsupported dtype {array.dtype}")
        if self.do_convert_rgb:
            if array.shape[-1] == 1:
                array = np.repeat(array, 3, axis=-1)
            elif array.shape[-1] == 4:
                floating = np.issubdtype(array.dtype, np.floating)
                if floating and (array.min() < 0.0 or array.max() > 1.0):
                    raise InputError(f"image {index}: an RGBA float array must lie in [0, 1], got "
                                     f"[{array.min()}, {array.max()}]")
                white = 1.0 if floating else 255
                alpha = array[..., 3:4] / white
                composite = alpha * array[..., :3] + (1 - alpha) * white
                array = (composite if floating else np.round(composite)).astype(array.dtype)
        return np.moveaxis(array, -1, 0), name


def _open(path: str, index: int):
    """transformers' load_image for a local file: open, EXIF transpose, convert to RGB; the file is closed."""
    Image, ImageOps = _pil()
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {index}: file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"image {index} ({path}) is a directory, not an image file")
    try:
        with Image.open(path) as opened:
            if 0 in opened.size:
                raise InputError(f"image {index} ({path}) is empty: size {opened.size}")
            return ImageOps.exif_transpose(opened).convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {index} ({path}) refused: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; truncated files too
        raise InputError(f"image {index} ({path}) cannot be read: {e}") from None


def _rescale_for_pil(image: np.ndarray) -> bool:
    """transformers' _rescale_for_pil_conversion: whether [0, 1] floats must be scaled to 0..255 for pillow."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(f"pixel values outside [0, 255] ([{image.min()}, {image.max()}]) cannot be resized "
                         f"with pillow")
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(f"pixel values outside [0, 1] ([{image.min()}, {image.max()}]) cannot be resized with pillow")


def _resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """transformers' image_transforms.resize of a (C, H, W) array through a pillow image."""
    Image, _ = _pil()
    height, width = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(f"resizing to {height}x{width} exceeds pillow's decompression bomb limit "
                         f"({2 * limit} pixels)")
    rescale = _rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescale:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    resized = np.array(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    resized = np.moveaxis(resized[..., None] if resized.ndim == 2 else resized, -1, 0)
    return (resized.astype(np.float64) * (1 / 255)).astype(np.float32) if rescale else resized


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


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """transformers' image_transforms.normalize: in the image's float dtype (float32 for integer images)."""
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


class Processor:
    """An ImageProcessor and a Tokenizer together, like transformers' VisionTextDualEncoderProcessor."""

    def __init__(self, image_processor: ImageProcessor, tokenizer: Tokenizer):
        if not isinstance(image_processor, ImageProcessor):
            raise InputError(f"image_processor must be an ImageProcessor, got {type(image_processor).__name__}")
        if not isinstance(tokenizer, Tokenizer):
            raise InputError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_length: int | None = None) -> "Processor":
        """Loads the image processor and tokenizer of a model directory.

        Args:
          path: the directory (preprocessor/processor config, tokenizer files, and config.json for the text length
            limit).
          max_length: the tokenizer's default length (see Tokenizer).

        Returns:
          Processor.
        """
        return cls(ImageProcessor.from_pretrained(path), Tokenizer.from_pretrained(path, max_length=max_length))

    def __call__(self, text=None, images=None, max_length: int | None = None,
                 padding: str | bool = "max_length") -> dict[str, np.ndarray]:
        """The keyword arguments of dualenc.apply for these texts and/or images.

        Args:
          text: a string or a list of strings (see Tokenizer.__call__).
          images: one image or a list (see ImageProcessor.__call__).
          max_length, padding: as for Tokenizer.__call__.

        Returns:
          {"input_ids", "attention_mask", "token_type_ids"} (n_texts, L) int64 when text is given, and
          {"pixel_values"} (n_images, C, H, W) float32 when images are.
        """
        if text is None and images is None:
            raise InputError("give text, images, or both")
        out = {}
        if text is not None:
            out.update(self.tokenizer(text, max_length=max_length, padding=padding))
        if images is not None:
            out["pixel_values"] = self.image_processor(images)
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer files, preprocessor_config.json and processor_config.json into `path`.

        Other files in the directory are kept; each written file is replaced atomically. transformers'
        VisionTextDualEncoderProcessor and AutoProcessor load the result.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path, processor_class=PROCESSOR_CLASS)
        nested = os.path.join(path, "processor_config.json")
        processor_config = read_json(nested, "processor config") if os.path.isfile(nested) else {}
        processor_config.update(processor_class=PROCESSOR_CLASS, image_processor=self.image_processor.to_dict())
        write_json_atomic(nested, processor_config)

    def __repr__(self) -> str:
        return f"Processor({self.image_processor!r}, {self.tokenizer!r})"
