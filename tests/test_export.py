"""`dualenc export`: jax.export programs that a process without dualenc runs to dualenc's embeddings, and ONNX
graphs within 1e-5 of them in onnxruntime, for a CLIP and a SigLIP model at batch 1 and 8."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import dualenc
from dualenc import cli, data, model
from dualenc.export import bundle, make_encoders
from dualenc.export.onnx_graph import session
from tests.conftest import TINY

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("export")

BATCHES = (1, 8)
MODELS = {
    "clip": dualenc.DualEncoderConfig(
        vision=dualenc.CLIPVisionConfig(**TINY, image_size=32, patch_size=8),
        text=dualenc.CLIPTextConfig(**TINY, vocab_size=99, max_position_embeddings=16), projection_dim=16,
        model_type="clip"),
    "siglip": dualenc.DualEncoderConfig(
        vision=dualenc.SiglipVisionConfig(**TINY, image_size=32, patch_size=8),
        text=dualenc.SiglipTextConfig(**TINY, vocab_size=99, max_position_embeddings=16), projection_dim=32,
        model_type="siglip", logit_bias_init_value=-10.0),
}

# Runs in a fresh interpreter (-I: no PYTHONPATH, no current directory): jax and numpy only.
CONSUMER = """
import json, sys
import jax, numpy as np
out = {}
for folder in sys.argv[1:]:
    manifest = json.load(open(folder + "/manifest.json"))
    refs = np.load(folder + "/../refs.npz")
    for side, entry in manifest["encoders"].items():
        program = jax.export.deserialize(open(folder + "/" + entry["jax"], "rb").read())
        weights = dict(np.load(folder + "/" + entry["weights"]))
        for batch in (1, 8):
            inputs = [refs[f"{side}.{batch}.{spec['name']}"] for spec in entry["inputs"]]
            got = np.asarray(program.call(weights, *inputs))
            out[f"{folder.rsplit('/', 2)[1]}.{side}.{batch}"] = [
                float(np.max(np.abs(got - refs[f"{side}.{batch}.embeds"]))), list(got.shape), str(got.dtype)]
assert not [m for m in sys.modules if m.split(".")[0] == "dualenc"], "the consumer imported dualenc"
print(json.dumps(out))
"""


def _processor(folder):
    data.write_vocab(folder, ["a photo of a cat", "a drawing of a dog"])
    return dualenc.Processor(dualenc.ImageProcessor(size={"height": 32, "width": 32}),
                             dualenc.Tokenizer.from_pretrained(folder, max_length=16))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (folder, config, params, refs)}: the CLIP model exported by the command (from a saved model
    directory), the SigLIP model by export_encoders; refs holds inputs and dualenc's embeddings per batch size."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, config) in enumerate(MODELS.items()):
        params = model.init(jax.random.key(i), config)
        processor = _processor(root / f"vocab-{name}")
        folder = root / name / "out"
        if name == "clip":
            dualenc.save_pretrained(root / "clip-model", config, params, processor=processor)
            assert cli.main(["export", "--model", root / "clip-model", "--out", folder, "--onnx"]) == 0
            config, params = dualenc.load_pretrained(root / "clip-model")
        else:
            bundle.export_encoders(folder, config, params, processor, onnx=True, batch_sizes=BATCHES)
        manifest = json.loads((folder / "manifest.json").read_text())
        refs = {}
        for side, entry in manifest["encoders"].items():
            encoder = make_encoders(config, params, processor)[side]
            for batch in BATCHES:
                inputs = bundle.check_inputs(config, encoder, batch, seed=7)
                features = model.get_image_features if side == "image" else model.get_text_features
                embed = jax.jit(lambda p, x, features=features: model.normalize(features(p, config, **x)))
                refs.update({f"{side}.{batch}.{k}": v for k, v in inputs.items()})
                refs[f"{side}.{batch}.embeds"] = np.asarray(embed(params, inputs))
        np.savez(root / name / "refs.npz", **refs)
        out[name] = (folder, manifest, refs)
    return out


def test_a_fresh_process_without_dualenc_runs_the_jax_programs_to_dualencs_embeddings(exported):
    folders = [str(exported[name][0]) for name in MODELS]
    run = subprocess.run([sys.executable, "-I", "-c", CONSUMER, *folders], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    diffs = json.loads(run.stdout)
    assert len(diffs) == 2 * 2 * len(BATCHES)
    for key, (diff, shape, dtype) in diffs.items():
        name, _, batch = key.split(".")
        assert diff <= 1e-6 and shape == [int(batch), MODELS[name].projection_dim] and dtype == "float32", key


@pytest.mark.parametrize("name", MODELS)
def test_onnx_graphs_match_dualenc_in_onnxruntime(exported, name):
    folder, manifest, refs = exported[name]
    for side, entry in manifest["encoders"].items():
        sess = session(str(folder / entry["onnx"][0]))
        assert [i.shape[0] for i in sess.get_inputs()] == ["batch"] * len(entry["inputs"])
        for batch in BATCHES:
            inputs = {spec["name"]: refs[f"{side}.{batch}.{spec['name']}"] for spec in entry["inputs"]}
            got = sess.run(None, inputs)[0]
            np.testing.assert_allclose(got, refs[f"{side}.{batch}.embeds"], rtol=0, atol=1e-5)
        assert max(manifest["checks"][side]["onnx"].values()) <= 1e-5
        assert max(manifest["checks"][side]["jax"].values()) <= 1e-6


def test_the_manifest_says_what_a_consumer_needs(exported):
    clip, siglip = exported["clip"][1], exported["siglip"][1]
    assert clip["format"] == "dualenc-export" and clip["format_version"] == 1
    assert clip["encoders"]["image"]["inputs"] == [{"name": "pixel_values", "shape": ["batch", 3, 32, 32],
                                                    "dtype": "float32"}]
    assert [i["name"] for i in clip["encoders"]["text"]["inputs"]] == ["input_ids", "attention_mask"]
    assert clip["encoders"]["text"]["output"]["shape"] == ["batch", 16]
    assert clip["preprocessing"]["tokenizer"]["max_length"] == 16 and clip["preprocessing"]["image_size"] == [32, 32]
    assert clip["logit_rule"]["probabilities"].startswith("softmax") and "logit_bias" not in clip["logit_rule"]
    assert siglip["logit_rule"]["probabilities"] == "sigmoid" and siglip["logit_rule"]["logit_bias"] == -10.0
    folder = exported["clip"][0]
    assert {"tokenizer.json", "preprocessor_config.json", "text_encoder.onnx"} <= {p.name for p in folder.iterdir()}
    assert dualenc.Processor.from_pretrained(folder).tokenizer.max_length == 16


def test_a_non_empty_folder_is_kept_unless_forced(exported, tmp_path, capsys):
    folder = exported["clip"][0]
    before = sorted(p.name for p in folder.iterdir())
    assert cli.main(["export", "--model", tmp_path / "absent", "--out", folder]) == 2
    assert "--force" in capsys.readouterr().err and sorted(p.name for p in folder.iterdir()) == before
    with pytest.raises(dualenc.InputError, match="not empty"):
        bundle.export_encoders(folder, MODELS["clip"], None, None)
