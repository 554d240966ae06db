"""open_clip's HF text towers (text_cfg.hf_model_name: the multilingual XLM-RoBERTa CLIPs, NLLB-CLIP's M2M100
encoder): the text tower's config from the transformers config the name points at, and their tensors' names (see
dualenc.towers.hf_text)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from dualenc import files
from dualenc.config import RobertaConfig
from dualenc.errors import ConfigError
from dualenc.towers.hf_text import POOLERS, HFTextEncoderConfig

# The hub configs of the models open_clip's own configs name, so that their checkpoints read without a download
# (the values of their config.json on the Hugging Face Hub; "FacebookAI/" names them too).
_XLMR = dict(model_type="xlm-roberta", vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
             layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu")
KNOWN = {
    "xlm-roberta-base": dict(_XLMR, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072),
    "xlm-roberta-large": dict(_XLMR, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096),
    "roberta-base": dict(_XLMR, model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072),
}
# NLLB's (M2M100 encoder-decoders, of which open_clip keeps the encoder), "facebook/" in their names
_NLLB = dict(model_type="m2m_100", vocab_size=256206, max_position_embeddings=1024, d_model=1024,
             encoder_attention_heads=16, activation_function="relu", dropout=0.1, attention_dropout=0.1,
             activation_dropout=0.0, encoder_layerdrop=0, init_std=0.02, scale_embedding=True, pad_token_id=1,
             bos_token_id=0, eos_token_id=2)
KNOWN_FACEBOOK = {
    "nllb-200-distilled-600M": dict(_NLLB, encoder_layers=12, encoder_ffn_dim=4096),
    "nllb-200-distilled-1.3B": dict(_NLLB, encoder_layers=24, encoder_ffn_dim=8192),
}
# transformers' M2M100Config defaults, for the fields a config.json leaves out
_M2M100_DEFAULTS = dict(vocab_size=128112, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                        encoder_attention_heads=16, encoder_layerdrop=0.05, activation_function="relu", d_model=1024,
                        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, init_std=0.02,
                        scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2)
PROJECTIONS = ("linear", "mlp")
_OFF = (None, False, 0, "")


def _model_config(name: Any, where: str, root: str) -> tuple[Mapping, str]:
    """The transformers config.json hf_model_name names: a local folder (as given, as open_clip reads it, then
    in `root`, the open_clip config's folder), else one of KNOWN. Returns (the dict, where it came from)."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: field 'hf_model_name' must be a string, got {name!r}")
    for folder in (name, os.path.join(root, name)):
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            return files.read_json(path, "hf_model_name config"), path
    known = KNOWN.get(name.removeprefix("FacebookAI/")) or KNOWN_FACEBOOK.get(name.removeprefix("facebook/"))
    if known is None:
        raise ConfigError(f"{where}: field 'hf_model_name' = {name!r} is neither a local folder holding a "
                          f"config.json nor one of {sorted(KNOWN) + ['facebook/' + n for n in KNOWN_FACEBOOK]}")
    return known, f"{where}: hf_model_name {name!r}"


def text_config(t: Mapping[str, Any], embed_dim: Any, where: str, root: str = "") -> RobertaConfig:
    """The text tower of an open_clip text_cfg with hf_model_name (`where` names the text_cfg in errors; `root`
    is the open_clip config's folder, where a relative hf_model_name is also looked for).

    hf_pooler_type cls_pooler with hf_proj_type linear is transformers' RobertaModel + text_projection: a plain
    RobertaConfig. Any other pooler or the mlp head, or an M2M100 / NLLB model (its encoder): an
    HFTextEncoderConfig. The mlp head's hidden layer is (hidden_size + embed_dim) // 2 wide, as open_clip builds
    it. Raises ConfigError naming the field for what is not implemented: max_pooler (open_clip's own fails), no
    projection, output_tokens, models other than RoBERTa / XLM-RoBERTa / M2M100.
    """
    pooler = t.get("hf_pooler_type", "mean_pooler")
    if pooler not in POOLERS:
        why = " (open_clip's MaxPooler fails in open_clip itself: masked_fill with an integer mask)" \
            if pooler == "max_pooler" else ""
        raise ConfigError(f"{where}: field 'hf_pooler_type' = {pooler!r} is not implemented{why}; supported: "
                          f"{list(POOLERS)}")
    proj = t.get("hf_proj_type", "mlp")
    if proj not in PROJECTIONS:
        raise ConfigError(f"{where}: field 'hf_proj_type' = {proj!r} is not implemented; supported: "
                          f"{list(PROJECTIONS)}")
    if t.get("output_tokens") not in _OFF:
        raise ConfigError(f"{where}: field 'output_tokens' = {t['output_tokens']!r} is not implemented; "
                          f"supported: [False]")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ConfigError(f"{where.rsplit(': ', 1)[0]}: field 'embed_dim' must be a positive integer, "
                          f"got {embed_dim!r}")
    raw, source = _model_config(t["hf_model_name"], where, root)
    head_hidden_size = lambda width: (width + embed_dim) // 2 if proj == "mlp" else None  # noqa: E731
    model_type = raw.get("model_type") if isinstance(raw, Mapping) else raw
    if model_type == "m2m_100":
        return _m2m100(raw, source, pooler, head_hidden_size)
    if model_type not in RobertaConfig.model_types:
        raise ConfigError(f"{where}: field 'hf_model_name' = {t['hf_model_name']!r} is a {model_type!r} model, not "
                          f"implemented; supported: {[*RobertaConfig.model_types, 'm2m_100']}")
    base = RobertaConfig.from_dict(raw, where=source)
    if pooler == "cls_pooler" and proj == "linear":
        return base
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "model_type"}
    return HFTextEncoderConfig(**fields, text_model_type=base.model_type, pooler_type=pooler,
                               head_hidden_size=head_hidden_size(base.hidden_size))


def _m2m100(raw: Mapping[str, Any], source: str, pooler: str, head_hidden_size) -> HFTextEncoderConfig:
    """An M2M100 / NLLB config.json's encoder (what open_clip keeps of the model) as an HFTextEncoderConfig;
    cls_pooler, over an output without a pooler, is the first token's last hidden state. Refuses the
    training-time drops dualenc's encoder lacks (encoder_layerdrop, activation_dropout) unless 0."""
    c = {**_M2M100_DEFAULTS, **raw}
    for key in ("encoder_layerdrop", "activation_dropout"):
        if isinstance(c[key], bool) or c[key] not in (0, 0.0):
            raise ConfigError(f"{source}: field '{key}' = {c[key]!r} is not implemented (a drop in training "
                              f"dualenc's M2M100 encoder does not make); supported: [0]")
    if not isinstance(c["d_model"], int) or isinstance(c["d_model"], bool):
        raise ConfigError(f"{source}: field 'd_model' must be an integer, got {c['d_model']!r}")
    return HFTextEncoderConfig.from_dict(dict(
        model_type="open_clip_hf_text", text_model_type="m2m_100", vocab_size=c["vocab_size"],
        hidden_size=c["d_model"], num_hidden_layers=c["encoder_layers"],
        num_attention_heads=c["encoder_attention_heads"], intermediate_size=c["encoder_ffn_dim"],
        hidden_act=c["activation_function"], hidden_dropout_prob=c["dropout"],
        attention_probs_dropout_prob=c["attention_dropout"], max_position_embeddings=c["max_position_embeddings"],
        type_vocab_size=1, initializer_range=c["init_std"], layer_norm_eps=1e-5, pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"], scale_embedding=c["scale_embedding"],
        pooler_type="cls_last_hidden_state_pooler" if pooler == "cls_pooler" else pooler,
        head_hidden_size=head_hidden_size(c["d_model"])), where=f"{source} (its encoder, M2M100Encoder)")


def transformers_name(name: str) -> str | None:
    """The name a tensor of open_clip's HFTextEncoder (under "text.") has in the dual encoder's checkpoint
    (RobertaModel under "text_model.", the head's last Linear as text_projection); None for other names."""
    if name.startswith("text.transformer."):
        return "text_model." + name[len("text.transformer."):]
    if name in ("text.proj.weight", "text.proj.2.weight"):
        return "text_projection.weight"
    if name == "text.proj.0.weight":
        return "text_model.proj.0.weight"
    return None
