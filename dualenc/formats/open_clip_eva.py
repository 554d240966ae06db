"""open_clip's timm EVA image towers (EVA-CLIP: the EVA01-g and EVA02-B/L/E configs, vision_cfg.timm_model_name
one of timm's Eva names) in its hub layout, over dualenc.towers.eva: the row of dualenc.formats.open_clip_timm's
FAMILIES that reads them.

open_clip passes timm only the name, so each name keeps its architecture here (timm/models/eva.py). With
`timm_proj` null (every EVA config open_clip ships) timm's own classifier, a Linear with bias from the width to
embed_dim, is the image embedding: it is the tower's head, and the pair reads as a "vision-text-dual-encoder"
whose visual_projection is the identity (exactly the tower's output). With "linear" (bias-free) the tower has no
head and visual_projection is that Linear. transformers has no EVA model: `save_pretrained` writes dualenc's
VisionTextDualEncoder layout (an "eva" vision_config, the tower's tensors under timm's names with q/k/v split),
which load_pretrained reads back.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError, ConfigError
from dualenc.towers.eva import EvaConfig


class Arch(NamedTuple):
    """A timm Eva architecture: its registered model's arguments that open_clip's configs reach."""

    patch: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    mlp: str  # "swiglu" (with the MLP's inner LayerNorm, scale_mlp) or "gelu"
    scaled: bool  # scale_mlp and scale_attn_inner
    post_norm: bool
    rope: tuple[int, int] | None  # use_rot_pos_emb's ref_feat_shape; None: no rotary embedding
    image_size: int


EVA = {
    "eva02_base_patch16_clip_224": Arch(16, 768, 12, 12, 4 * 2 / 3, "swiglu", True, False, (16, 16), 224),
    "eva02_large_patch14_clip_224": Arch(14, 1024, 24, 16, 4 * 2 / 3, "swiglu", True, False, (16, 16), 224),
    "eva02_large_patch14_clip_336": Arch(14, 1024, 24, 16, 4 * 2 / 3, "swiglu", True, False, (16, 16), 336),
    "eva02_enormous_patch14_clip_224": Arch(14, 1792, 64, 16, 15360 / 1792, "gelu", False, True, None, 224),
    "eva_giant_patch14_224": Arch(14, 1408, 40, 16, 6144 / 1408, "gelu", False, False, None, 224),
}
DESCRIPTION = f"timm's EVA ({', '.join(EVA)}) with timm_pool 'token' and timm_proj null or 'linear'"
ACCEPTED = {"timm_pool": ("token",), "timm_proj": (None, "linear"), "timm_drop": (0, 0.0), "patch_dropout": (0, 0.0)}


def _accepted(v: Mapping, key: str, default, where: str):
    value = v.get(key, default)
    if not any(value == ok and type(value) is type(ok) for ok in ACCEPTED[key]):
        raise ConfigError(f"{where}: field '{key}' = {value!r} is not implemented for a timm EVA tower; "
                          f"supported: {list(ACCEPTED[key])}")
    return value


def vision_config(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> EvaConfig:
    """The tower of a vision_cfg naming one of EVA's architectures, as open_clip's TimmModel builds it."""
    arch = EVA[name]
    _accepted(v, "timm_pool", "avg", where)
    proj = _accepted(v, "timm_proj", "linear", where)
    _accepted(v, "timm_drop", 0.0, where)
    _accepted(v, "patch_dropout", 0.0, where)  # open_clip passes it to timm's Eva (patch_drop_rate)
    if proj == "linear" and v.get("timm_proj_bias", False) is not False:
        raise ConfigError(f"{where}: field 'timm_proj_bias' = {v['timm_proj_bias']!r} is not implemented for a timm "
                          f"EVA tower with timm_proj 'linear'; supported: [False]")
    drop_path = v.get("timm_drop_path")
    drop_path = 0.0 if drop_path is None else drop_path
    if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
        raise ConfigError(f"{where}: field 'timm_drop_path' must be null or a rate in [0, 1), got {drop_path!r}")
    size = v.get("image_size", 224)
    if size not in (arch.image_size, [arch.image_size] * 2) or isinstance(size, bool):
        raise ConfigError(f"{where}: field 'image_size' = {size!r} does not match timm's {name!r}, built for "
                          f"{arch.image_size} px (open_clip passes timm only the name)")
    try:
        return EvaConfig(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
                         intermediate_size=int(arch.width * arch.mlp_ratio), image_size=arch.image_size,
                         patch_size=arch.patch, mlp=arch.mlp, scale_mlp=arch.scaled, scale_attn_inner=arch.scaled,
                         post_norm=arch.post_norm, rope=arch.rope is not None, ref_feat_shape=arch.rope,
                         head_size=embed_dim if proj is None else None, drop_path_rate=float(drop_path))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


TRUNK, OWN = "visual.trunk.", "visual.eva."  # open_clip's prefix; the one prepare gives an EVA tower's tensors
IDENTITY = OWN + "identity_projection"
_FUSED = re.compile(r"^blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias|([qkv])\.weight)$")


def _is_eva(tensors: Mapping[str, np.ndarray]) -> bool:
    """An EVA tower's tensors: its attention has q_bias / v_bias (fused) or q_proj / k_proj / v_proj."""
    return any(re.match(r"^visual\.trunk\.blocks\.\d+\.attn\.(q_bias|q_proj\.weight)$", n) for n in tensors)


def prepare(tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """An EVA tower's tensors moved from visual.trunk. to visual.eva. (so no other timm family's names match
    them), its fused qkv (with q_bias, v_bias; k has none) split as timm's q_proj / k_proj / v_proj, fc_norm
    (the pooled LayerNorm of a tower built for average pooling) named norm, and with timm's classifier the
    identity visual_projection; other tensors unchanged."""
    if not _is_eva(tensors):
        return dict(tensors)
    out = {}
    for name, value in tensors.items():
        if not name.startswith(TRUNK):
            out[name] = value
            continue
        rest = name[len(TRUNK):]
        fused = _FUSED.match(rest)
        if fused and fused[2] == "qkv.weight":
            if value.ndim != 2 or value.shape[0] % 3:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{OWN}blocks.{fused[1]}.attn.{part}_proj.weight"] = chunk
            continue
        if fused:  # q_bias / v_bias, or a qkv another family's prepare split into q / k / v
            rest = f"blocks.{fused[1]}.attn." + (f"{fused[3]}_proj.weight" if fused[3] else f"{fused[2][0]}_proj.bias")
        elif rest.startswith("fc_norm."):
            if TRUNK + "norm." + rest[len("fc_norm."):] in tensors:
                raise CheckpointError(f"{where}: {name} beside {TRUNK}norm.*: an EVA tower has one final LayerNorm")
            rest = "norm." + rest[len("fc_norm."):]
        out[OWN + rest] = value
    head = out.get(OWN + "head.weight")
    if head is not None:
        if head.ndim != 2:
            raise CheckpointError(f"{where}: {TRUNK}head.weight has shape {head.shape}, expected a matrix")
        out[IDENTITY] = np.eye(head.shape[0], dtype=np.float32)
    return out


def tensor(name: str, value: np.ndarray, where: str) -> tuple[str, np.ndarray] | None:
    """(its name in the dual encoder's checkpoint, value) for a tensor prepare gave an EVA name, or open_clip's
    linear head; None for any other."""
    if name == IDENTITY or name == "visual.head.proj.weight":
        return "visual_projection.weight", value
    if name.startswith(OWN):
        return "vision_model." + name[len(OWN):], value
    return None
