"""open_clip's HF text towers (text_cfg.hf_model_name: the multilingual XLM-RoBERTa CLIPs): the text tower's
config from the RoBERTa config the name points at, and their tensors' names (see dualenc.towers.hf_text)."""

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
    known = KNOWN.get(name.removeprefix("FacebookAI/"))
    if known is None:
        raise ConfigError(f"{where}: field 'hf_model_name' = {name!r} is neither a local folder holding a "
                          f"config.json nor one of {sorted(KNOWN)}")
    return known, f"{where}: hf_model_name {name!r}"


def text_config(t: Mapping[str, Any], embed_dim: Any, where: str, root: str = "") -> RobertaConfig:
    """The text tower of an open_clip text_cfg with hf_model_name (`where` names the text_cfg in errors; `root`
    is the open_clip config's folder, where a relative hf_model_name is also looked for).

    hf_pooler_type cls_pooler with hf_proj_type linear is transformers' RobertaModel + text_projection: a plain
    RobertaConfig. Any other pooler or the mlp head: an HFTextEncoderConfig. The mlp head's hidden layer is
    (hidden_size + embed_dim) // 2 wide, as open_clip builds it. Raises ConfigError naming the field for what is
    not implemented: max_pooler (open_clip's own fails), no projection, output_tokens, models other than
    RoBERTa / XLM-RoBERTa.
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
    if not isinstance(raw, Mapping) or raw.get("model_type") not in RobertaConfig.model_types:
        got = raw.get("model_type") if isinstance(raw, Mapping) else raw
        raise ConfigError(f"{where}: field 'hf_model_name' = {t['hf_model_name']!r} is a {got!r} model, not "
                          f"implemented; supported: {list(RobertaConfig.model_types)}")
    base = RobertaConfig.from_dict(raw, where=source)
    if pooler == "cls_pooler" and proj == "linear":
        return base
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "model_type"}
    return HFTextEncoderConfig(**fields, text_model_type=base.model_type, pooler_type=pooler,
                               head_hidden_size=(base.hidden_size + embed_dim) // 2 if proj == "mlp" else None)


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
