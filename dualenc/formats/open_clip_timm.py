"""open_clip's timm image towers (vision_cfg.timm_model_name) in its hub layout: the timm families dualenc reads,
each a row of FAMILIES (how it recognises a name, how it reads the vision_cfg, how it renames the tensors).

open_clip passes timm only the model's name, so each family keeps the architectures of the names it accepts.
ConvNeXt (timm's `convnext_*`, over dualenc.towers.convnext): open_clip's TimmModel keeps timm's pooling
(average, then LayerNorm) and adds its head: "linear", a bias-free Linear to embed_dim, or "mlp", Linear + GELU
+ a bias-free Linear. The pair reads as a "vision-text-dual-encoder" whose visual_projection is that last Linear
(the mlp's first Linear is the tower's `head`). `save_pretrained` then writes a VisionTextDualEncoderModel
directory (a "convnext" vision_config); transformers loads it as ConvNextModel + CLIPTextModel with the same
numbers for the "linear" towers with timm's default LayerNorm eps (1e-6: every name but convnext_xxlarge, whose
1e-5 transformers' ConvNextModel cannot express), and dualenc reads every one back exactly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError, ConfigError
from dualenc.towers.convnext import ConvNextConfig

# timm's ConvNeXt architectures (timm/models/convnext.py) by name: depths, widths, LayerNorm eps. Their 1x1
# convolution MLPs (conv_mlp, the small ones) and Linear MLPs compute the same. Other convnext_* names (the
# overlapping "ols" stems, RMS norms, head_norm_first "hnf", the large_mlp head) are refused.
CONVNEXT = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320), 1e-6),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384), 1e-6),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512), 1e-6),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640), 1e-6),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    "convnext_xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}
PROJECTIONS = ("linear", "mlp")
POOLS = ("", "avg")  # timm ConvNeXt's own pooling ("": the network's default, average)


def _field(v: Mapping, key: str, default, allowed, where: str):
    value = v.get(key, default)
    if not any(value == ok and type(value) is type(ok) for ok in allowed):
        raise ConfigError(f"{where}: field '{key}' = {value!r} is not implemented for a timm ConvNeXt tower; "
                          f"supported: {list(allowed)}")
    return value


def _image_size(v: Mapping, where: str) -> int:
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(f"{where}: field 'image_size' = {size!r} is not implemented; supported: an integer or a "
                          f"square [n, n]")
    return size


def _convnext(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> ConvNextConfig:
    depths, sizes, eps = CONVNEXT[name]
    proj = _field(v, "timm_proj", "linear", PROJECTIONS, where)
    _field(v, "timm_pool", "avg", POOLS, where)
    _field(v, "timm_proj_bias", False, (False,), where)
    _field(v, "timm_drop", 0.0, (0.0, 0), where)  # head dropout (training): not implemented
    _field(v, "patch_dropout", 0.0, (0.0, 0), where)  # open_clip passes it to timm, whose ConvNeXt has none
    drop_path = v.get("timm_drop_path")
    drop_path = 0.0 if drop_path is None else drop_path
    if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
        raise ConfigError(f"{where}: field 'timm_drop_path' must be null or a rate in [0, 1), got {drop_path!r}")
    try:
        return ConvNextConfig(hidden_sizes=sizes, depths=depths, num_stages=len(depths), layer_norm_eps=eps,
                              norm_eps=eps, image_size=_image_size(v, where), drop_path_rate=float(drop_path),
                              head_hidden_size=2 * embed_dim if proj == "mlp" else None)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# A ConvNeXt tensor under open_clip's "visual." -> its name in the dual encoder's checkpoint (ConvNextModel under
# "vision_model.", the head's last Linear as visual_projection).
_BLOCK, _LAYER = r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.", r"vision_model.encoder.stages.\1.layers.\2."
_CONVNEXT_NAMES = [(re.compile(p), r) for p, r in (
    (r"^visual\.trunk\.stem\.0\.", "vision_model.embeddings.patch_embeddings."),
    (r"^visual\.trunk\.stem\.1\.", "vision_model.embeddings.layernorm."),
    (r"^visual\.trunk\.stages\.(\d+)\.downsample\.([01])\.", r"vision_model.encoder.stages.\1.downsampling_layer.\2."),
    (_BLOCK + r"conv_dw\.", _LAYER + "dwconv."),
    (_BLOCK + r"norm\.", _LAYER + "layernorm."),
    (_BLOCK + r"mlp\.fc([12])\.", _LAYER + r"pwconv\3."),
    (_BLOCK + r"gamma$", _LAYER + "layer_scale_parameter"),
    (r"^visual\.trunk\.head\.norm\.", "vision_model.layernorm."),
    (r"^visual\.head\.mlp\.fc1\.", "vision_model.head.dense."),
    (r"^visual\.head\.(proj|mlp\.fc2)\.weight$", "visual_projection.weight"),
)]


def _convnext_tensor(name: str, value: np.ndarray, where: str) -> tuple[str, np.ndarray] | None:
    for pattern, replacement in _CONVNEXT_NAMES:
        if pattern.search(name):
            new = pattern.sub(replacement, name)
            if ".pwconv" in new and new.endswith(".weight") and value.ndim == 4:  # timm's conv_mlp: 1x1 convs
                if value.shape[2:] != (1, 1):
                    raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected a 1x1 convolution")
                value = value.reshape(value.shape[:2])
            return new, value
    return None


class TimmFamily(NamedTuple):
    """A timm family open_clip towers are read for: names(name) says whether it is one of its architectures,
    config(name, vision_cfg, embed_dim, where) reads the tower, tensor(name, value, where) renames a tensor
    (None: not the tower's)."""

    description: str
    names: Callable[[str], bool]
    config: Callable[[str, Mapping, int, str], Any]
    tensor: Callable[[str, np.ndarray, str], tuple[str, np.ndarray] | None]


FAMILIES = {
    "convnext": TimmFamily(f"timm's ConvNeXt ({', '.join(CONVNEXT)})", CONVNEXT.__contains__, _convnext,
                           _convnext_tensor),
}


def family_of(name: Any, where: str) -> TimmFamily:
    """The row of FAMILIES a timm_model_name belongs to; ConfigError naming the field and value otherwise."""
    for family in FAMILIES.values():
        if isinstance(name, str) and family.names(name):
            return family
    raise ConfigError(f"{where}: field 'timm_model_name' = {name!r} is not implemented; supported: "
                      f"{'; '.join(f.description for f in FAMILIES.values())}")


def vision_config(v: Mapping[str, Any], embed_dim: Any, where: str):
    """The tower a vision_cfg with a timm_model_name describes, as open_clip's TimmModel builds it (its ViT
    fields are unused by open_clip for a timm tower)."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ConfigError(f"{where}: embed_dim must be a positive integer, got {embed_dim!r}")
    name = v.get("timm_model_name")
    return family_of(name, where).config(name, v, embed_dim, where)


def transformers_name(name: str, value: np.ndarray, where: str) -> tuple[str, np.ndarray] | None:
    """(the name a timm tower's tensor has in the dual encoder's checkpoint, its value in that layout); None for
    a name no family's tower has."""
    if not name.startswith("visual."):
        return None
    for family in FAMILIES.values():
        found = family.tensor(name, value, where)
        if found is not None:
            return found
    return None
