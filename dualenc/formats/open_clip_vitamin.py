"""open_clip's timm ViTamin image towers (the ViTamin-* configs, vision_cfg.timm_model_name one of timm's vitamin_*
names) in its hub layout, over dualenc.towers.vitamin: the row of dualenc.formats.open_clip_timm's FAMILIES that
reads them.

open_clip passes timm only the name, so each name keeps its architecture here (timm/models/vitamin.py). Every
ViTamin config open_clip ships has timm_pool "" (timm's own: the mean of the tokens, then fc_norm) and timm_proj
"linear": open_clip's bias-free Linear from the width to embed_dim, which reads as the visual_projection of a
"vision-text-dual-encoder". transformers has no ViTamin model: `save_pretrained` writes dualenc's
VisionTextDualEncoder layout (a "vitamin" vision_config, the tower's tensors under timm's names with q/k/v split),
which load_pretrained reads back.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError, ConfigError
from dualenc.formats import timm_fields
from dualenc.towers.vitamin import VitaminConfig


class Arch(NamedTuple):
    """A timm ViTamin architecture: its registered model's arguments (VitCfg and the VisionTransformer's)."""

    stem: int  # VitCfg.stem_width
    stages: tuple[int, int]  # VitCfg.embed_dim[:2]
    stage_depths: tuple[int, int]  # VitCfg.depths[:2]
    width: int  # the transformer's embed_dim (VitCfg.embed_dim[2])
    depth: int
    heads: int
    mlp_ratio: float
    image_size: int
    position: bool  # a learned position table (pos_embed "none": False)


_LARGE = Arch(160, (160, 320), (2, 4), 1024, 31, 16, 2.0, 224, True)
_XLARGE = Arch(192, (192, 384), (2, 4), 1152, 32, 16, 2.0, 256, False)
VITAMIN = {
    "vitamin_small_224": Arch(64, (64, 128), (2, 4), 384, 14, 6, 2.0, 224, True),
    "vitamin_base_224": Arch(128, (128, 256), (2, 4), 768, 14, 12, 2.0, 224, True),
    **{f"vitamin_{size}_{n}": _LARGE._replace(image_size=n) for size in ("large", "large2")
       for n in (224, 256, 336, 384)},
    **{f"vitamin_xlarge_{n}": _XLARGE._replace(image_size=n) for n in (256, 336, 384)},
}
DESCRIPTION = f"timm's ViTamin ({', '.join(VITAMIN)}) with timm_pool '' or 'avg' and timm_proj 'linear'"
ACCEPTED = {"timm_pool": ("", "avg"), "timm_proj": ("linear",), "timm_proj_bias": (False,), "timm_drop": (0, 0.0),
            "patch_dropout": (0, 0.0)}


def _accepted(v: Mapping, key: str, default, where: str):
    return timm_fields.accepted(v, key, default, ACCEPTED[key], where, "ViTamin")


def vision_config(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> VitaminConfig:
    """The tower of a vision_cfg naming one of ViTamin's architectures, as open_clip's TimmModel builds it (the
    image size its own; without a position table, as the xlarge models, vision_cfg's image_size runs as it is)."""
    arch = VITAMIN[name]
    _accepted(v, "timm_pool", "avg", where)  # "": the network's own pooling, "avg"
    _accepted(v, "timm_proj", "linear", where)
    _accepted(v, "timm_proj_bias", False, where)
    _accepted(v, "timm_drop", 0.0, where)  # head dropout (training): not implemented
    _accepted(v, "patch_dropout", 0.0, where)  # open_clip passes it to timm (patch_drop_rate): not implemented
    drop_path = timm_fields.drop_path_rate(v, where)
    size = timm_fields.square_image_size(v, where)
    if arch.position and size != arch.image_size:
        raise ConfigError(f"{where}: field 'image_size' = {v.get('image_size')!r} does not match timm's {name!r}, "
                          f"built for {arch.image_size} px (open_clip passes timm only the name; its position "
                          f"table is for that grid)")
    try:
        return VitaminConfig(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
                             intermediate_size=int(arch.width * arch.mlp_ratio), stem_size=arch.stem,
                             stage_sizes=arch.stages, stage_depths=arch.stage_depths, image_size=size,
                             position_embedding=arch.position, drop_path_rate=drop_path)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


TRUNK, OWN = "visual.trunk.", "visual.vitamin."  # open_clip's prefix; the one prepare gives a ViTamin's tensors
ANCHOR = TRUNK + "patch_embed.backbone.stem.conv1.weight"
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def prepare(tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """A ViTamin tower's tensors (its stem's first convolution marks it) moved from visual.trunk. to
    visual.vitamin. (so no other timm family's names match them), each block's fused qkv split as q_proj /
    k_proj / v_proj; other tensors unchanged."""
    if ANCHOR not in tensors:
        return dict(tensors)
    out = {}
    for name, value in tensors.items():
        if not name.startswith(TRUNK):
            out[name] = value
            continue
        rest = name[len(TRUNK):]
        fused = _QKV.match(rest)
        if fused:
            if value.shape[0] % 3:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{OWN}blocks.{fused[1]}.attn.{part}_proj.{fused[2]}"] = chunk
            continue
        out[OWN + rest] = value
    return out


def tensor(name: str, value: np.ndarray, where: str) -> tuple[str, np.ndarray] | None:
    """(its name in the dual encoder's checkpoint, value) for a tensor prepare gave a ViTamin name, or open_clip's
    linear head; None for any other."""
    if name == "visual.head.proj.weight":
        return "visual_projection.weight", value
    if name.startswith(OWN):
        return "vision_model." + name[len(OWN):], value
    return None
