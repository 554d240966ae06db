"""SigLIP 2's NaFlex preprocessing: images into padded patch sequences, as transformers' Siglip2ImageProcessorPil.

Each image is resized, keeping its aspect ratio, to the largest multiple of the patch size on both sides that has at
most max_num_patches patches, rescaled and normalised with the same steps as ImageProcessor (so the same numbers as
transformers' PIL backend), then cut into patches row by row and padded to max_num_patches.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from dualenc.errors import ConfigError, InputError
from dualenc.hub import resolve
from dualenc.processing.pixels import (
    IMAGENET_STANDARD,
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

TYPE_NAME = "Siglip2ImageProcessor"
TYPE_NAMES = (TYPE_NAME, TYPE_NAME + "Pil", TYPE_NAME + "Fast")
# Siglip2ImageProcessorPil's class attributes: what a missing (or null) setting means.
DEFAULTS = dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=IMAGENET_STANDARD, image_std=IMAGENET_STANDARD, do_convert_rgb=False, patch_size=16,
                max_num_patches=256)
MAX_PATCHES = 1 << 16
# Settings transformers accepts that would change the output in ways not implemented here: the values allowed.
REJECTED = {"input_data_format": (None, "channels_last")}


def target_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """transformers' get_image_size_for_max_num_patches: (height, width), multiples of patch_size, at least one patch.

    A binary search over the scale (the same float steps as transformers, so the same sizes) for the largest
    aspect-preserving size, each side rounded up to a multiple of patch_size, with at most max_num_patches patches.
    """

    def scaled(scale: float, side: int) -> int:
        return int(max(patch_size, math.ceil(side * scale / patch_size) * patch_size))

    scale_min, scale_max = eps / 10, 100.0
    while (scale_max - scale_min) >= eps:
        scale = (scale_min + scale_max) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            scale_min = scale
        else:
            scale_max = scale
    return scaled(scale_min, height), scaled(scale_min, width)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W), H and W multiples of patch_size, into (H/p * W/p, p * p * C): patches row by row, each (p, p, C)."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(channels, rows, patch_size, cols, patch_size).transpose(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


class NaFlexImageProcessor:
    """Images into SigLIP 2 NaFlex patch sequences, as transformers' Siglip2ImageProcessor (PIL backend).

    ImageProcessor refuses a SigLIP 2 preprocessor_config.json and names this class: its output is a dict of
    patches, mask and patch grid shapes, not one (n, C, H, W) array.

    Images are read as ImageProcessor reads them (see its docstring: transparency composited onto white for every
    input), where this departs from transformers:
    with image_mean or image_std of 3 values (the default) images without 3 channels (grayscale, palette,
    CMYK, alpha; (H, W), (H, W, 1) or (H, W, 4) arrays) are converted to RGB although do_convert_rgb is false
    by default, transparency composited onto white; there is no opt-out, a 3-value mean/std means 3 channels.
    With one value for both, grayscale stays one channel. 16- and 32-bit PIL images are scaled to 8 bits by
    their range ("I;16*": 0..65535 to 0..255, rounded; "I" and "F": see common.to_8bit).
    """

    def __init__(self, *, patch_size: int | None = None, max_num_patches: int | None = None,
                 do_resize: bool | None = None, resample: int | None = None, do_rescale: bool | None = None,
                 rescale_factor: float | None = None, do_normalize: bool | None = None, image_mean=None,
                 image_std=None, do_convert_rgb: bool | None = None, where: str = "NaFlexImageProcessor"):
        """Args (None takes transformers' default):
          patch_size: side of the square patches (16).
          max_num_patches: patches per image after resizing, and the length every sequence is padded to (256),
            at most MAX_PATCHES.
          do_resize: resize to target_size (true); if false, every image's sides must already be multiples of
            patch_size with at most max_num_patches patches.
          resample: pillow filter code (0 nearest, 1 lanczos, 2 bilinear (default), 3 bicubic, 4 box, 5 hamming).
          do_rescale, rescale_factor: multiply by rescale_factor (1/255).
          do_normalize, image_mean, image_std: (x - mean) / std per channel (0.5 and 0.5).
          do_convert_rgb: convert every image to RGB (transparency composited onto white) first (false); when
            false, images without 3 channels are still converted if image_mean or image_std has 3 values.
          where: how errors name the source of these settings.
        """
        given = dict(patch_size=patch_size, max_num_patches=max_num_patches, do_resize=do_resize,
                     resample=resample, do_rescale=do_rescale, rescale_factor=rescale_factor,
                     do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
                     do_convert_rgb=do_convert_rgb)
        s = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        self.where = where
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            setattr(self, name, check_bool(where, name, s[name]))
        self.patch_size = check_side(where, "patch_size", s["patch_size"])
        n = s["max_num_patches"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PATCHES:
            fail(where, "max_num_patches", f"must be an integer in [1, {MAX_PATCHES}], got {n!r}")
        self.max_num_patches = n
        self.resample = check_resample(where, "resample", s["resample"])
        self.rescale_factor = check_rescale_factor(where, "rescale_factor", s["rescale_factor"])
        channels = (3,) if self.do_convert_rgb else (1, 3)
        self.image_mean = check_stats(where, "image_mean", s["image_mean"], channels)
        self.image_std = check_stats(where, "image_std", s["image_std"], channels, positive=True)
        check_float32(where, self.image_mean, self.image_std, 255 * (self.rescale_factor if self.do_rescale else 1))

    # ------------------------------------------------------------------------------------- config files

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "image processor config") -> "NaFlexImageProcessor":
        """Builds the processor from a SigLIP 2 preprocessor_config.json dict (unknown keys are ignored).

        Args:
          d: the parsed JSON object; its image_processor_type must be "Siglip2ImageProcessor" (or the Pil / Fast
            variant).
          where: how errors name its source.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        type_name = d.get("image_processor_type")
        if type_name not in TYPE_NAMES:
            fail(where, "image_processor_type", f"= {type_name!r} is not SigLIP 2's {TYPE_NAME!r}; "
                                                f"read other image processors with dualenc.ImageProcessor, or any with "
                                                f"dualenc.processing.AutoImageProcessor")
        for key, allowed in REJECTED.items():
            if d.get(key) not in allowed:
                fail(where, key, f"= {d[key]!r} is not implemented; supported: {[a for a in allowed if a]}")
        return cls(where=where, **{k: d[k] for k in DEFAULTS if k in d})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "NaFlexImageProcessor":
        """Reads the SigLIP 2 image processor settings of a model directory, or of one JSON file.

        As ImageProcessor.from_pretrained: the "image_processor" entry of processor_config.json first, then
        preprocessor_config.json (see common.read_settings).

        Args:
          path: a directory, or a preprocessor_config.json / processor_config.json file, or a Hugging Face Hub
            model id (see dualenc.hub.resolve).

        Returns:
          NaFlexImageProcessor.
        """
        d, where = read_settings(resolve(path))
        return cls.from_dict(d, where=where)

    def to_dict(self) -> dict:
        """The settings as transformers writes them in preprocessor_config.json."""
        out = {"image_processor_type": TYPE_NAME, **{k: getattr(self, k) for k in DEFAULTS}}
        for name in ("image_mean", "image_std"):
            out[name] = list(out[name]) if isinstance(out[name], tuple) else out[name]
        return out

    def save_pretrained(self, path: str | os.PathLike, *, processor_class: str | None = None) -> None:
        """Writes preprocessor_config.json into `path` (created if missing; other files kept), atomically.

        An existing processor_config.json that holds image processor settings gets the new ones too, since
        transformers reads that entry first. transformers' Siglip2ImageProcessor loads the result.
        """
        save_settings(path, self.to_dict(), processor_class)

    def __repr__(self) -> str:
        return f"NaFlexImageProcessor({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # ------------------------------------------------------------------------------------------ images

    def __call__(self, images) -> dict[str, np.ndarray]:
        """Patch sequences for one image or a list of them.

        Args:
          images: as ImageProcessor.__call__ takes them: a PIL image, a path, an (H, W) or (H, W, C) array, a list
            of these, or an (n, H, W, C) array.

        Returns:
          {"pixel_values": (n, max_num_patches, patch_size * patch_size * C) float32, each patch's pixels in
           (row, column, channel) order and the patches row by row, zeros after the image's own;
           "pixel_attention_mask": (n, max_num_patches) int32, 1 for the image's patches, 0 for padding;
           "spatial_shapes": (n, 2) int32, the patch grid (rows, columns) of each resized image}.
        """
        rows = [self._process(image, i) for i, image in enumerate(as_batch(images))]
        widths = sorted({patches.shape[-1] for patches, _ in rows})
        if len(widths) > 1:
            raise InputError(f"the images have different patch sizes after processing ({widths} values, from "
                             f"different channel counts); set do_convert_rgb to convert them all to RGB")
        pixel_values = np.zeros((len(rows), self.max_num_patches, widths[0]), np.float32)
        mask = np.zeros((len(rows), self.max_num_patches), np.int32)
        for i, (patches, _) in enumerate(rows):
            pixel_values[i, :len(patches)] = patches
            mask[i, :len(patches)] = 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask,
                "spatial_shapes": np.array([shape for _, shape in rows], np.int32).reshape(len(rows), 2)}

    def _process(self, image, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        rgb = three_channels(self.image_mean, self.image_std)
        image, name = channels_first(image, index, self.do_convert_rgb, rgb)
        p = self.patch_size
        try:
            if self.do_resize:
                size = target_size(*image.shape[-2:], p, self.max_num_patches)
                image = resize(image, size, self.resample)
            if self.do_rescale:
                image = rescale(image, self.rescale_factor)
            if self.do_normalize:
                image = normalize(image, self.image_mean, self.image_std)
        except (ValueError, OSError, MemoryError) as e:
            raise InputError(f"image {index} ({name}): {e}") from None
        height, width = image.shape[-2:]
        grid = (height // p, width // p)
        if not self.do_resize and (height % p or width % p or grid[0] * grid[1] > self.max_num_patches):
            raise InputError(f"image {index} ({name}): with do_resize false, the sides ({height}x{width}) must be "
                             f"multiples of patch_size {p} with at most max_num_patches {self.max_num_patches} "
                             f"patches")
        return patchify(image, p).astype(np.float32, copy=False), grid
