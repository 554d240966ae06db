"""dualenc: pure-JAX vision-text dual encoders (VisionTextDualEncoder, CLIP, open_clip, SigLIP, SigLIP 2),
checkpoint-compatible with transformers, open_clip and big_vision.

The public names below load on first use (PEP 562): `import dualenc` imports no tower, no training loop, no
grain, orbax, faiss or command line; `dualenc.apply` imports the model, `dualenc.train.fit` the loop. The house
(which room holds what, and which way imports go) is mapped in README.md, "The house".
"""

from __future__ import annotations

import sys

from dualenc import aliases

__version__ = "0.1.0"

# public name -> the module (under dualenc) that defines it
_HOME = {
    **dict.fromkeys(("BertConfig", "RobertaConfig"), "towers.bert"),
    **dict.fromkeys(("CLIPTextConfig", "SiglipTextConfig", "Siglip2TextConfig"), "towers.clip_text"),
    **dict.fromkeys(("CLIPVisionConfig", "ViTConfig"), "towers.vit"),
    "SiglipVisionConfig": "towers.siglip",
    **dict.fromkeys(("ChineseCLIPTextConfig", "ChineseCLIPVisionConfig"), "towers.chinese_clip"),
    "ConvNextConfig": "towers.convnext",
    "EvaConfig": "towers.eva",
    "HFTextEncoderConfig": "towers.hf_text",
    "ModifiedResNetConfig": "towers.resnet",
    "Siglip2VisionConfig": "towers.siglip2",
    "VitaminConfig": "towers.vitamin",
    "DualEncoderConfig": "config",
    **dict.fromkeys(("CheckpointError", "ConfigError", "DataError", "DualEncError", "InputError"), "errors"),
    **dict.fromkeys(("NewlyInitializedWarning", "UnusedWeightsWarning", "from_vision_text_pretrained",
                     "load_big_vision", "load_config", "load_pretrained", "save_pretrained"), "formats"),
    **dict.fromkeys(("encode_images", "encode_texts"), "encode"),
    **dict.fromkeys(("retrieval_metrics", "zero_shot_classifier", "zero_shot_logit_rule", "zero_shot_predict"),
                    "evaluate"),
    "TowerOutput": "layers",
    **dict.fromkeys(("AutoImageProcessor", "EncodedImage", "ImageProcessor", "NaFlexImageProcessor", "Processor",
                     "Tokenizer"), "processing"),
    "LoRA": "lora",
    **dict.fromkeys(("load_peft", "save_peft"), "formats.peft"),
    **dict.fromkeys(("ema_params", "interpolate", "with_ema"), "train.averaging"),
    **dict.fromkeys(("DualEncoderOutput", "apply", "check_inputs", "get_image_features", "get_text_features", "init",
                     "num_params", "stack_layers", "unstack_layers"), "model"),
}
# subpackages and modules reachable as attributes (dualenc.train, dualenc.towers, ...); the tower families too
_MODULES = ("config", "data", "encode", "errors", "evaluate", "files", "formats", "hub", "kinds", "layers", "lora",
            "losses", "model", "params", "plots", "processing", "search", "tables", "templates", "towers", "train")

__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(_load(_HOME[name]), name)
    elif name in _MODULES:
        value = _load(name)
    elif "dualenc." + name in aliases.MOVED:
        return aliases.module("dualenc." + name)  # warns at each use, so never cached here
    else:
        value = _tower_module(name)  # dualenc.vit, dualenc.bert...: the registry's tower modules
        if value is None:
            raise AttributeError(f"module 'dualenc' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))


def _tower_module(name: str):
    """The tower module registered under this short name (dualenc.towers.vit as dualenc.vit), or None."""
    towers = _load("towers")
    return next((m for m in towers.MODULES if m.__name__.rsplit(".", 1)[1] == name), None)


def _load(module: str):
    """dualenc.<module>, imported now. Every import is written out: dualenc never imports a module named by a
    computed string (tests/test_security.py)."""
    if module == "config":
        import dualenc.config
    elif module == "errors":
        import dualenc.errors
    elif module == "data":
        import dualenc.data
    elif module == "encode":
        import dualenc.encode
    elif module == "evaluate":
        import dualenc.evaluate
    elif module == "files":
        import dualenc.files
    elif module == "formats":
        import dualenc.formats
    elif module == "formats.peft":
        import dualenc.formats.peft
    elif module == "hub":
        import dualenc.hub
    elif module == "kinds":
        import dualenc.kinds
    elif module == "layers":
        import dualenc.layers
    elif module == "lora":
        import dualenc.lora
    elif module == "losses":
        import dualenc.losses
    elif module == "model":
        import dualenc.model
    elif module == "params":
        import dualenc.params
    elif module == "plots":
        import dualenc.plots
    elif module == "processing":
        import dualenc.processing
    elif module == "search":
        import dualenc.search
    elif module == "tables":
        import dualenc.tables
    elif module == "templates":
        import dualenc.templates
    elif module == "towers" or module.startswith("towers."):
        import dualenc.towers
    elif module == "train":
        import dualenc.train
    elif module == "train.averaging":
        import dualenc.train.averaging
    return sys.modules["dualenc." + module]
