"""Which library wrote a checkpoint directory, from its file names alone (nothing is read): transformers
(config.json) or open_clip's hub layout (open_clip_config.json). Formats and processing both ask."""

from __future__ import annotations

import os

OPEN_CLIP_CONFIG = "open_clip_config.json"


def is_open_clip_dir(path: str | os.PathLike) -> bool:
    """A directory in open_clip's hub layout: open_clip_config.json and no transformers config.json.

    Where both are present (many LAION repositories hold both layouts), config.json wins: the model, its
    tokenizer and its image processor are then all read as transformers reads them.
    """
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG))
            and not os.path.isfile(os.path.join(path, "config.json")))
