"""A whole dual encoder read from a directory or a Hub id, whatever wrote it (transformers or open_clip)."""

from __future__ import annotations

import os

from dualenc import layouts
from dualenc.config import DualEncoderConfig
from dualenc.formats import open_clip
from dualenc.formats.transformers import load_dir
from dualenc.hub import resolve


def load_pretrained(path: str | os.PathLike, *, stacked: bool = False,
                    revision: str | None = None) -> tuple[DualEncoderConfig, dict]:
    """Loads a whole dual encoder from a directory as (config, params), each tower's encoder a tuple of
    per-layer dicts, or with stacked=True one dict with a leading depth axis (see dualenc.init).

    Reads transformers' VisionTextDualEncoderModel and CLIPModel directories (config.json + model.safetensors
    or a sharded index), and open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors).
    A directory holding both layouts (as many LAION repositories do) is read as transformers'.

    `path` may also be a Hugging Face Hub model id ("org/name", at `revision`), read from the hub cache or
    downloaded there (safetensors, JSON and tokenizer files only; see dualenc.hub.resolve).
    """
    path = resolve(path, revision=revision)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if layouts.is_open_clip_dir(path):
        return open_clip.load_dir(path, stacked)
    return load_dir(path, stacked)
