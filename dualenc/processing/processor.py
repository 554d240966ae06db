"""Processor: an ImageProcessor and a Tokenizer together, like transformers' VisionTextDualEncoderProcessor."""

from __future__ import annotations

import os

import numpy as np

from dualenc.errors import InputError
from dualenc.files import read_json, write_json_atomic
from dualenc.processing.images import ImageProcessor
from dualenc.processing.text import Tokenizer

PROCESSOR_CLASS = "VisionTextDualEncoderProcessor"


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
          path: the directory (preprocessor/processor config, or open_clip_config.json: see
            ImageProcessor.from_pretrained; tokenizer files, and config.json for the text length limit). A SigLIP 2
            (NaFlex) image processor is refused with a ConfigError naming NaFlexImageProcessor, which reads it.
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
