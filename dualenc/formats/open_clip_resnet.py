"""open_clip's ModifiedResNet image towers (OpenAI's RN50, RN101, RN50x4/x16/x64) in its hub layout: the vision_cfg
read as a dualenc.towers.resnet.ModifiedResNetConfig, and the `visual.*` tensors renamed for a dual encoder.

open_clip's ResNet ends in its own projection (the attention pool's c_proj, to embed_dim) where its text tower
has text_projection: dualenc reads the pair as a "vision-text-dual-encoder" whose visual_projection is the
identity (the image embeddings are the tower's output, exactly). No transformers class holds a ModifiedResNet,
so `save_pretrained` writes dualenc's own VisionTextDualEncoder layout (config.json with a "modified_resnet"
vision_config, the tower's tensors under open_clip's names), which load_pretrained reads back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dualenc import model
from dualenc.config import DualEncoderConfig
from dualenc.errors import CheckpointError, ConfigError
from dualenc.towers.resnet import ModifiedResNetConfig

HEAD_WIDTH = 64  # open_clip's CLIPVisionCfg default


def _int(cfg: Mapping, key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return value


def vision_config(v: Mapping[str, Any], embed_dim: Any, where: str) -> ModifiedResNetConfig:
    """The tower a vision_cfg with a list `layers` describes, as open_clip builds it: heads = width * 32 //
    head_width, output_dim = embed_dim. Its other fields (ViT's) are unused by open_clip's ResNet."""
    where = f"{where} (a ModifiedResNet image tower: 'layers' is a list)"
    head_width = _int(v, "head_width", where, HEAD_WIDTH)
    width = _int(v, "width", where, 64)
    if head_width < 1 or head_width > width * 32:
        raise ConfigError(f"{where}: field 'head_width' = {head_width} must be in [1, width * 32 = {width * 32}]")
    try:
        return ModifiedResNetConfig(layers=tuple(v["layers"]), width=width, heads=width * 32 // head_width,
                                    output_dim=embed_dim, image_size=_int(v, "image_size", where, 224))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def split_tensors(tensors: Mapping[str, np.ndarray], config: DualEncoderConfig,
                  where: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the tensors of everything else, the ResNet's under the dual encoder's names with the identity
    visual_projection); (tensors, {}) unless config's vision tower is a ModifiedResNet. BatchNorm's
    num_batches_tracked counters are dropped (the momentum update does not read them)."""
    if not isinstance(config.vision, ModifiedResNetConfig):
        return dict(tensors), {}
    prefix = config.kind.modules["vision"]
    rest, vision = {}, {}
    for name, value in tensors.items():
        if not name.startswith("visual."):
            rest[name] = value
        elif name.endswith(".num_batches_tracked"):
            if value.size != 1:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected a scalar counter")
        else:
            vision[prefix + name[len("visual."):]] = value
    vision[f"{model.PROJECTIONS['vision']}.weight"] = np.eye(config.projection_dim, dtype=np.float32)
    return rest, vision
