"""open_clip checkpoints: `open_clip_config.json` + `open_clip_model.safetensors` (open_clip's hub layout).

The ViT image tower + text transformer models (OpenAI, LAION and most open_clip CLIPs) load as a CLIP
DualEncoderConfig: their configs map onto transformers' CLIPConfig and their tensors onto CLIPModel's names
(q/k/v split out of the fused in_proj, right-multiplied projections transposed), so `save_pretrained`
converts them to a transformers CLIPModel directory. An HF text tower (text_cfg.hf_model_name, a RoBERTa /
XLM-RoBERTa: dualenc.formats.open_clip_hf) makes a VisionTextDualEncoder instead, and so does a ModifiedResNet
image tower (vision_cfg.layers a list: OpenAI's RN50 family; dualenc.formats.open_clip_resnet) or a timm one of
the families dualenc.formats.open_clip_timm reads (ConvNeXt), except timm's SigLIP ViTs: those pair with
open_clip's SigLIP text tower (no causal mask, pooled at the last position, a Linear projection with bias) as a
transformers SiglipModel ("siglip"; a text proj_type "none", SigLIP i18n's, as its head at the identity).

Options transformers' CLIPModel lacks: text pool_type "eos" with eos_id 2 (MetaCLIP 2 "worldwide": CLIPTextModel
would read eos_token_id 2 as its argmax rule) reads as a transformers MetaClip2Model ("metaclip_2"), which pools at
the first eos_token_id, so save_pretrained writes what transformers loads with the same numbers. CLIPA's vision
pool_type "avg" (with no_ln_pre, final_ln_after_pool) and text no_causal_mask with pool_type "last" read as
dualenc's own towers (OpenCLIPVisionConfig "open_clip_vision", OpenCLIPTextConfig "open_clip_text") in a
VisionTextDualEncoder: save_pretrained writes those model_types, which dualenc reads back exactly and
transformers' AutoConfig refuses (no transformers class computes them). So do CoCa's contrastive towers (a
multimodal_cfg: the attentional pooler's first query as the image embedding, the text's appended class token; see
split_coca): its captioning text decoder is not loaded (an UnusedWeightsWarning names its tensors; captioning is out
of scope for a dual encoder). Anything else open_clip builds (other timm towers, layer scale, other pooling) is
refused with a ConfigError naming the field.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping

import numpy as np

from dualenc import files, kinds, layouts, tables
from dualenc.config import CLIPTextConfig, CLIPVisionConfig, DualEncoderConfig
from dualenc.towers.clip_text import MetaClip2TextConfig, OpenCLIPTextConfig, SiglipTextConfig
from dualenc.towers.vit import MetaClip2VisionConfig, OpenCLIPVisionConfig
from dualenc.towers.siglip import SiglipVisionConfig
from dualenc.errors import CheckpointError, ConfigError
from dualenc.formats import open_clip_hf, open_clip_resnet, open_clip_timm
from dualenc.formats.transformers import UnusedWeightsWarning, param_shapes, dual_table, to_device
from dualenc.formats.weights import Weights, listed, load_table

CONFIG = layouts.OPEN_CLIP_CONFIG
WEIGHTS = "open_clip_model.safetensors"
PICKLED = ("open_clip_pytorch_model.bin",)
OPENAI_LOGIT_SCALE = float(np.log(1 / 0.07))  # open_clip's init_logit_scale default

# open_clip config fields dualenc reads, with their defaults (open_clip's CLIPVisionCfg / CLIPTextCfg).
_VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
                        attn_pooler_heads=8)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0, pad_id=0,
                      eos_id=2, pool_type="argmax")
# Fields that change the computation: the values dualenc implements (None, False, 0 or missing are defaults).
_OFF = (None, False, 0, 0.0, {}, "")
_VISION_ACCEPTED = {
    "ls_init_value": (None,), "attentional_pool": _OFF, "no_ln_pre": _OFF + (True,),
    "pos_embed_type": ("learnable",),
    "pool_type": ("tok", "avg"), "final_ln_after_pool": _OFF + (True,), "act_kwargs": _OFF,
    "block_type": _OFF + ("default",), "qk_norm": _OFF,
    "scaled_cosine_attn": _OFF, "scale_heads": _OFF, "scale_attn_inner": _OFF, "scale_attn": _OFF,
    "scale_fc": _OFF, "timm_model_name": _OFF, "output_tokens": _OFF,
}
_TEXT_ACCEPTED = {
    "ls_init_value": (None,), "embed_cls": _OFF, "no_causal_mask": _OFF + (True,),
    "pool_type": ("argmax", "eos", "last"),
    "proj_bias": _OFF, "proj_type": ("linear", None), "act_kwargs": _OFF, "block_type": _OFF + ("default",),
    "qk_norm": _OFF, "scaled_cosine_attn": _OFF, "scale_heads": _OFF, "scale_attn_inner": _OFF, "scale_attn": _OFF,
    "scale_fc": _OFF, "hf_model_name": _OFF, "output_tokens": _OFF,
}
# open_clip's text tower beside a timm SigLIP ViT: SiglipTextModel's options (GELU exact, or tanh by act_kwargs).
# proj_type "none" (no projection: the pooled output is the embedding) reads as SiglipModel's head at the identity.
_SIGLIP_TEXT_ACCEPTED = {**_TEXT_ACCEPTED, "no_causal_mask": (True,), "pool_type": ("last",),
                         "proj_bias": _OFF + (True,), "proj_type": ("linear", None, "none"),
                         "act_kwargs": _OFF + ({"approximate": "tanh"},)}
_MODEL_ACCEPTED = {"nonscalar_logit_scale": _OFF + (True,)}
# CoCa (a multimodal_cfg: its captioning text decoder, which dualenc does not load): its towers return their tokens
# too, its image tower may pool with the attentional pooler, its text tower (open_clip's own, as CustomTextCLIP's; a
# CLIP's encode_text would not read the class token) may append the class token.
_COCA_ACCEPTED = {"output_tokens": _OFF + (True,), "attentional_pool": _OFF + (True,), "embed_cls": _OFF + (True,)}
# patch_dropout only acts in training, a train setting in dualenc (make_train_step(patch_dropout=...), `dualenc train
# --patch-dropout`), not a model field; open_clip's text tower does not read final_ln_after_pool (the vision
# tower's is read: _VISION_ACCEPTED); the tokenizer fields are the tokenizer's business (dualenc.processing); of an
# attentional_pool's attn_pooler_queries only the first (the contrastive embedding) is read, the others feed CoCa's
# captioning decoder.
_IGNORED = {"patch_dropout", "final_ln_after_pool", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
            "attn_pooler_queries", "timm_model_pretrained", "timm_pool", "timm_proj",
            "timm_proj_bias", "timm_drop", "timm_drop_path", "hf_model_pretrained", "hf_proj_type",
            "hf_pooler_type", "norm_kwargs"}


def _check_fields(cfg: Mapping, accepted: Mapping, known, where: str):
    """Refuses a field outside `known` (names) and `accepted`, or an accepted field at a value not implemented."""
    for key, value in cfg.items():
        if key in accepted:
            if not any(value == ok for ok in accepted[key]):
                supported = [ok for ok in accepted[key] if ok not in ({}, "")]
                raise ConfigError(f"{where}: field '{key}' = {value!r} is not implemented; supported: {supported}")
        elif key not in known and key not in _IGNORED:
            raise ConfigError(f"{where}: field '{key}' is not implemented (unknown to dualenc's open_clip reader)")


def _eps(cfg: Mapping, where: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if not isinstance(kwargs, Mapping) or set(kwargs) - {"eps"}:
        raise ConfigError(f"{where}: field 'norm_kwargs' = {kwargs!r} is not implemented; supported: {{'eps': x}}")
    return kwargs.get("eps", 1e-5)


def _int_field(cfg: Mapping, key: str, where: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return value


def _mlp(width: int, ratio: Any, where: str) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1 << 10:
        raise ConfigError(f"{where}: field 'mlp_ratio' must be a positive number, got {ratio!r}")
    return int(width * ratio)


def config_from_dict(d: Mapping[str, Any], where: str = CONFIG) -> DualEncoderConfig:
    """The CLIP DualEncoderConfig an open_clip_config.json (its "model_cfg") describes."""
    if not isinstance(d, Mapping) or not isinstance(d.get("model_cfg"), Mapping):
        raise ConfigError(f"{where}: missing field 'model_cfg' (an object)")
    m = d["model_cfg"]
    where_m = f"{where}: model_cfg"
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in m:
            raise ConfigError(f"{where_m}: missing field '{key}'")
    _check_fields({k: v for k, v in m.items() if k not in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg")},
                  _MODEL_ACCEPTED, {"quick_gelu", "init_logit_scale", "init_logit_bias", "custom_text", "cast_dtype"},
                  where_m)
    v, t = m["vision_cfg"], m["text_cfg"]
    coca = m.get("multimodal_cfg") is not None  # CoCa: its contrastive towers are read, its text decoder is not
    for name, cfg in (("vision_cfg", v), ("text_cfg", t)) + ((("multimodal_cfg", m["multimodal_cfg"]),) if coca else ()):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where_m}: field '{name}' must be an object, got {type(cfg).__name__}")
    vision_accepted, text_accepted = (({**a, **_COCA_ACCEPTED} for a in (_VISION_ACCEPTED, _TEXT_ACCEPTED)) if coca
                                      else (_VISION_ACCEPTED, _TEXT_ACCEPTED))
    wv, wt = f"{where_m}: vision_cfg", f"{where_m}: text_cfg"
    resnet = timm = None
    if isinstance(v.get("layers"), (list, tuple)):  # a ModifiedResNet (dualenc.formats.open_clip_resnet)
        _check_fields(v, {"timm_model_name": _OFF}, {*_VISION_DEFAULTS, *_VISION_ACCEPTED}, wv)
        resnet, v = open_clip_resnet.vision_config(v, m["embed_dim"], wv), {}  # the ViT checks below see defaults
    elif v.get("timm_model_name"):  # a timm tower (dualenc.formats.open_clip_timm.FAMILIES), ConfigError if none
        _check_fields(v, {}, {*_VISION_DEFAULTS, *_VISION_ACCEPTED}, wv)
        timm, v = open_clip_timm.vision_config(v, m["embed_dim"], wv), {}
    else:
        _check_fields(v, vision_accepted, _VISION_DEFAULTS, wv)
    hf_text, pair = None, "vision-text-dual-encoder"
    if t.get("hf_model_name"):  # open_clip's HFTextEncoder (dualenc.towers.hf_text): no native text field is built
        _check_fields(t, {}, {*_TEXT_DEFAULTS, *_TEXT_ACCEPTED}, wt)
        hf_text = open_clip_hf.text_config(t, m["embed_dim"], wt, os.path.dirname(where))
        if m.get("init_logit_bias") is not None:  # a logit bias: trained with the sigmoid loss (NLLB-CLIP SigLIP's)
            pair = "vision-text-dual-encoder-siglip"
    else:
        _check_fields(t, _SIGLIP_TEXT_ACCEPTED if isinstance(timm, SiglipVisionConfig) else text_accepted,
                      _TEXT_DEFAULTS, wt)
    v, t = {**_VISION_DEFAULTS, **v}, {**_TEXT_DEFAULTS, **t}
    image_size = v["image_size"]
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ConfigError(f"{wv}: field 'image_size' = {image_size!r} is not implemented; supported: square")
        image_size = image_size[0]
    act = "quick_gelu" if m.get("quick_gelu", False) else "gelu"
    if not isinstance(m.get("quick_gelu", False), bool):
        raise ConfigError(f"{where_m}: field 'quick_gelu' must be true or false, got {m['quick_gelu']!r}")
    width = _int_field(v, "width", wv)
    head_width = _int_field(v, "head_width", wv)
    if head_width < 1 or width % head_width:
        raise ConfigError(f"{wv}: field 'head_width' = {head_width} must divide width {width}")
    average = v.get("pool_type") == "avg"
    attentional = resnet is None and timm is None and v.get("attentional_pool") is True
    if attentional and average:
        raise ConfigError(f"{wv}: field 'pool_type' = 'avg' with attentional_pool is not implemented; supported: "
                          f"'tok' (the attentional pooler's first query: CoCa's)")
    if v.get("no_ln_pre") and not average:
        raise ConfigError(f"{wv}: field 'no_ln_pre' = True is implemented with pool_type 'avg' only (CLIPA's), got "
                          f"pool_type {v.get('pool_type', 'tok')!r}")
    embed_cls = hf_text is None and bool(t.get("embed_cls"))  # CoCa: a class token appended, pooled there
    if embed_cls and t.get("no_causal_mask"):
        raise ConfigError(f"{wt}: field 'no_causal_mask' = {t['no_causal_mask']!r} with embed_cls is not implemented; "
                          f"supported: false (CoCa's causal text tower)")
    if hf_text is None and not isinstance(timm, SiglipVisionConfig) and not embed_cls and \
            bool(t.get("no_causal_mask")) != (t["pool_type"] == "last"):
        raise ConfigError(f"{wt}: field 'no_causal_mask' = {bool(t.get('no_causal_mask'))} with pool_type "
                          f"{t['pool_type']!r} is not implemented; supported: no_causal_mask true with pool_type "
                          f"'last' (CLIPA's), false with 'argmax' or 'eos'")
    # open_clip's pool_type "eos" takes the first eos_id; transformers' CLIPTextModel reads eos_token_id 2 as its
    # legacy argmax rule, MetaClip2TextModel does not: such a text tower is MetaCLIP 2's ("worldwide").
    metaclip = t["pool_type"] == "eos" and t["eos_id"] == 2 and not embed_cls
    plain = resnet is None and timm is None and hf_text is None and not average and t["pool_type"] != "last" and \
        not attentional and not embed_cls
    embed_dim = m["embed_dim"]
    try:
        vision_cls = OpenCLIPVisionConfig if average or attentional else MetaClip2VisionConfig if metaclip and plain \
            else CLIPVisionConfig
        extra = dict(pre_norm=not v.get("no_ln_pre"), norm_after_pool=bool(v.get("final_ln_after_pool")),
                     attention_pool_size=None) if average else {}
        if attentional:  # open_clip does not read final_ln_after_pool there: ln_post follows the pooler
            heads = _int_field(v, "attn_pooler_heads", wv)
            if heads < 1 or embed_dim % heads:
                raise ConfigError(f"{wv}: field 'attn_pooler_heads' = {heads} must divide embed_dim {embed_dim}")
            extra = dict(pre_norm=True, norm_after_pool=True, attention_pool_size=embed_dim, attention_pool_heads=heads)
        vision = resnet or timm or vision_cls(
            hidden_size=width, intermediate_size=_mlp(width, v["mlp_ratio"], wv),
            num_hidden_layers=v["layers"], num_attention_heads=width // head_width, image_size=image_size,
            patch_size=v["patch_size"], hidden_act=act, layer_norm_eps=_eps(v, wv), projection_dim=embed_dim,
            **extra)
        if isinstance(timm, SiglipVisionConfig) and hf_text is None:
            if m.get("init_logit_bias") is None:
                raise ConfigError(f"{where_m}: field 'init_logit_bias' is missing; a timm SigLIP ViT with open_clip's "
                                  f"text tower reads as a SiglipModel, which has a logit bias")
            return DualEncoderConfig(
                vision=timm, text=_siglip_text(t, embed_dim, act, wt), projection_dim=embed_dim, model_type="siglip",
                logit_scale_init_value=float(m.get("init_logit_scale", OPENAI_LOGIT_SCALE)),
                logit_bias_init_value=m.get("init_logit_bias"))
        text_cls = OpenCLIPTextConfig if t["pool_type"] == "last" or embed_cls else MetaClip2TextConfig if metaclip \
            else CLIPTextConfig
        # CoCa's class token takes one more position than the context_length of its tokens.
        extra = dict(causal=not t.get("no_causal_mask"), embed_cls=embed_cls) if text_cls is OpenCLIPTextConfig \
            else {}
        text = hf_text or text_cls(
            vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=_mlp(t["width"], t["mlp_ratio"], wt),
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
            max_position_embeddings=_int_field(t, "context_length", wt) + embed_cls,
            hidden_act=act, layer_norm_eps=_eps(t, wt), projection_dim=embed_dim, pad_token_id=t["pad_id"],
            eos_token_id=2 if t["pool_type"] == "argmax" else t["eos_id"], **extra)
        return DualEncoderConfig(vision=vision, text=text, projection_dim=embed_dim,
                                 model_type=("metaclip_2" if metaclip else "clip") if plain
                                 else pair,
                                 logit_scale_init_value=float(m.get("init_logit_scale", OPENAI_LOGIT_SCALE)),
                                 logit_bias_init_value=m.get("init_logit_bias"))
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where_m}: {e}") from None


def _siglip_text(t: Mapping, embed_dim: int, act: str, where: str) -> SiglipTextConfig:
    """open_clip's text transformer with SigLIP's options as transformers' SiglipTextConfig; proj_type "none" (no
    projection) as its head at the identity, which load_dir fills in: the same numbers, a head training may move."""
    if t.get("proj_type") == "none":
        if t["width"] != embed_dim:
            raise ConfigError(f"{where}: field 'proj_type' = 'none' needs width {t['width']} = embed_dim {embed_dim}")
    elif not t.get("proj_bias"):
        raise ConfigError(f"{where}: field 'proj_bias' = {t.get('proj_bias')!r} is not implemented beside a timm "
                          f"SigLIP ViT; supported: [True] (SiglipModel's head has a bias), or proj_type 'none'")
    return SiglipTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=_mlp(t["width"], t["mlp_ratio"], where),
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
        hidden_act="gelu_pytorch_tanh" if t.get("act_kwargs") else act, layer_norm_eps=_eps(t, where),
        projection_size=embed_dim)


# ------------------------------------------------------------------------------------------------ weights

_BLOCK = re.compile(r"^(?P<tower>visual\.|text\.|)transformer\.resblocks\.(?P<i>\d+)\.(?P<rest>.+)$")
# open_clip's residual block, by the encoder layer's parts (dualenc.params.encoder); its q, k, v are one in_proj.
OPEN_CLIP_LAYER = dict(out="attn.out_proj", attention_norm="ln_1", fc1="mlp.c_fc", fc2="mlp.c_proj", mlp_norm="ln_2")
_BLOCK_NAMES = {name: tables.CLIP_LAYER[part] for part, name in OPEN_CLIP_LAYER.items()}
_TOP = {
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", None),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", None),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", None),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", None),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", None),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", None),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", None),
    "visual.proj": ("visual_projection.weight", "T"),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", None),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", None),
    "ln_final.weight": ("text_model.final_layer_norm.weight", None),
    "ln_final.bias": ("text_model.final_layer_norm.bias", None),
    "text_projection": ("text_projection.weight", "T"),
    "text_projection.weight": ("text_model.head.weight", None),  # a Linear (proj_bias): SiglipTextModel's head
    "text_projection.bias": ("text_model.head.bias", None),
    "logit_scale": ("logit_scale", "scalar"),
}


def to_transformers_names(tensors: Mapping[str, np.ndarray], where: str,
                          timm_name: str | None = None) -> tuple[dict, np.ndarray | None]:
    """open_clip tensors renamed (and split, transposed) as transformers' CLIPModel names them; the image tower's
    by the timm family of `timm_name` when the config names one (vision_cfg.timm_model_name).

    Returns (tensors, logit_bias or None). Raises CheckpointError listing names it does not know.
    """
    out, unknown, logit_bias = {}, [], None
    if timm_name is not None:
        tensors = open_clip_timm.prepare(tensors, timm_name, where)
    for name, value in tensors.items():
        plain = name[len("text."):] if name.startswith("text.") and not name.startswith("text.transformer.") \
            else name  # CustomTextCLIP keeps the text tower under "text."
        block = _BLOCK.match(name)
        if block:
            tower = "vision_model" if block["tower"] == "visual." else "text_model"
            prefix = f"{tower}.encoder.layers.{block['i']}."
            rest = block["rest"]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                if value.shape[0] % 3:
                    raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                    out[f"{prefix}self_attn.{part}.{kind}"] = chunk
                continue
            stem, _, leaf = rest.rpartition(".")
            if stem in _BLOCK_NAMES and leaf in ("weight", "bias"):
                out[f"{prefix}{_BLOCK_NAMES[stem]}.{leaf}"] = value
                continue
        elif plain in _TOP:
            target, how = _TOP[plain]
            if how == "T":
                if value.ndim != 2:
                    raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected a matrix")
                value = value.T
            elif how == "scalar":
                if value.size != 1:
                    raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected a scalar")
                value = value.reshape(())
            out[target] = value
            continue
        elif plain == "logit_bias" and value.size == 1:
            logit_bias = value.reshape(())
            continue
        elif name == "attn_mask" or name.endswith(".attn_mask"):
            continue  # a buffer (the causal mask), not a weight
        elif timm_name is not None and (renamed := open_clip_timm.transformers_name(name, value, timm_name, where)):
            out[renamed[0]] = renamed[1]
            continue
        elif open_clip_hf.transformers_name(name) is not None:  # an HF text tower's
            out[open_clip_hf.transformers_name(name)] = value
            continue
        unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) dualenc's open_clip reader does not know (layer "
                              f"scale, attention pooling or another architecture): {listed(unknown)}")
    return out, logit_bias


_POOL_NAMES = {"ln_q": "query_norm", "ln_k": "key_norm", "attn.out_proj": "attention.out_proj"}


def split_coca(tensors: Mapping[str, np.ndarray], model_cfg: Mapping, config: DualEncoderConfig,
               where: str) -> tuple[dict, dict, list[str]]:
    """CoCa's tensors read apart: (the others, its attentional pooler's and text class token's renamed to dualenc's
    names, the names not used: its captioning decoder's "text_decoder.*" and the pooler's queries after the first).
    Without a multimodal_cfg, attentional pooler or class token, (tensors, {}, [])."""
    pool = getattr(config.vision, "attention_pool_size", None)
    embed_cls = getattr(config.text, "embed_cls", False)
    decoder = model_cfg.get("multimodal_cfg") is not None
    rest, out, unused = {}, {}, []
    for name, value in tensors.items():
        stem, _, leaf = name.rpartition(".")
        pooler = name[len("visual.attn_pool."):] if pool and name.startswith("visual.attn_pool.") else None
        target = "vision_model.attentional_pool."
        if decoder and name.startswith("text_decoder."):
            unused.append(name)
        elif embed_cls and name in ("text.cls_emb", "cls_emb"):
            out["text_model.embeddings.class_embedding"] = value
        elif pooler == "query":
            if value.ndim != 2 or value.shape[0] < 1:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected (queries, width)")
            out[target + "query"] = value[0]
            unused += [f"{name}[1:{value.shape[0]}]"] if value.shape[0] > 1 else []
        elif pooler in ("attn.in_proj_weight", "attn.in_proj_bias"):  # q, k, v packed: the same widths
            if value.shape[0] % 3:
                raise CheckpointError(f"{where}: {name} has shape {value.shape}, not 3 stacked projections")
            for short, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{target}attention.{short}_proj.{pooler.rsplit('_', 1)[1]}"] = chunk
        elif pooler in ("attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"):  # kdim != embed_dim
            out[f"{target}attention.{pooler[len('attn.'):-len('_weight')]}.weight"] = value
        elif pooler is not None and stem[len("visual.attn_pool."):] in _POOL_NAMES and leaf in ("weight", "bias"):
            out[f"{target}{_POOL_NAMES[stem[len('visual.attn_pool.'):]]}.{leaf}"] = value
        else:
            rest[name] = value
    return rest, out, sorted(unused, key=lambda n: (n.startswith("text_decoder."), n))  # the queries first


def load_dir(path: str, stacked: bool = False) -> tuple[DualEncoderConfig, dict]:
    """Loads an open_clip hub directory as (CLIP config, params)."""
    config_path = os.path.join(path, CONFIG)
    data = files.read_json(config_path, "open_clip config")
    config = config_from_dict(data, where=config_path)
    weights_path = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights_path):
        present = [f for f in PICKLED if os.path.exists(os.path.join(path, f))]
        if present:
            raise CheckpointError(f"{path} holds only {', '.join(present)}; dualenc reads safetensors only and never "
                                  f"unpickles. If you trust the file, convert it with open_clip: "
                                  f"open_clip.push_to_hf_hub.save_for_hf(model, tokenizer, cfg, DIR, "
                                  f"safe_serialization=True) writes {WEIGHTS}")
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    tensors, _ = files.read_safetensors(weights_path)
    tensors, resnet = open_clip_resnet.split_tensors(tensors, config, weights_path)  # {} unless a ModifiedResNet
    tensors, coca, unused = split_coca(tensors, data["model_cfg"], config, weights_path)
    if unused:
        warnings.warn(f"{weights_path}: {len(unused)} tensor(s) of the captioning side (the attentional pooler's "
                      f"queries after the first, CoCa's text decoder) were not used (dualenc loads the contrastive "
                      f"towers; captioning is out of scope): {listed(unused, sort=False)}",
                      UnusedWeightsWarning, stacklevel=3)
    resnet.update(coca)  # renamed already, as the ResNet's
    timm_name = data["model_cfg"]["vision_cfg"].get("timm_model_name")  # config_from_dict has checked it
    renamed, logit_bias = to_transformers_names(tensors, weights_path, timm_name or None)
    renamed.update(resnet)
    if isinstance(config.text, SiglipTextConfig) and data["model_cfg"]["text_cfg"].get("proj_type") == "none":
        for name in ("text_model.head.weight", "text_model.head.bias"):  # no projection: the head at the identity
            if name in renamed:
                raise CheckpointError(f"{weights_path}: holds {name}, but {config_path} has proj_type 'none'")
        renamed["text_model.head.weight"] = np.eye(config.text.hidden_size, dtype=np.float32)
        renamed["text_model.head.bias"] = np.zeros(config.text.hidden_size, np.float32)
    weights = Weights(renamed, dict.fromkeys(renamed, weights_path),
                      f"{weights_path} (names as transformers' CLIPModel has them)", {})
    if (logit_bias is None) != (config.logit_bias_init_value is None):
        raise CheckpointError(f"{weights_path}: {'has' if logit_bias is not None else 'lacks'} a logit_bias, but "
                              f"{config_path} {'lacks' if logit_bias is not None else 'has'} init_logit_bias")
    shape = kinds.kind(config.model_type).scalar_shape
    if kinds.kind(config.model_type).own_bias and logit_bias is not None:  # in the kind's table (SiglipModel: (1,))
        if "logit_scale" in renamed:
            renamed["logit_scale"] = np.reshape(renamed["logit_scale"], shape)
        renamed["logit_bias"], logit_bias = np.reshape(logit_bias, shape), None
    params, _ = load_table(weights, dual_table(config), param_shapes(config))
    if logit_bias is not None:
        if logit_bias.dtype not in files.FLOATING:
            raise CheckpointError(f"{weights_path}: logit_bias of dtype {logit_bias.dtype} (expected floating point)")
        params["logit_bias"] = np.asarray(logit_bias, np.float32)
    return config, to_device(params, stacked)
