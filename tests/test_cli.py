"""Every subcommand end to end through the installed `dualenc` console script, on tiny models and data."""

import json
import os
import shutil
import subprocess


import numpy as np
import pytest
from conftest import make_workspace
from PIL import Image

import dualenc

def dualenc_cmd(*args, check=True, timeout=300, env=None, cwd=None):
    exe = shutil.which("dualenc")
    assert exe, "the dualenc console script is installed with the package"
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": "", **(env or {})}, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "model"
    proc = dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text",
                       "--data", workspace / "data" / "pairs.jsonl", "--out", out, "--steps", 6, "--batch-size", 4,
                       "--checkpoint-every", 3, "--projection-dim", 8, "--quiet")
    assert "trained 6 steps" in proc.stdout and "missing image" in proc.stderr
    return out


def test_train_writes_a_transformers_directory_and_resumes(trained, workspace):
    import transformers

    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        os.listdir(trained))
    model, info = transformers.VisionTextDualEncoderModel.from_pretrained(trained, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    transformers.VisionTextDualEncoderProcessor.from_pretrained(trained)
    steps = sorted(os.listdir(trained / "checkpoints"))
    assert steps == ["step_00000003", "step_00000006"]
    again = dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text",
                        "--data", workspace / "data" / "pairs.jsonl", "--out", trained, "--steps", 6, "--quiet",
                        "--batch-size", 4, "--checkpoint-every", 3, "--projection-dim", 8, check=False)
    assert again.returncode != 0 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = dualenc_cmd("train", "--vision", workspace / "vision", "--text", workspace / "text",
                          "--data", workspace / "data" / "pairs.jsonl", "--out", trained, "--steps", 9, "--quiet",
                          "--batch-size", 4, "--checkpoint-every", 3, "--projection-dim", 8, "--resume")
    assert "trained 9 steps" in resumed.stdout


def test_train_fine_tunes_a_whole_model(trained, workspace, tmp_path):
    """--model DIR fine-tunes a whole dual encoder: its projections and logit scale are the starting point, the
    locked tower stays as it was, and the processor files come along."""
    import jax

    out = tmp_path / "tuned"
    dualenc_cmd("train", "--model", trained, "--data", workspace / "data" / "pairs.jsonl", "--out", out,
                "--steps", 2, "--batch-size", 4, "--lock", "vision", "--quiet")
    (_, before), (config, after) = dualenc.load_pretrained(trained), dualenc.load_pretrained(out)
    assert config.projection_dim == 8 and {"tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(out))
    same = jax.tree_util.tree_map(np.array_equal, before["vision"], after["vision"])
    assert all(jax.tree_util.tree_leaves(same))  # locked
    assert np.abs(np.asarray(after["text_projection"]["kernel"]) - before["text_projection"]["kernel"]).max() < 0.05
    assert not np.array_equal(after["text_projection"]["kernel"], before["text_projection"]["kernel"])
    for args, message in ((("--model", trained, "--vision", workspace / "vision"), "not both"),
                          (("--vision", workspace / "vision"), "both --vision DIR and --text DIR"),
                          (("--model", trained, "--projection-dim", 16), "projection_dim 8")):
        bad = dualenc_cmd("train", *args, "--data", workspace / "data" / "pairs.jsonl", "--out", tmp_path / "x",
                          "--steps", 1, "--quiet", check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_zero_shot_embed_search_eval(trained, workspace):
    images = workspace / "data" / "images"
    out = dualenc_cmd("zero-shot", "--model", trained, "--labels", "red,green,blue", "--top-k", 2, "--json",
                      images / "0.png", images / "1.png")
    results = json.loads(out.stdout)
    assert [r["image"] for r in results] == [str(images / "0.png"), str(images / "1.png")]
    assert all(len(r["labels"]) == 2 and 0 < r["probabilities"][0] <= 1 for r in results)
    plain = dualenc_cmd("zero-shot", "--model", trained, "--labels-file", workspace / "labels.txt", images / "2.png")
    assert plain.stdout.startswith(str(images / "2.png") + ": ")

    index = workspace / "images.safetensors"
    dualenc_cmd("embed", "--model", trained, "--images", images, "--out", index)
    from dualenc import files

    tensors, meta = files.read_safetensors(str(index))
    assert tensors["embeddings"].shape == (12, 8) and meta["kind"] == "image" and len(json.loads(meta["names"])) == 12
    np.testing.assert_allclose(np.linalg.norm(tensors["embeddings"], axis=1), 1, rtol=1e-5)
    found = json.loads(dualenc_cmd("search", "--model", trained, "--index", index, "--top-k", 3, "--json",
                                   "a photo of the red square").stdout)
    assert len(found) == 3 and found[0]["score"] >= found[1]["score"] >= found[2]["score"]
    (workspace / "texts.txt").write_text("a red square\na blue square\n")
    dualenc_cmd("embed", "--model", trained, "--texts", workspace / "texts.txt", "--out", workspace / "t.safetensors")
    by_image = json.loads(dualenc_cmd("search", "--model", trained, "--index", workspace / "t.safetensors", "--image",
                                      "--json", images / "0.png").stdout)
    assert {r["name"] for r in by_image} == {"a red square", "a blue square"}

    figures = json.loads(dualenc_cmd("eval", "--model", trained, "--data", workspace / "data" / "pairs.jsonl",
                                     "--labels-file", workspace / "labels.txt", "--json").stdout)
    assert figures["images"] == 12 and figures["skipped"] == {"missing image": 1}
    assert 0 <= figures["zero_shot_accuracy"] <= 1 and 0 < figures["i2t_R@10"] <= 1


@pytest.mark.parametrize("args,message", [
    (["zero-shot", "--model", "/nowhere", "--labels", "a,b", "x.png"], "image not found: x.png"),
    (["eval", "--model", "/nowhere", "--data", "/nowhere.jsonl"], "caption file not found"),
    (["embed", "--model", "/nowhere", "--texts", "t.txt", "--out", "x.npy"], ".safetensors"),
    (["search", "--model", "/nowhere", "--index", "/nowhere.safetensors", "q"], "index file not found"),
    (["zero-shot", "--model", "MODEL", "--labels-file", "/no/labels.txt", "IMAGE"], "labels file not found"),
    (["zero-shot", "--model", "/nowhere/model", "--labels", "a,b", "IMAGE"], "model directory not found"),
])
def test_errors_are_one_line_without_traceback(args, message, trained, workspace):
    args = [str(trained) if a == "MODEL" else str(workspace / "data" / "images" / "0.png") if a == "IMAGE" else a
            for a in args]
    proc = dualenc_cmd(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("dualenc "), proc.stderr
    debug = dualenc_cmd(*args, "--debug", check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compilation_cache_keeps_programs_across_runs(trained, workspace, tmp_path):
    """The command keeps compiled programs in DUALENC_COMPILATION_CACHE (a second run reads them back and
    answers the same); "off" writes none."""
    image = workspace / "data" / "images" / "2.png"
    runs = []
    for where in (tmp_path / "cache", tmp_path / "cache", "off"):
        env = {"DUALENC_COMPILATION_CACHE": str(where), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_COMPILATION_CACHE_DIR": ""}  # the command's own choice, not the test session's
        runs.append(dualenc_cmd("zero-shot", "--model", trained, "--labels", "red,green,blue", "--json", image,
                                env=env, cwd=tmp_path).stdout)
        if len(runs) == 1:
            entries = os.listdir(tmp_path / "cache")
            assert any(name.endswith("-cache") for name in entries), entries
    assert runs[0] == runs[1] == runs[2]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(entries)  # the second run compiled nothing new
    assert not os.path.exists(tmp_path / "off")


def test_every_subcommand_has_help_with_an_example():
    for name in ("demo", "zero-shot", "embed", "search", "train", "eval"):
        out = dualenc_cmd(name, "--help").stdout
        assert "example:" in out and f"dualenc {name}" in out


def test_demo_short_run_is_deterministic(tmp_path):
    runs = [json.loads(dualenc_cmd("demo", "--steps", 30, "--seed", 3, "--out", tmp_path / f"d{i}", "--json").stdout)
            for i in range(2)]
    for key in ("zero_shot_accuracy", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "final_train_loss"):
        assert runs[0][key] == runs[1][key]
    assert runs[0]["zero_shot_chance"] == 0.1 and runs[0]["held_out_images"] > 300
    model = tmp_path / "d0" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(model))
    with Image.open(tmp_path / "d0" / "demo.png") as picture:
        assert picture.size[0] > 300 and picture.size[1] > 200
    assert runs[0]["unseen_template"] not in " ".join(dualenc.data.DIGIT_TEMPLATES)
    config, params = dualenc.load_pretrained(model)
    assert config.vision.image_size == 16



def test_every_subcommand_on_open_clip_and_clip_models(workspace, tmp_path):
    """An open_clip directory (no tokenizer files: open_clip's own vocabulary) runs zero-shot, embed, search and
    eval; converted with save_pretrained, the transformers CLIP directory trains with its projections kept."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 8, "quick_gelu": True,
           "vision_cfg": {"image_size": 30, "patch_size": 10, "width": 32, "layers": 1, "head_width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"resize_mode": "squash"}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(oc / "open_clip_model.safetensors"))
    images, pairs = workspace / "data" / "images", workspace / "data" / "pairs.jsonl"
    results = json.loads(dualenc_cmd("zero-shot", "--model", oc, "--labels", "red,green,blue", "--json",
                                     images / "0.png").stdout)
    assert len(results) == 1 and abs(sum(results[0]["probabilities"]) - 1) < 1e-4
    dualenc_cmd("embed", "--model", oc, "--images", images, "--out", tmp_path / "index.safetensors")
    found = json.loads(dualenc_cmd("search", "--model", oc, "--index", tmp_path / "index.safetensors", "--json",
                                   "a photo of the red square").stdout)
    assert found and found[0]["score"] >= found[-1]["score"]
    figures = json.loads(dualenc_cmd("eval", "--model", oc, "--data", pairs, "--labels-file",
                                     workspace / "labels.txt", "--json").stdout)
    assert figures["images"] == 12 and 0 <= figures["zero_shot_accuracy"] <= 1

    config, params = dualenc.load_pretrained(oc)
    dualenc.save_pretrained(tmp_path / "hf", config, params, processor=dualenc.Processor.from_pretrained(oc))
    dualenc_cmd("train", "--vision", tmp_path / "hf", "--text", tmp_path / "hf", "--data", pairs, "--lock", "vision",
                "--out", tmp_path / "tuned", "--steps", 2, "--batch-size", 4, "--quiet")
    tuned_config, tuned = dualenc.load_pretrained(tmp_path / "tuned")
    assert tuned_config.projection_dim == 8 and tuned_config.text == config.text  # the CLIP's own projections
    np.testing.assert_array_equal(tuned["vision"]["embeddings"]["patch"]["kernel"],
                                  params["vision"]["embeddings"]["patch"]["kernel"])  # locked
