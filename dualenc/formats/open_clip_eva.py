"""open_clip's timm EVA image towers (EVA-CLIP: the EVA01-g and EVA02-B/L/E configs; Meta's Perception Encoder:
the PE-Core-T/S/B/L/bigG configs; vision_cfg.timm_model_name one of timm's Eva names) in its hub layout, over
dualenc.towers.eva: the row of dualenc.formats.open_clip_timm's FAMILIES that reads them.

open_clip passes timm only the name, so each name keeps its architecture here (timm/models/eva.py). With
`timm_proj` null (every EVA and PE config open_clip ships) timm's own classifier, a Linear with bias from the
width to embed_dim, is the image embedding: it is the tower's head, and the pair reads as a
"vision-text-dual-encoder" whose visual_projection is the identity (exactly the tower's output). With "linear"
(bias-free; EVA's names only) the tower has no head and visual_projection is that Linear. EVA's names pool the
class token (timm_pool "token"), PE's their AttentionPoolLatent (timm_pool "map": its latent, q and kv packed as
one in_proj, proj, norm and MLP read as SiglipVisionModel's head), after a LayerNorm before the blocks (norm_pre),
with a key bias (timm's fused qkv with one bias) and rotary embeddings over the grid offset by 1 in "xy" order.
PE's text tower is open_clip's own text transformer (dualenc.formats.open_clip reads its text_cfg: context
length, width, heads, layers; nothing of it is refused). transformers has no EVA or PE model: `save_pretrained`
writes dualenc's VisionTextDualEncoder layout (an "eva" vision_config with these options, the tower's tensors
under timm's names with q/k/v split, the "map" head's under SiglipVisionModel's), which load_pretrained reads back
exactly.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError, ConfigError
from dualenc.formats import timm_fields
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
    pool: str = "token"  # the registration's global_pool: "token" (EVA), "map" (PE: AttentionPoolLatent)
    class_token: bool = True
    pe: bool = False  # PE's options: norm_pre (bias-free patch embedding), qkv bias on k too, LayerNorm eps 1e-5
    rope_offset: float = 0.0  # rope_grid_offset
    rope_indexing: str = "ij"  # rope_grid_indexing
    pool_heads: int = 8  # attn_pool_num_heads
    pool_mlp_ratio: float = 4.0  # attn_pool_mlp_ratio


def _pe(patch, width, depth, heads, mlp_ratio, ref, size, class_token=True, offset=1.0) -> Arch:
    """timm's vit_pe_core_* registrations: a GELU MLP, a "map" head of 8 heads and ratio 4, rope in "xy" order."""
    return Arch(patch, width, depth, heads, mlp_ratio, "gelu", False, False, ref, size, "map", class_token, True,
                offset, "xy")


EVA = {
    "eva02_base_patch16_clip_224": Arch(16, 768, 12, 12, 4 * 2 / 3, "swiglu", True, False, (16, 16), 224),
    "eva02_large_patch14_clip_224": Arch(14, 1024, 24, 16, 4 * 2 / 3, "swiglu", True, False, (16, 16), 224),
    "eva02_large_patch14_clip_336": Arch(14, 1024, 24, 16, 4 * 2 / 3, "swiglu", True, False, (16, 16), 336),
    "eva02_enormous_patch14_clip_224": Arch(14, 1792, 64, 16, 15360 / 1792, "gelu", False, True, None, 224),
    "eva_giant_patch14_224": Arch(14, 1408, 40, 16, 6144 / 1408, "gelu", False, False, None, 224),
    "vit_pe_core_tiny_patch16_384": _pe(16, 192, 12, 3, 4.0, (24, 24), 384),
    "vit_pe_core_small_patch16_384": _pe(16, 384, 12, 6, 4.0, (24, 24), 384),
    "vit_pe_core_base_patch16_224": _pe(16, 768, 12, 12, 4.0, (14, 14), 224),
    "vit_pe_core_large_patch14_336": _pe(14, 1024, 24, 16, 4.0, (24, 24), 336),
    "vit_pe_core_gigantic_patch14_448": _pe(14, 1536, 50, 16, 8960 / 1536, (32, 32), 448, class_token=False,
                                            offset=0.0),
}
DESCRIPTION = (f"timm's EVA ({', '.join(n for n, a in EVA.items() if a.pool == 'token')}) with timm_pool 'token' "
               f"and timm_proj null or 'linear'; timm's PE-Core ({', '.join(n for n, a in EVA.items() if a.pe)}) "
               f"with timm_pool 'map' and timm_proj null")
ACCEPTED = {"timm_pool": ("token",), "timm_proj": (None, "linear"), "timm_drop": (0, 0.0), "patch_dropout": (0, 0.0)}
ACCEPTED_PE = {**ACCEPTED, "timm_pool": ("map",), "timm_proj": (None,)}  # what the PE-Core configs use


def _accepted(v: Mapping, key: str, default, where: str, arch: Arch):
    allowed = (ACCEPTED_PE if arch.pe else ACCEPTED)[key]
    return timm_fields.accepted(v, key, default, allowed, where, "PE-Core" if arch.pe else "EVA")


def vision_config(name: str, v: Mapping[str, Any], embed_dim: int, where: str) -> EvaConfig:
    """The tower of a vision_cfg naming one of EVA's architectures, as open_clip's TimmModel builds it."""
    arch = EVA[name]
    _accepted(v, "timm_pool", "avg", where, arch)
    proj = _accepted(v, "timm_proj", "linear", where, arch)
    _accepted(v, "timm_drop", 0.0, where, arch)
    _accepted(v, "patch_dropout", 0.0, where, arch)  # open_clip passes it to timm's Eva (patch_drop_rate)
    if proj == "linear" and v.get("timm_proj_bias", False) is not False:
        raise ConfigError(f"{where}: field 'timm_proj_bias' = {v['timm_proj_bias']!r} is not implemented for a timm "
                          f"EVA tower with timm_proj 'linear'; supported: [False]")
    drop_path = timm_fields.drop_path_rate(v, where)
    size = v.get("image_size", 224)
    if size not in (arch.image_size, [arch.image_size] * 2) or isinstance(size, bool):
        raise ConfigError(f"{where}: field 'image_size' = {size!r} does not match timm's {name!r}, built for "
                          f"{arch.image_size} px (open_clip passes timm only the name)")
    try:
        return EvaConfig(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
                         intermediate_size=int(arch.width * arch.mlp_ratio), image_size=arch.image_size,
                         patch_size=arch.patch, mlp=arch.mlp, scale_mlp=arch.scaled, scale_attn_inner=arch.scaled,
                         post_norm=arch.post_norm, rope=arch.rope is not None, ref_feat_shape=arch.rope,
                         head_size=embed_dim if proj is None else None, drop_path_rate=drop_path,
                         class_token=arch.class_token, patch_bias=not arch.pe, pre_norm=arch.pe, key_bias=arch.pe,
                         layer_norm_eps=1e-5 if arch.pe else 1e-6, rope_grid_offset=arch.rope_offset,
                         rope_grid_indexing=arch.rope_indexing, global_pool=arch.pool, pool_heads=arch.pool_heads,
                         pool_mlp_ratio=arch.pool_mlp_ratio)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


TRUNK, OWN = "visual.trunk.", "visual.eva."  # open_clip's prefix; the one prepare gives an EVA tower's tensors
IDENTITY = OWN + "identity_projection"
_FUSED = re.compile(r"^blocks\.(\d+)\.attn\.(?:qkv\.(weight|bias)|([qv])_bias|([qkv])\.(weight|bias))$")
# PE's AttentionPoolLatent -> SiglipVisionModel's head (its q and kv packed as in_proj after the renaming)
_POOL = (("attn_pool.latent", "head.probe"), ("attn_pool.proj.", "head.attention.out_proj."),
         ("attn_pool.norm.", "head.layernorm."), ("attn_pool.mlp.", "head.mlp."))


def _is_eva(tensors: Mapping[str, np.ndarray]) -> bool:
    """An EVA tower's tensors: its attention has q_bias / v_bias (fused) or q_proj / k_proj / v_proj; or a PE
    tower's: a LayerNorm before the blocks (norm_pre) and an attention pool (no other timm tower open_clip's
    configs name has both)."""
    return (any(re.match(r"^visual\.trunk\.blocks\.\d+\.attn\.(q_bias|q_proj\.weight)$", n) for n in tensors)
            or (TRUNK + "norm_pre.weight" in tensors and TRUNK + "attn_pool.latent" in tensors))


def prepare(tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """An EVA tower's tensors moved from visual.trunk. to visual.eva. (so no other timm family's names match
    them), its fused qkv (with q_bias, v_bias, k having none; or PE's one qkv bias) split as timm's q_proj /
    k_proj / v_proj, fc_norm (the pooled LayerNorm of a tower built for average pooling) named norm, PE's
    attention pool named as SiglipVisionModel's head (q and kv packed as its in_proj), and with timm's
    classifier the identity visual_projection; other tensors unchanged."""
    if not _is_eva(tensors):
        return dict(tensors)
    out = {}
    for name, value in tensors.items():
        if not name.startswith(TRUNK):
            out[name] = value
            continue
        rest = name[len(TRUNK):]
        fused = _FUSED.match(rest)
        if fused and fused[2]:
            if value.ndim != (2 if fused[2] == "weight" else 1) or value.shape[0] % 3:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{OWN}blocks.{fused[1]}.attn.{part}_proj.{fused[2]}"] = chunk
            continue
        if fused:  # q_bias / v_bias, or a qkv another family's prepare split into q / k / v
            rest = f"blocks.{fused[1]}.attn." + (f"{fused[3]}_proj.bias" if fused[3] else f"{fused[4]}_proj.{fused[5]}")
        elif rest.startswith("fc_norm."):
            if TRUNK + "norm." + rest[len("fc_norm."):] in tensors:
                raise CheckpointError(f"{where}: {name} beside {TRUNK}norm.*: an EVA tower has one final LayerNorm")
            rest = "norm." + rest[len("fc_norm."):]
        else:
            rest = next((new + rest[len(old):] for old, new in _POOL if rest.startswith(old)), rest)
        out[OWN + rest] = value
    for leaf in ("weight", "bias"):
        q, kv = f"{OWN}attn_pool.q.{leaf}", f"{OWN}attn_pool.kv.{leaf}"
        if q in out and kv in out:
            if out[kv].shape[0] != 2 * out[q].shape[0] or out[kv].shape[1:] != out[q].shape[1:]:
                raise CheckpointError(f"{where}: {TRUNK}attn_pool.kv.{leaf} has shape {out[kv].shape}, not two of "
                                      f"{TRUNK}attn_pool.q.{leaf}'s {out[q].shape}")
            out[f"{OWN}head.attention.in_proj_{leaf}"] = np.concatenate([out.pop(q), out.pop(kv)], axis=0)
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
