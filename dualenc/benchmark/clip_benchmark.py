"""A "dualenc" model type for LAION's CLIP_benchmark (the clip-benchmark package): any dualenc model directory
or hub id, evaluated by CLIP_benchmark's own code, as `dualenc-clip-benchmark eval --model_type dualenc --model
PATH --pretrained "" --dataset wds/NAME --dataset_root DIR ...` (or `python -m dualenc.benchmark.clip_benchmark`).

CLIP_benchmark holds a model with encode_image / encode_text, a transform (one PIL image to a tensor, batched by
torch's default collate) and a tokenizer (a list of strings to one tensor). Here those run dualenc's processor and
its jitted towers in float32; torch (a dependency of clip-benchmark, not of dualenc) is imported only when used.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dualenc import encode, model
from dualenc.errors import ConfigError, InputError
from dualenc.formats import load_pretrained
from dualenc.processing import NaFlexImageProcessor, Processor
from dualenc.processing.processor import image_inputs

MODEL_TYPE = "dualenc"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order of the rows the tokenizer packs


@jax.jit
def _image_features(params, config, inputs):
    return model.get_image_features(params, config, **inputs)


@jax.jit
def _text_features(params, config, inputs):
    return model.get_text_features(params, config, **inputs)


def _torch():
    import torch

    return torch


def _text_names(tokenizer) -> tuple[str, ...]:
    return tuple(name for name in TEXT_INPUTS if name in tokenizer.model_input_names)


class BenchmarkTransform:
    """One image (PIL, path or array) to the tensor BenchmarkModel.encode_image takes: (C, H, W) float32 pixels;
    for a NaFlex (SigLIP 2) processor, (max_num_patches + 1, patch_dim + 1) float32: the patches, the patch mask
    as the last column, and the patch grid (rows, columns) at the start of the last row (so CLIP_benchmark's
    image_caption_selection task, which reshapes images as (C, H, W), takes no NaFlex model). Numpy and PIL only
    (no JAX), so it runs in DataLoader worker processes."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.naflex = isinstance(image_processor, NaFlexImageProcessor)

    def __call__(self, image):
        inputs = image_inputs(self.image_processor, [image])
        if not self.naflex:
            return _torch().from_numpy(np.asarray(inputs["pixel_values"][0], np.float32))
        patches = inputs["pixel_values"][0]
        n, width = patches.shape
        packed = np.zeros((n + 1, width + 1), np.float32)  # width >= 1, so the grid's 2 numbers fit in the last row
        packed[:n, :width] = patches
        packed[:n, width] = inputs["pixel_attention_mask"][0]
        packed[n, :2] = inputs["spatial_shapes"][0]  # patch counts, exact in float32
        return _torch().from_numpy(packed)

    def __repr__(self) -> str:
        return f"BenchmarkTransform({self.image_processor!r})"


class BenchmarkTokenizer:
    """Texts to one int64 tensor (n_texts, k, length): rows input_ids, attention_mask and token_type_ids (those
    the tokenizer gives, in that order), which BenchmarkModel.encode_text unpacks.

    Padded as the text tower needs (config.text_padding): to the tower's length for the towers trained so
    (SigLIP's last-token pooling), else to the smallest length bucket (dualenc.encode.length_buckets) that holds
    the longest text, with the attention mask marking the padding (BERT attends by it; CLIP's causal towers pool
    at the end-of-text token, which padding does not move)."""

    def __init__(self, tokenizer, padding: str):
        self.tokenizer = tokenizer
        self.padding = padding
        self.names = _text_names(tokenizer)
        self.buckets = (tokenizer.max_length,) if padding == "max_length" else \
            encode.length_buckets(tokenizer.max_length)

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return _torch().zeros((0, len(self.names), self.buckets[0]), dtype=_torch().int64)
        enc = self.tokenizer(texts, padding=self.padding)
        length = next(b for b in self.buckets if b >= enc["input_ids"].shape[1])
        packed = np.zeros((len(texts), len(self.names), length), np.int64)
        packed[:, 0] = self.tokenizer.pad_token_id or 0
        for row, name in enumerate(self.names):
            packed[:, row, :enc[name].shape[1]] = enc[name]
        return _torch().from_numpy(packed)

    def __repr__(self) -> str:
        return f"BenchmarkTokenizer({self.tokenizer!r}, padding={self.padding!r})"


class BenchmarkModel:
    """The model CLIP_benchmark calls: encode_image / encode_text on BenchmarkTransform's (batched) and
    BenchmarkTokenizer's tensors give projected, not normalised, float32 features (n, projection_dim) as torch
    tensors on the inputs' device (CLIP_benchmark normalises them). Each batch runs dualenc's jitted tower in
    float32, its rows padded to a power of two and split over this process's devices (dualenc.encode.local_mesh),
    so a run compiles once per padded batch shape."""

    def __init__(self, config, params, processor: Processor, *, devices=None):
        if not isinstance(processor, Processor):
            raise InputError(f"processor must be a dualenc.Processor, got {type(processor).__name__}")
        self.config = config
        self.naflex = isinstance(processor.image_processor, NaFlexImageProcessor)
        self.text_names = _text_names(processor.tokenizer)
        self.mesh = encode.local_mesh(devices)
        self.params = encode.replicate(params, devices)

    def eval(self):
        return self

    def encode_image(self, images):
        """images: (n, C, H, W) float, or for NaFlex (n, max_num_patches + 1, patch_dim + 1) (BenchmarkTransform's)."""
        x = images.detach().cpu().float().numpy()
        if self.naflex:
            if x.ndim != 3 or x.shape[1] < 2 or x.shape[2] < 2:
                raise InputError(f"encode_image takes a NaFlex model's packed images (n, max_num_patches + 1, "
                                 f"patch_dim + 1) as this model type's transform gives them, got {tuple(x.shape)}")
            inputs = {"pixel_values": x[:, :-1, :-1], "pixel_attention_mask": x[:, :-1, -1].astype(np.int32),
                      "spatial_shapes": x[:, -1, :2].astype(np.int32)}
        else:
            if x.ndim != 4:
                raise InputError(f"encode_image takes images (n, C, H, W), got {tuple(x.shape)}")
            inputs = {"pixel_values": x}
        return self._torch_rows(_image_features, inputs, images.device)

    def encode_text(self, tokens):
        """tokens: (n, k, length) int, as BenchmarkTokenizer packs input_ids, attention_mask, token_type_ids."""
        x = tokens.detach().cpu().numpy()
        if x.ndim != 3 or x.shape[1] != len(self.text_names):
            raise InputError(f"encode_text takes this model type's packed tokens (n, {len(self.text_names)}, "
                             f"length): rows {list(self.text_names)}, got {tuple(x.shape)}")
        inputs = {name: x[:, row].astype(np.int32) for row, name in enumerate(self.text_names)}
        return self._torch_rows(_text_features, inputs, tokens.device)

    def _torch_rows(self, features, inputs: dict, device):
        n = len(next(iter(inputs.values())))
        out = np.zeros((0, self.config.projection_dim), np.float32)
        if n:
            rows = encode.device_rows(1 << (n - 1).bit_length(), self.mesh.size)  # padding rows repeat the last
            inputs = jax.device_put(encode.pad_rows(inputs, rows), NamedSharding(self.mesh, P("data")))
            out = np.asarray(features(self.params, self.config, inputs))[:n]
        return _torch().from_numpy(np.array(out, np.float32)).to(device)  # a writable copy

    def __repr__(self) -> str:
        return f"BenchmarkModel({self.config.model_type}, naflex={self.naflex}, devices={self.mesh.size})"


def load_dualenc(model_name: str, pretrained: str = "", cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark's loader for model_type "dualenc": (BenchmarkModel, BenchmarkTransform, BenchmarkTokenizer).

    Args:
      model_name: a dualenc model directory (transformers' or open_clip's layout, with its processor files) or a
        Hugging Face Hub model id, as dualenc.load_pretrained takes it (CLIP_benchmark's --model).
      pretrained: for a hub id, its revision (branch, tag or commit; "" the default branch); for a directory it
        must be "" (CLIP_benchmark's --pretrained, whose default names an open_clip tag).
      cache_dir: must be None: hub ids are cached where HF_HUB_CACHE / HF_HOME say (--model_cache_dir).
      device: CLIP_benchmark's torch device; the features come back on the inputs' device, and JAX runs on this
        process's own devices.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"--model must name a dualenc model directory or hub id, got {model_name!r}")
    if pretrained and os.path.exists(model_name):
        raise ConfigError(f"--pretrained must be \"\" for the model directory {model_name} (dualenc reads the "
                          f"weights in it; --pretrained is a hub id's revision), got {pretrained!r}")
    if cache_dir is not None:
        raise ConfigError(f"--model_cache_dir is not used by model type {MODEL_TYPE!r}: set HF_HUB_CACHE to "
                          f"choose where hub models are cached (got {cache_dir!r})")
    if os.path.exists(model_name) and not os.path.isdir(model_name):
        raise ConfigError(f"--model {model_name} is a file: give the model's directory")
    revision = pretrained or None
    config, params = load_pretrained(model_name, revision=revision)
    processor = Processor.from_pretrained(model_name, revision=revision)
    return (BenchmarkModel(config, params, processor), BenchmarkTransform(processor.image_processor),
            BenchmarkTokenizer(processor.tokenizer, config.text_padding))


def register() -> None:
    """Adds model type "dualenc" to CLIP_benchmark's registry (clip_benchmark.models: TYPE2FUNC, and MODEL_TYPES,
    which its command's --model_type choices are); calling it again changes nothing."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_dualenc
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: clip_benchmark.cli holds the same list


def _topk_accuracy(output, target, topk=(1,)):
    """clip_benchmark.metrics.zeroshot_classification.accuracy, the same arithmetic, without its float() of a
    1-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted")."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def main() -> int:
    """The `dualenc-clip-benchmark` command: CLIP_benchmark's own command line (sys.argv) with model type
    "dualenc" registered. Under numpy 2.4 or later its top-k accuracy (which fails there whatever the model
    type) is swapped for _topk_accuracy, the same arithmetic."""
    register()
    import numpy as np
    from clip_benchmark import cli
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        zeroshot_classification.accuracy = linear_probe.accuracy = _topk_accuracy
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
