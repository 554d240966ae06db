"""`export_encoders`: a folder holding both encoders as serialized jax.export programs (weights beside them in
.npz files), optionally as ONNX graphs, with the processor's files and a manifest.json; written atomically and
checked against dualenc's own embeddings before it is moved into place."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from dualenc import files, model
from dualenc.config import DualEncoderConfig
from dualenc.errors import InputError
from dualenc.export import encoders as enc
from dualenc.export.encoders import Encoder

FORMAT = "dualenc-export"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")
MANIFEST = "manifest.json"


def reference(config: DualEncoderConfig, params, side: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """dualenc's embeddings for one side's inputs: normalize(get_*_features(params, config, ...)), jitted, as
    dualenc.encode computes them."""
    features = model.get_image_features if side == "image" else model.get_text_features
    return np.asarray(jax.jit(lambda p, x: model.normalize(features(p, config, **x)))(params, inputs))


def check_inputs(config: DualEncoderConfig, encoder: Encoder, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid inputs for an encoder at a batch size: pixels N(0, 1); ids within the vocabulary, each text
    a different length of real tokens."""
    rng = np.random.default_rng(seed + batch)
    out = {}
    for name, spec in encoder.inputs.items():
        shape = (batch, *spec.shape[1:])
        if name == "input_ids":
            out[name] = rng.integers(0, config.text.vocab_size, shape).astype(spec.dtype)
        elif name == "attention_mask":
            out[name] = (np.arange(shape[1]) < 1 + np.arange(batch)[:, None] * 7 % shape[1]).astype(spec.dtype)
        elif name == "token_type_ids":
            out[name] = np.zeros(shape, spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            out[name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            raise InputError(f"cannot make check inputs for {name} of the {encoder.name} encoder")
    return out


def _spec_json(name: str, spec) -> dict:
    return {"name": name, "shape": enc.shape_of(spec), "dtype": str(np.dtype(spec.dtype))}


def export_encoders(out: str | os.PathLike, config: DualEncoderConfig, params, processor, *, onnx: bool = False,
                    force: bool = False, batch_sizes: Sequence[int] = (1, 8), platforms: Sequence[str] = PLATFORMS,
                    source: str | None = None) -> dict:
    """Writes both encoders into the folder `out` and returns its manifest.

    Files: image_encoder.jaxexport and text_encoder.jaxexport (jax.export, serialized: a program of
    (weights, *inputs) with a symbolic batch size, lowered for `platforms`), image_encoder.npz and
    text_encoder.npz (the weights each reads, flat names as in encoders.flatten), with `onnx` also
    image_encoder.onnx and text_encoder.onnx (weights inside), the processor's files (Processor.save_pretrained)
    and manifest.json. Each encoder is checked at every batch size of `batch_sizes` against dualenc's own
    embeddings; the largest absolute differences are in the manifest's "checks".

    Args:
      out: a folder that does not exist or is empty; with force, a folder to replace. Written in a temporary
        folder beside it that is renamed into place (files.atomic_directory).
      source: where the model came from, for the manifest.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise InputError(f"out {out} is not empty: give another folder, or force to replace it")
    sizes = [b for b in batch_sizes]
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise InputError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    bad = sorted(set(platforms) - set(PLATFORMS))
    if bad or not platforms:
        raise InputError(f"platforms must be some of {list(PLATFORMS)}, got {list(platforms)!r}")
    pair = enc.make_encoders(config, params, processor)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
                "model_type": config.model_type, "projection_dim": _dim(pair),
                "jax_version": jax.__version__, "platforms": list(platforms), "encoders": {},
                "preprocessing": enc.preprocessing(processor, pair["image"]), "logit_rule": enc.logit_rule(params),
                "checks": {}}
    with files.atomic_directory(out) as tmp:
        for side, encoder in pair.items():
            manifest["encoders"][side], manifest["checks"][side] = _write(
                tmp, config, params, encoder, onnx=onnx, batch_sizes=sizes, platforms=tuple(platforms))
        processor.save_pretrained(tmp)
        files.write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def _dim(pair: dict[str, Encoder]) -> int:
    fn, weights = pair["image"].fn, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pair["image"].weights.items()}
    return int(jax.eval_shape(fn, weights, *pair["image"].inputs.values()).shape[-1])


def _write(folder: str, config, params, encoder: Encoder, *, onnx: bool, batch_sizes: list[int],
           platforms: tuple[str, ...]) -> tuple[dict, dict]:
    stem = f"{encoder.name}_encoder"
    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in encoder.weights.items()}
    exported = jax.export.export(jax.jit(encoder.fn), platforms=platforms)(weight_specs, *encoder.inputs.values())
    files.write_bytes_atomic(os.path.join(folder, stem + ".jaxexport"), exported.serialize())
    with open(os.path.join(folder, stem + ".npz"), "wb") as f:
        np.savez(f, **encoder.weights)
    entry = {"jax": stem + ".jaxexport", "weights": stem + ".npz",
             "inputs": [_spec_json(k, v) for k, v in encoder.inputs.items()],
             "output": {"name": encoder.output, "shape": enc.shape_of(exported.out_avals[0]), "dtype": "float32",
                        "normalised": "L2"}}
    runners = {"jax": lambda x: np.asarray(exported.call(encoder.weights, *x.values()))}
    if onnx:
        from dualenc.export import onnx_graph

        entry["onnx"] = onnx_graph.save(onnx_graph.to_onnx(encoder), os.path.join(folder, stem + ".onnx"))
        sess = onnx_graph.session(os.path.join(folder, entry["onnx"][0]))
        runners["onnx"] = lambda x: onnx_graph.run(sess, x)
    checks = {name: {} for name in runners}
    for batch in batch_sizes:
        inputs = check_inputs(config, encoder, batch)
        want = reference(config, params, encoder.name, inputs)
        for name, run in runners.items():
            checks[name][str(batch)] = float(np.max(np.abs(run(inputs) - want)))
    return entry, checks
