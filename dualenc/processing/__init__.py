"""Images and texts into the arrays dualenc.apply takes, as transformers' processors (or open_clip) give them."""

from dualenc.processing.augment import Augment
from dualenc.processing.pixels import EncodedImage
from dualenc.processing.images import ImageProcessor
from dualenc.processing.naflex import NaFlexImageProcessor
from dualenc.processing.processor import AutoImageProcessor, Processor
from dualenc.processing.text import Tokenizer

__all__ = ["Augment", "AutoImageProcessor", "EncodedImage", "ImageProcessor", "NaFlexImageProcessor", "Processor", "Tokenizer"]
