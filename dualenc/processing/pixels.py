"""Setting checks, config files and pixel steps shared by the image pipelines (images.py, naflex.py, openclip.py)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from typing import Any, Mapping

import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.files import read_json, write_json_atomic

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
MAX_SIDE = 1 << 14
F32_MAX = float(np.finfo(np.float32).max)
GRAY_MODES = ("1", "L", "LA")  # opaque composites these to "L"
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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


def check_resample(where, name, value) -> int:
    if type(value) is not int or value not in RESAMPLE:
        fail(where, name, f"must be a pillow filter code {RESAMPLE}, got {value!r}")
    return value


def check_rescale_factor(where, name, value) -> float:
    if not is_number(value) or value <= 0:
        fail(where, name, f"must be a positive finite number, got {value!r}")
    return float(value)


def check_stats(where, name, value, channels, positive=False):
    """A number, or a list with one of `channels` lengths of finite numbers: a float or a tuple of floats."""
    values = (value,) if is_number(value) else value
    if not isinstance(values, (list, tuple)) or len(values) not in channels or not all(map(is_number, values)):
        fail(where, name, f"must be a number or a list of {' or '.join(map(str, channels))} finite numbers "
                          f"(one per channel), got {value!r}")
    if positive and any(v <= 0 for v in values):
        fail(where, name, f"must be positive, got {value!r}")
    return float(value) if len(values) == 1 and not isinstance(value, (list, tuple)) else tuple(map(float, values))


def check_float32(where, mean, std, top: float, names=("image_mean", "image_std", "rescale_factor")) -> None:
    """Refuses settings whose normalised pixels, (x - mean) / std for x in [0, top], are not finite in float32.

    Args:
      where: how errors name the source of the settings.
      mean, std: as check_stats returns them (a float or a tuple of floats).
      top: the largest pixel value before normalising (255 * rescale_factor, or 255 without rescaling).
      names: the fields of mean, std and of what sets `top` (None where nothing does), for errors.
    """
    mean_name, std_name, scale_name = names
    means, stds = (v if isinstance(v, tuple) else (v,) for v in (mean, std))
    with np.errstate(over="ignore", under="ignore"):
        means32, stds32 = ([float(np.float32(v)) for v in values] for values in (means, stds))
    for name, value, values in ((mean_name, mean, means32), (std_name, std, stds32)):
        if not all(map(math.isfinite, values)):
            fail(where, name, f"must lie within float32's range (+-{F32_MAX:.4g}), got {value!r}")
    if 0.0 in stds32:
        fail(where, std_name, f"rounds to 0 in float32, got {std!r}")
    if top > F32_MAX:
        fail(where, scale_name, f"scales pixel values up to {top:.4g}, beyond float32's range ({F32_MAX:.4g})")
    n = max(len(means32), len(stds32))
    pairs = list(zip(means32 * n if len(means32) == 1 else means32, stds32 * n if len(stds32) == 1 else stds32))
    bound = max(max(abs(m), abs(top - m)) / s for m, s in pairs)  # computed in float64
    if bound > F32_MAX:
        # Name the setting that contributes most to the overflow; the message gives all three.
        culprits = {mean_name: max(map(abs, means32)), std_name: 1 / min(stds32)}
        if scale_name is not None:
            culprits[scale_name] = top
        fail(where, max(culprits, key=culprits.get),
             f"normalises pixel values to up to {bound:.4g}, beyond float32's range ({F32_MAX:.4g}): "
             f"{mean_name} {mean!r}, {std_name} {std!r}, pixels in [0, {top:.4g}]")


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(image - mean) / std per channel of a (C, H, W) array, in its float dtype (float32 for integer images)."""
    channels = image.shape[0]
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    for name, value in (("image_mean", mean), ("image_std", std)):
        if isinstance(value, tuple) and len(value) != channels:
            hint = " (one value: pass grayscale images, PIL mode \"L\")" if len(value) == 1 else ""
            raise ValueError(f"{name} has {len(value)} values but the image has {channels} channels{hint}")
    mean = np.array(mean if isinstance(mean, tuple) else [mean] * channels, dtype=image.dtype)
    std = np.array(std if isinstance(std, tuple) else [std] * channels, dtype=image.dtype)
    return (image - mean[:, None, None]) / std[:, None, None]


def open_image(path: str, index: int, mode: str | None = "RGB", *, data: bytes | None = None):
    """Opens a local image file as transformers' load_image does: EXIF transpose, then convert to `mode`.

    16- and 32-bit grayscale files are scaled to 8 bits first (see to_8bit) when `mode` is given; converting to
    "RGB" composites transparency onto white (see to_rgb), where load_image's convert drops the alpha band and
    shows the colours stored under it (black in most transparent PNGs). A file over
    PIL.Image.MAX_IMAGE_PIXELS (but within pillow's limit of twice that) is opened with one UserWarning naming
    it, in place of pillow's DecompressionBombWarning; beyond twice the limit it is an InputError.

    Args:
      path: the file.
      index: its place in the batch, for errors.
      mode: the PIL mode to convert to, or None to keep the file's own (the image is loaded either way, and
        the file closed).
      data: the encoded file's bytes (e.g. a webdataset or ArrayRecord sample), read instead of `path`, which
        then only names the image in messages.

    Returns:
      PIL.Image.Image.
    """
    Image, ImageOps = pil()
    if data is None and not os.path.exists(path):
        raise FileNotFoundError(f"image {index}: file not found: {path}")
    if data is None and os.path.isdir(path):
        raise InputError(f"image {index} ({path}) is a directory, not an image file")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as opened:
                if 0 in opened.size:
                    raise InputError(f"image {index} ({path}) is empty: size {opened.size}")
                pixels = opened.width * opened.height
                image = ImageOps.exif_transpose(opened)
                if mode is not None:
                    image = to_8bit(image)
                    image = to_rgb(image) if mode == "RGB" else image.convert(mode)
                image.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {index} ({path}) refused: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; truncated files too
        raise InputError(f"image {index} ({path}) cannot be read: {e}") from None
    if limit is not None and pixels > limit:
        warnings.warn(f"image {index} ({path}) has {pixels} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
                      f"({limit}); it was opened, as pillow opens images below twice that", UserWarning,
                      stacklevel=2)
    return image


def to_8bit(image):
    """A 16- or 32-bit grayscale PIL image as an 8-bit "L" one; images of other modes as they are.

    "I;16", "I;16B", "I;16L" and "I;16N" (16-bit PNGs): 0..65535 onto 0..255, rounded. "I" and "F" by the values
    they hold: within 0..255 as pillow converts them ("F" truncated), except "F" within [0, 1], which is scaled
    by 255 and rounded (as float arrays in [0, 1] are); else within 0..65535 as a 16-bit image; else the image's
    own min..max onto 0..255 (a constant image gives 0). A 16-bit or 32-bit value marked transparent
    (info["transparency"]) gives an "LA" image, that value transparent. NaN or infinite "F" values are a
    ValueError.
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    Image, _ = pil()
    values = np.asarray(image)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        if not np.isfinite(values).all():
            raise ValueError(f"a mode {mode} image with NaN or infinite values")
        lo, hi = float(values.min()), float(values.max())
        if mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            return image.convert("L")
        elif lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
    scale = 255 / (hi - lo) if hi > lo else 0.0
    gray = np.clip(np.round((values.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(gray, "L")


def has_transparency(image) -> bool:
    """Whether a PIL image has an alpha band or a transparent value (info["transparency"]: a palette index, gray
    value or RGB colour key), as transformers' convert_to_rgb tells."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def opaque(image):
    """A PIL image with transparency (see has_transparency) composited onto white, the one rule of every image
    processor and input route: "L" for a grayscale image ("1", "L", "LA"), else "RGB"; others as they are."""
    if not has_transparency(image):
        return image
    Image, _ = pil()
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return rgb.convert("L") if image.mode in GRAY_MODES else rgb  # exact: the composite of gray is gray


def to_rgb(image):
    """transformers' convert_to_rgb of a PIL image: transparency composited onto white (see opaque), then RGB."""
    return opaque(image).convert("RGB")


def three_channels(mean, std) -> bool:
    """Whether image_mean or image_std (as check_stats returns them) has 3 values: the images must be RGB."""
    return any(isinstance(v, tuple) and len(v) == 3 for v in (mean, std))


# ----------------------------------------------------------------------------------------- config files


def read_settings(path: str | os.PathLike) -> tuple[dict, str]:
    """The image processor settings of a transformers directory or JSON file, and how errors should name them.

    In a directory the "image_processor" entry of processor_config.json comes first (as in transformers 5), then
    preprocessor_config.json; a file holding such an entry (and no image_processor_type) gives the entry.

    Returns:
      (settings dict, where): `where` is the file, with ": image_processor" appended for a nested entry.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        nested = os.path.join(path, "processor_config.json")
        if os.path.isfile(nested):
            entry = read_json(nested, "processor config").get("image_processor")
            if isinstance(entry, Mapping):
                return dict(entry), f"{nested}: image_processor"
        path = os.path.join(path, "preprocessor_config.json")
    d = read_json(path, "image processor config")
    if "image_processor_type" not in d and isinstance(d.get("image_processor"), Mapping):
        return dict(d["image_processor"]), f"{path}: image_processor"
    return d, path


def save_settings(path: str | os.PathLike, settings: Mapping[str, Any], processor_class: str | None = None) -> None:
    """Writes `settings` as preprocessor_config.json into `path` (created if missing; other files kept), atomically.

    An existing processor_config.json that holds image processor settings gets the new ones too, since
    transformers reads that entry first.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    d = dict(settings)
    if processor_class:
        d["processor_class"] = processor_class
    write_json_atomic(os.path.join(path, "preprocessor_config.json"), d)
    nested = os.path.join(path, "processor_config.json")
    if os.path.isfile(nested):
        processor_config = read_json(nested, "processor config")
        if "image_processor" in processor_config:
            processor_config["image_processor"] = dict(settings)
            write_json_atomic(nested, processor_config)


# ----------------------------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (a webdataset or ArrayRecord sample): the image processors read it as
    they read the file itself; `name` names it in messages."""

    name: str
    data: bytes = dataclasses.field(repr=False)


def open_input(image, index: int, mode: str | None = "RGB"):
    """(the opened image, its name) for a path or an EncodedImage (see open_image)."""
    if isinstance(image, EncodedImage):
        return open_image(image.name, index, mode, data=image.data), image.name
    name = os.fspath(image)
    return open_image(name, index, mode), name


def as_batch(images) -> list:
    """One image, a list of them or an (n, H, W, C) array, as a non-empty list."""
    if isinstance(images, (list, tuple)):
        batch = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise InputError("images is an empty list")
    return batch


def channels_first(image, index: int, convert_rgb: bool, rgb: bool = False) -> tuple[np.ndarray, str]:
    """One input as a (C, H, W) array, converted as transformers' PilBackend.process_image does, and to RGB.

    PIL images of 16- or 32-bit modes ("I;16*", "I", "F") are first scaled to 8 bits (see to_8bit). Transparency
    (an alpha band, or a palette, gray or RGB transparent value) is composited onto white whatever the settings
    (see opaque: grayscale stays grayscale), and so are (H, W, 4) arrays, read as RGBA (floats must lie in
    [0, 1], integers are 0..255 whatever their dtype); conversion to RGB then repeats (H, W, 1) arrays.

    Args:
      image: a PIL image, a path or an EncodedImage (opened as transformers' load_image does), an (H, W) array or
        an (H, W, C) array with 1, 3 or 4 channels.
      index: its place in the batch, for errors.
      convert_rgb: convert every image to RGB (transformers' do_convert_rgb).
      rgb: convert to RGB the images that do not have 3 channels (the settings need 3: see three_channels);
        those that do (RGB, and YCbCr, LAB or HSV images) are kept as they are.

    Returns:
      ((C, H, W) array, a name for the input in errors).
    """
    Image, _ = pil()
    name = type(image).__name__
    if isinstance(image, (str, os.PathLike, EncodedImage)):
        image, name = open_input(image, index)
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise InputError(f"image {index} ({name}) is empty: size {image.size}")
        try:
            image = opaque(to_8bit(image))
            if convert_rgb or (rgb and len(image.getbands()) != 3):
                image = image.convert("RGB")
            array = np.array(image)
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"image {index} ({name}) cannot be read: {e}") from None
        return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)), name
    if not isinstance(image, np.ndarray):
        raise InputError(f"image {index}: expected a PIL image, a path, an EncodedImage or a numpy array, got "
                         f"{name}")
    array = image[..., None] if image.ndim == 2 else image
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(f"image {index}: expected an (H, W) array or (H, W, C) with 1, 3 or 4 channels, "
                         f"got shape {image.shape}")
    if array.size == 0:
        raise InputError(f"image {index} is empty: shape {image.shape}")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"image {index}: unsupported dtype {array.dtype}")
    if array.shape[-1] == 4:
        floating = np.issubdtype(array.dtype, np.floating)
        if floating and (array.min() < 0.0 or array.max() > 1.0):
            raise InputError(f"image {index}: an RGBA float array must lie in [0, 1], got "
                             f"[{array.min()}, {array.max()}]")
        white = 1.0 if floating else 255
        alpha = array[..., 3:4] / white
        composite = alpha * array[..., :3] + (1 - alpha) * white
        array = (composite if floating else np.round(composite)).astype(array.dtype)
    elif array.shape[-1] == 1 and (convert_rgb or rgb):
        array = np.repeat(array, 3, axis=-1)
    return np.moveaxis(array, -1, 0), name


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


def resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """transformers' image_transforms.resize of a (C, H, W) array through a pillow image, to (height, width)."""
    Image, _ = pil()
    height, width = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(f"resizing to {height}x{width} exceeds pillow's decompression bomb limit "
                         f"({2 * limit} pixels)")
    rescale_ = _rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescale_:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    resized = np.array(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    resized = np.moveaxis(resized[..., None] if resized.ndim == 2 else resized, -1, 0)
    return (resized.astype(np.float64) * (1 / 255)).astype(np.float32) if rescale_ else resized


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """image * factor, computed in float64 and returned as float32 (transformers' image_transforms.rescale)."""
    return (image.astype(np.float64) * factor).astype(np.float32)


