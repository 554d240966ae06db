"""Processor: an image processor and a Tokenizer together, like transformers' VisionTextDualEncoderProcessor,
SiglipProcessor and Siglip2Processor."""

from __future__ import annotations

import os

import numpy as np

from dualenc.errors import InputError
from dualenc.files import read_json, write_json_atomic
from dualenc.layouts import is_open_clip_dir
from dualenc.hub import resolve
from dualenc.processing import naflex
from dualenc.processing.pixels import read_settings
from dualenc.processing.images import ImageProcessor
from dualenc.processing.naflex import NaFlexImageProcessor
from dualenc.processing.text import Tokenizer

PROCESSOR_CLASS = "VisionTextDualEncoderProcessor"
# transformers' Siglip2Processor passes its own patch_size / max_num_patches (these) to the image processor,
# over the image processor's settings: other settings are saved under the generic processor class, which keeps them.
SIGLIP2_PROCESSOR_PATCHES = (16, 256)


def load_image_processor(path: str | os.PathLike, *, revision: str | None = None
                         ) -> ImageProcessor | NaFlexImageProcessor:
    """The image processor of a model directory (or settings file): a NaFlexImageProcessor where the settings
    name SigLIP 2's Siglip2ImageProcessor, else an ImageProcessor (see ImageProcessor.from_pretrained); or of a
    Hugging Face Hub model id (see dualenc.hub.resolve; `revision` its branch, tag or commit).
    AutoImageProcessor.from_pretrained is this function."""
    path = resolve(path, revision=revision)
    if not (os.path.isdir(path) and is_open_clip_dir(path)):
        settings, where = read_settings(path)
        if settings.get("image_processor_type") in naflex.TYPE_NAMES:
            return NaFlexImageProcessor.from_dict(settings, where=where)
    return ImageProcessor.from_pretrained(path)


class AutoImageProcessor:
    """The image processor of any directory, file or hub id dualenc reads, as transformers' AutoImageProcessor
    chooses the class: `dualenc.AutoImageProcessor.from_pretrained(path)` gives a NaFlexImageProcessor for SigLIP 2
    (Siglip2ImageProcessor settings), else an ImageProcessor (ViT, CLIP, SigLIP settings, or open_clip's eval
    transform for an open_clip directory). Processor.from_pretrained chooses its image processor the same way.
    It is not instantiated itself."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoImageProcessor is not instantiated: use AutoImageProcessor.from_pretrained(path), or "
                        "ImageProcessor(...) / NaFlexImageProcessor(...)")

    @staticmethod
    def from_pretrained(path: str | os.PathLike, *, revision: str | None = None
                        ) -> ImageProcessor | NaFlexImageProcessor:
        """Reads the image processor settings of a model directory, one settings file or a hub id.

        Args:
          path: a directory (the "image_processor" entry of processor_config.json first, then
            preprocessor_config.json; or open_clip_config.json in open_clip's layout), one of those files, or a
            Hugging Face Hub model id (see dualenc.hub.resolve).
          revision: the hub repository's branch, tag or commit, for an id.

        Returns:
          NaFlexImageProcessor where the settings name Siglip2ImageProcessor (or its Pil / Fast variant), else
          ImageProcessor (see ImageProcessor.from_pretrained, whose errors it raises for other settings).
        """
        return load_image_processor(path, revision=revision)


def image_inputs(processor, images) -> dict[str, np.ndarray]:
    """The vision tower's keyword arrays for images: {"pixel_values"} (n, C, H, W), or a NaFlex processor's
    {"pixel_values", "pixel_attention_mask", "spatial_shapes"}.

    Args:
      processor: a Processor, ImageProcessor or NaFlexImageProcessor (or anything that maps images to an array
        or to such a dict).
      images: as the image processor takes them.
    """
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images)
    return dict(out) if isinstance(out, dict) else {"pixel_values": out}


def processor_class(image_processor) -> str:
    """The transformers processor class to save with an image processor: SiglipProcessor / Siglip2Processor for
    SigLIP's, else VisionTextDualEncoderProcessor (which calls both parts with their own settings)."""
    if isinstance(image_processor, NaFlexImageProcessor):
        patches = (image_processor.patch_size, image_processor.max_num_patches)
        return "Siglip2Processor" if patches == SIGLIP2_PROCESSOR_PATCHES else PROCESSOR_CLASS
    return "SiglipProcessor" if image_processor.image_processor_type == "SiglipImageProcessor" else PROCESSOR_CLASS


class Processor:
    """An image processor (ImageProcessor, or NaFlexImageProcessor for SigLIP 2) and a Tokenizer together, like
    transformers' VisionTextDualEncoderProcessor, SiglipProcessor and Siglip2Processor."""

    def __init__(self, image_processor: ImageProcessor | NaFlexImageProcessor, tokenizer: Tokenizer):
        if not isinstance(image_processor, (ImageProcessor, NaFlexImageProcessor)):
            raise InputError(f"image_processor must be an ImageProcessor or NaFlexImageProcessor, got "
                             f"{type(image_processor).__name__}")
        if not isinstance(tokenizer, Tokenizer):
            raise InputError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_length: int | None = None,
                        revision: str | None = None) -> "Processor":
        """Loads the image processor and tokenizer of a model directory.

        Args:
          path: the directory (preprocessor/processor config, or open_clip_config.json: see
            AutoImageProcessor; tokenizer files, and config.json for the text length limit), as transformers'
            processors save it. SigLIP 2 (Siglip2ImageProcessor) settings give a NaFlexImageProcessor. Or a
            Hugging Face Hub model id (see dualenc.hub.resolve).
          max_length: the tokenizer's default length (see Tokenizer).
          revision: the hub repository's branch, tag or commit, for an id.

        Returns:
          Processor.
        """
        path = resolve(path, revision=revision)
        return cls(AutoImageProcessor.from_pretrained(path), Tokenizer.from_pretrained(path, max_length=max_length))

    def __call__(self, text=None, images=None, max_length: int | None = None,
                 padding: str | bool = "max_length") -> dict[str, np.ndarray]:
        """The keyword arguments of dualenc.apply for these texts and/or images.

        Args:
          text: a string or a list of strings (see Tokenizer.__call__).
          images: one image or a list (see ImageProcessor.__call__).
          max_length, padding: as for Tokenizer.__call__.

        Returns:
          {"input_ids", "attention_mask", "token_type_ids"} (n_texts, L) int64 when text is given (those the
          tokenizer returns), and {"pixel_values"} (n_images, C, H, W) float32 when images are; with a NaFlex
          image processor, {"pixel_values", "pixel_attention_mask", "spatial_shapes"} as it gives them.
        """
        if text is None and images is None:
            raise InputError("give text, images, or both")
        out = {}
        if text is not None:
            out.update(self.tokenizer(text, max_length=max_length, padding=padding))
        if images is not None:
            out.update(image_inputs(self.image_processor, images))
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer files, preprocessor_config.json and processor_config.json into `path`.

        Other files in the directory are kept; each written file is replaced atomically. transformers'
        AutoProcessor loads the result as the processor_class(...) named there, which gives the same arrays.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        name = processor_class(self.image_processor)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path, processor_class=name)
        nested = os.path.join(path, "processor_config.json")
        processor_config = read_json(nested, "processor config") if os.path.isfile(nested) else {}
        processor_config.update(processor_class=name, image_processor=self.image_processor.to_dict())
        write_json_atomic(nested, processor_config)

    def __repr__(self) -> str:
        return f"Processor({self.image_processor!r}, {self.tokenizer!r})"
