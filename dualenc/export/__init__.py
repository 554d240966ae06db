"""Exported encoders: jax.export programs and ONNX graphs of a model's image and text encoders, run without
dualenc (`dualenc export`)."""

from dualenc.export.bundle import FORMAT, FORMAT_VERSION, MANIFEST, export_encoders
from dualenc.export.encoders import Encoder, make_encoders

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Encoder", "export_encoders", "make_encoders"]
