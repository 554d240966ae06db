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
SigLIP's ViTs (timm's `vit_*_siglip_*` VisionTransformers: no class token, MAP pooling, over
dualenc.towers.siglip) under open_clip's `timm_pool` "map" and `timm_proj` "none" (the timm/ViT-*-SigLIP* and
SigLIP 2 releases): the tower is SiglipVisionModel's (timm's fused qkv split, its AttentionPoolLatent's q and kv
packed as the head's in_proj), the pair a "siglip" model (dualenc.formats.open_clip reads the text tower as
SiglipTextModel), so `save_pretrained` writes what transformers' SiglipModel loads.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError, ConfigError
from dualenc.formats import open_clip_eva, open_clip_vitamin, timm_fields
from dualenc.towers.convnext import ConvNextConfig
from dualenc.towers.siglip import SiglipVisionConfig

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


def _convnext(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> ConvNextConfig:
    depths, sizes, eps = CONVNEXT[name]
    proj = timm_fields.accepted(v, "timm_proj", "linear", PROJECTIONS, where, "ConvNeXt")
    timm_fields.accepted(v, "timm_pool", "avg", POOLS, where, "ConvNeXt")
    timm_fields.accepted(v, "timm_proj_bias", False, (False,), where, "ConvNeXt")
    timm_fields.accepted(v, "timm_drop", 0.0, (0.0, 0), where, "ConvNeXt")  # head dropout (training): not implemented
    # open_clip passes patch_dropout to timm, whose ConvNeXt has none
    timm_fields.accepted(v, "patch_dropout", 0.0, (0.0, 0), where, "ConvNeXt")
    drop_path = timm_fields.drop_path_rate(v, where)
    try:
        return ConvNextConfig(hidden_sizes=sizes, depths=depths, num_stages=len(depths), layer_norm_eps=eps,
                              norm_eps=eps, image_size=timm_fields.square_image_size(v, where),
                              drop_path_rate=drop_path, head_hidden_size=2 * embed_dim if proj == "mlp" else None)
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


# timm's SigLIP VisionTransformers (timm/models/vision_transformer.py) by name: patch, width, depth, heads, MLP ratio,
# tanh GELU (act_layer "gelu_tanh"; else nn.GELU), image size (the name's pretrained config). All have no class token,
# MAP pooling, LayerNorm eps 1e-6, biases everywhere. The "gap" variants (average pooling) are refused.
SIGLIP_VIT = {
    "vit_base_patch32_siglip_256": (32, 768, 12, 12, 4.0, True, 256),
    **{f"vit_base_patch16_siglip_{n}": (16, 768, 12, 12, 4.0, False, n) for n in (224, 256, 384, 512)},
    **{f"vit_large_patch16_siglip_{n}": (16, 1024, 24, 16, 4.0, n == 512, n) for n in (256, 384, 512)},
    **{f"vit_so400m_patch14_siglip_{n}": (14, 1152, 27, 16, 3.7362, False, n) for n in (224, 378, 384)},
    **{f"vit_so400m_patch16_siglip_{n}": (16, 1152, 27, 16, 3.7362, True, n) for n in (256, 384, 512)},
    **{f"vit_giantopt_patch16_siglip_{n}": (16, 1536, 40, 16, 4.0, True, n) for n in (256, 384)},
}


def _siglip_vit(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> SiglipVisionConfig:
    patch, width, depth, heads, ratio, tanh, size = SIGLIP_VIT[name]
    # timm_pool "map" + timm_proj "none": timm's own MAP head is the image embedding (open_clip's TimmModel adds
    # nothing). Other pools ("", "avg", "token") or an open_clip head on top are not implemented.
    timm_fields.accepted(v, "timm_pool", "avg", ("map",), where, "SigLIP ViT")
    timm_fields.accepted(v, "timm_proj", "linear", ("none",), where, "SigLIP ViT")
    # timm_proj_bias: unused without a projection
    timm_fields.accepted(v, "timm_proj_bias", False, (False, True), where, "SigLIP ViT")
    timm_fields.accepted(v, "timm_drop", 0.0, (0.0, 0), where, "SigLIP ViT")
    drop_path = v.get("timm_drop_path")
    if drop_path not in (None, 0, 0.0) or isinstance(drop_path, bool):
        raise ConfigError(f"{where}: field 'timm_drop_path' = {drop_path!r} is not implemented for a timm SigLIP ViT; "
                          f"supported: [None, 0.0]")
    if timm_fields.square_image_size(v, where) != size:
        raise ConfigError(f"{where}: field 'image_size' = {v.get('image_size', 224)!r} does not match timm's "
                          f"{name!r}, built for {size} px (open_clip passes timm only the name)")
    if embed_dim != width:
        raise ConfigError(f"{where}: embed_dim = {embed_dim} does not match the width {width} of timm's {name!r}: "
                          f"with timm_proj 'none' the tower's pooled output is the embedding")
    try:
        return SiglipVisionConfig(hidden_size=width, intermediate_size=int(width * ratio), num_hidden_layers=depth,
                                  num_attention_heads=heads, image_size=size, patch_size=patch,
                                  hidden_act="gelu_pytorch_tanh" if tanh else "gelu", layer_norm_eps=1e-6)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


_HF_TEXT_HEADS = ("text.proj.weight", "text.proj.2.weight")  # open_clip's HFTextEncoder's head (its last Linear)
_IDENTITY = "visual.trunk.identity_projection"


def _siglip_vit_prepare(tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """timm's fused tensors laid out as SiglipVisionModel's: each block's qkv split into q, k, v; the MAP head's
    q and kv packed into one in_proj (query, key, value, as torch's MultiheadAttention). Beside an HF text tower
    (NLLB-CLIP's SigLIP pairs: a dual encoder with projections) the identity visual_projection is added."""
    out = dict(tensors)
    for name in [n for n in tensors if re.match(r"^visual\.trunk\.blocks\.\d+\.attn\.qkv\.(weight|bias)$", n)]:
        value = out.pop(name)
        if value.shape[0] % 3:
            raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
        stem, leaf = name.rsplit(".qkv.", 1)
        for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
            out[f"{stem}.{part}.{leaf}"] = chunk
    for leaf in ("weight", "bias"):
        q, kv = f"visual.trunk.attn_pool.q.{leaf}", f"visual.trunk.attn_pool.kv.{leaf}"
        if q in out and kv in out:
            if out[kv].shape[0] != 2 * out[q].shape[0] or out[kv].shape[1:] != out[q].shape[1:]:
                raise CheckpointError(f"{where}: {kv} has shape {out[kv].shape}, not two of {q}'s {out[q].shape}")
            out[f"visual.trunk.attn_pool.in_proj.{leaf}"] = np.concatenate([out.pop(q), out.pop(kv)], axis=0)
    position = out.get("visual.trunk.pos_embed")
    if position is not None and any(n in out for n in _HF_TEXT_HEADS):  # beside open_clip's HF text tower: a dual
        out[_IDENTITY] = np.eye(position.shape[-1], dtype=np.float32)  # encoder, its visual_projection the identity
    return out


_VIT_BLOCK, _VIT_LAYER = r"^visual\.trunk\.blocks\.(\d+)\.", r"vision_model.encoder.layers.\1."
_SIGLIP_VIT_NAMES = [(re.compile(p), r) for p, r in (
    (r"^visual\.trunk\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.trunk\.pos_embed$", "vision_model.embeddings.position_embedding.weight"),
    (_VIT_BLOCK + r"norm([12])\.", _VIT_LAYER + r"layer_norm\2."),
    (_VIT_BLOCK + r"attn\.([qkv])\.", _VIT_LAYER + r"self_attn.\2_proj."),
    (_VIT_BLOCK + r"attn\.proj\.", _VIT_LAYER + "self_attn.out_proj."),
    (_VIT_BLOCK + r"mlp\.fc([12])\.", _VIT_LAYER + r"mlp.fc\2."),
    (r"^visual\.trunk\.norm\.", "vision_model.post_layernorm."),
    (r"^visual\.trunk\.attn_pool\.latent$", "vision_model.head.probe"),
    (r"^visual\.trunk\.attn_pool\.in_proj\.(weight|bias)$", r"vision_model.head.attention.in_proj_\1"),
    (r"^visual\.trunk\.attn_pool\.proj\.", "vision_model.head.attention.out_proj."),
    (r"^visual\.trunk\.attn_pool\.norm\.", "vision_model.head.layernorm."),
    (r"^visual\.trunk\.attn_pool\.mlp\.fc([12])\.", r"vision_model.head.mlp.fc\1."),
)]


def _siglip_vit_tensor(name: str, value: np.ndarray, where: str) -> tuple[str, np.ndarray] | None:
    if name == _IDENTITY:
        return "visual_projection.weight", value
    for pattern, replacement in _SIGLIP_VIT_NAMES:
        if pattern.search(name):
            if name == "visual.trunk.pos_embed":
                if value.ndim != 3 or value.shape[0] != 1:
                    raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected (1, patches, width)")
                value = value[0]
            return pattern.sub(replacement, name), value
    return None


class TimmFamily(NamedTuple):
    """A timm family open_clip towers are read for: names(name) says whether it is one of its architectures,
    config(name, vision_cfg, embed_dim, where) reads the tower, tensor(name, value, where) renames a tensor
    (None: not the tower's); prepare(tensors, where), where given, first splits or joins its fused tensors."""

    description: str
    names: Callable[[str], bool]
    config: Callable[[str, Mapping, int, str], Any]
    tensor: Callable[[str, np.ndarray, str], tuple[str, np.ndarray] | None]
    prepare: Callable[[Mapping[str, np.ndarray], str], dict] | None = None


FAMILIES = {
    "convnext": TimmFamily(f"timm's ConvNeXt ({', '.join(CONVNEXT)})", CONVNEXT.__contains__, _convnext,
                           _convnext_tensor),
    "eva": TimmFamily(open_clip_eva.DESCRIPTION, open_clip_eva.EVA.__contains__, open_clip_eva.vision_config,
                      open_clip_eva.tensor, open_clip_eva.prepare),
    "vitamin": TimmFamily(open_clip_vitamin.DESCRIPTION, open_clip_vitamin.VITAMIN.__contains__,
                          open_clip_vitamin.vision_config, open_clip_vitamin.tensor, open_clip_vitamin.prepare),
    "siglip_vit": TimmFamily(f"timm's SigLIP ViTs ({', '.join(SIGLIP_VIT)}) with timm_pool 'map' and timm_proj "
                             f"'none'", SIGLIP_VIT.__contains__, _siglip_vit, _siglip_vit_tensor, _siglip_vit_prepare),
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


def transformers_name(name: str, value: np.ndarray, timm_name: str, where: str) -> tuple[str, np.ndarray] | None:
    """(the name a tensor of the timm tower `timm_name` has in the dual encoder's checkpoint, its value in that
    layout); None for a name that tower does not have. Only the family the config names renames: a tensor is never
    matched by another family's patterns."""
    if not name.startswith("visual."):
        return None
    return family_of(timm_name, where).tensor(name, value, where)


def prepare(tensors: Mapping[str, np.ndarray], timm_name: str, where: str) -> Mapping[str, np.ndarray]:
    """The tensors with the fused tensors of the timm tower `timm_name` split or joined (its family's `prepare`),
    ready for transformers_name."""
    family = family_of(timm_name, where)
    return tensors if family.prepare is None else family.prepare(tensors, where)
