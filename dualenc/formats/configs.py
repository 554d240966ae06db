"""config.json in: a dual encoder's (VisionTextDualEncoder, CLIP, SigLIP) or a single tower's, from a file, a
directory or a Hugging Face Hub model id. The configs themselves (dualenc.config, the tower modules) read nothing."""

from __future__ import annotations

import os

from dualenc.config import DualEncoderConfig, TextConfig, VisionConfig, config_from_dict
from dualenc.files import read_json
from dualenc.hub import resolve


def load_config(path: str | os.PathLike) -> DualEncoderConfig | VisionConfig | TextConfig:
    """Reads a config.json (or the directory holding one): a dual encoder (VisionTextDualEncoder, CLIP or
    SigLIP) config, or a single tower's; or a Hugging Face Hub model id's (see dualenc.hub.resolve)."""
    path = resolve(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return config_from_dict(read_json(path, "config"), where=path)
