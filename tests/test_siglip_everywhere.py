"""SigLIP and SigLIP 2 NaFlex models everywhere a CLIP goes: the Processor against transformers' SiglipProcessor and
Siglip2Processor, bulk encoding and zero-shot against the PyTorch models, the LiT cache, and every subcommand."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import TINY, _transformers, make_workspace, max_diff, randomize
from PIL import Image
from sklearn.datasets import load_sample_images
from test_siglip_tokenizer import _write, gemma_files, gemma_json, siglip_hub_files, spiece_model  # noqa: F401

import dualenc
from dualenc import cli, data
from dualenc.train import loop as trainer
from dualenc.evaluate import pad_rows

LENGTH = 64  # what SigLIP's processors pad to
KINDS = ("siglip", "siglip2")
PROCESSOR_CLASSES = {"siglip": "SiglipProcessor", "siglip2": "Siglip2Processor"}
TEXTS = ["A photo of a CAT!", "a dog", "the quick brown fox jumps over the lazy dog near the river at sunset", "x"]


def _hf_model(kind, vocab_size):
    tf = _transformers()
    prefix = "Siglip2" if kind == "siglip2" else "Siglip"
    text = getattr(tf, prefix + "TextConfig")(**{**TINY, "vocab_size": vocab_size, "max_position_embeddings": LENGTH})
    grid = {"patch_size": 16, "num_patches": 16} if kind == "siglip2" else {"image_size": 30, "patch_size": 10}
    vision = getattr(tf, prefix + "VisionConfig")(**TINY, **grid)
    config = getattr(tf, prefix + "Config")(text_config=text.to_dict(), vision_config=vision.to_dict())
    model = getattr(tf, prefix + "Model")(config).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    return model


@pytest.fixture(scope="module")
def models(spiece_model, gemma_json, tmp_path_factory):  # noqa: F811
    """{kind: (PyTorch model, transformers processor (PIL image backend), directory)}: each model saved with its
    processor files, as transformers' SiglipProcessor and Siglip2Processor write them."""
    tf = _transformers()
    root = tmp_path_factory.mktemp("siglip-everywhere")
    out = {}
    for kind in KINDS:
        if kind == "siglip":
            tokenizer = tf.AutoTokenizer.from_pretrained(_write(root / "tok1", siglip_hub_files(spiece_model)))
            processor = tf.SiglipProcessor(tf.SiglipImageProcessorPil(size={"height": 30, "width": 30}), tokenizer)
        else:
            tokenizer = tf.AutoTokenizer.from_pretrained(_write(root / "tok2", gemma_files(gemma_json,
                                                                                            model_type="siglip2")))
            processor = tf.Siglip2Processor(tf.Siglip2ImageProcessorPil(), tokenizer)  # 16-pixel patches, 256 of them
        model = _hf_model(kind, len(tokenizer))
        path = root / kind
        model.save_pretrained(path)
        processor.save_pretrained(path)
        out[kind] = (model, processor, path)
    return out


@pytest.fixture(scope="module")
def photos():
    china, flower = load_sample_images().images
    return [china[:90, :400], flower[:300, :60], china[100:260, 100:260], flower[:20, :11], china[200:300, 50:90]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("everywhere-cli"))


def reference(processor, texts=None, images=None):
    return dict(processor(text=texts, images=images, padding="max_length", max_length=LENGTH, return_tensors="np"))


def assert_same_arrays(ours, theirs):
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key, value in theirs.items():
        if np.issubdtype(value.dtype, np.floating):
            assert ours[key].shape == value.shape and max_diff(ours[key], value) <= 1e-5, key
        else:
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


def torch_forward(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()})


# ------------------------------------------------------------------------------------------------ Processor

@pytest.mark.parametrize("kind", KINDS)
def test_processor_gives_transformers_arrays_and_saves_what_auto_processor_loads(kind, models, photos, tmp_path):
    _, ref, path = models[kind]
    ours = dualenc.Processor.from_pretrained(path)
    assert isinstance(ours.image_processor, dualenc.NaFlexImageProcessor) == (kind == "siglip2")
    got = ours(text=TEXTS, images=photos)
    expected = reference(ref, TEXTS, photos)
    assert_same_arrays(got, expected)
    assert got["input_ids"].shape == (len(TEXTS), LENGTH)
    if kind == "siglip2":
        assert got["pixel_values"].shape == (len(photos), 256, 768)
        assert len({tuple(s) for s in got["spatial_shapes"]}) > 3  # photos of several aspect ratios
    else:
        assert "attention_mask" not in got  # the hub's SigLIP tokenizer gives input_ids alone

    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == PROCESSOR_CLASSES[kind]
    again = _transformers().AutoProcessor.from_pretrained(tmp_path, use_fast=False)
    assert type(again).__name__ == PROCESSOR_CLASSES[kind] and type(again.image_processor).__name__.endswith("Pil")
    assert_same_arrays(got, reference(again, TEXTS, photos))
    assert_same_arrays(dualenc.Processor.from_pretrained(tmp_path)(text=TEXTS, images=photos), got)


def test_naflex_processor_of_other_patch_settings_saves_as_the_generic_processor(models, photos, tmp_path):
    """transformers' Siglip2Processor passes its own patch_size 16 / max_num_patches 256 over the image processor's:
    other settings are saved under VisionTextDualEncoderProcessor, which keeps them."""
    tokenizer = dualenc.Processor.from_pretrained(models["siglip2"][2]).tokenizer
    ours = dualenc.Processor(dualenc.NaFlexImageProcessor(patch_size=8, max_num_patches=40), tokenizer)
    ours.save_pretrained(tmp_path)
    again = _transformers().AutoProcessor.from_pretrained(tmp_path, use_fast=False)
    assert type(again).__name__ == "VisionTextDualEncoderProcessor"
    got = ours(text=TEXTS, images=photos)
    assert got["pixel_values"].shape == (len(photos), 40, 192)
    assert_same_arrays(got, reference(again, TEXTS, photos))


# --------------------------------------------------------------------------------------- encoding, zero-shot

@pytest.mark.parametrize("kind", KINDS)
def test_bulk_encoding_and_sigmoid_zero_shot_match_transformers(kind, models, photos):
    model, ref, path = models[kind]
    config, params = dualenc.load_pretrained(path)
    processor = dualenc.Processor.from_pretrained(path)
    ours_images = dualenc.encode_images(params, config, processor, photos, batch_size=4)  # a last batch of one
    ours_texts = dualenc.encode_texts(params, config, processor, TEXTS + ["a cat"], batch_size=4)
    theirs = torch_forward(model, reference(ref, TEXTS + ["a cat"], photos))
    assert ours_images.shape == (len(photos), 32) and max_diff(ours_images, theirs.image_embeds) < 1e-5
    assert max_diff(ours_texts, theirs.text_embeds) < 1e-5  # texts padded to 64, the last position pooled

    padded = pad_rows(processor(images=photos[:1]), 4)
    assert len(padded["pixel_values"]) == 4
    dualenc.check_inputs(config, **padded)  # the padding rows of a last batch are valid inputs

    labels = ["a cat", "a dog", "x"]
    classifier = dualenc.zero_shot_classifier(params, config, processor, labels, templates=["{}"])
    rule = dualenc.zero_shot_logit_rule(params, config)
    top, probs = dualenc.zero_shot_predict(ours_images, classifier, k=3, **rule)
    want = torch.sigmoid(torch_forward(model, reference(ref, labels, photos)).logits_per_image).numpy()
    np.testing.assert_allclose(probs, np.take_along_axis(want, top, axis=1), atol=1e-5)
    assert not np.allclose(probs.sum(1), 1, atol=1e-3)  # per-label sigmoids, not a softmax


# ------------------------------------------------------------------------------------------------- training

def test_lit_cache_and_batches_of_a_naflex_tower(models, workspace, photos):
    path = models["siglip2"][2]
    config, params = dualenc.load_pretrained(path)
    processor = dualenc.Processor.from_pretrained(path)
    inputs = processor(images=photos)
    features = dualenc.train.tower_features(params, config, "vision", inputs, batch_size=2)  # a last batch of one
    whole = dualenc.model.run_tower(params, config, "vision", inputs, pooled=True).pooler_output
    assert features.shape == (len(photos), 32) and max_diff(features, whole) < 1e-5

    dataset = data.read_pairs(workspace / "data" / "pairs.jsonl")
    stream = iter(data.Batches(dataset, processor, 4, max_length=LENGTH))
    _, batch = next(stream)
    stream.close()
    rows = processor(images=[dataset.images[i] for i in batch["image_index"]])
    assert_same_arrays({k: batch[k] for k in rows}, rows)  # NaFlex's three arrays, image by image
    with pytest.raises(dualenc.ConfigError, match="pools the last position.*max_length=64"):
        trainer.fit(config, params, dataset, processor, trainer.TrainConfig(steps=1, batch_size=4))


# ------------------------------------------------------------------------------------------------- the command

def run_cli(capsys, *args):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_subcommand_on_siglip_directories(kind, models, workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")  # in this process: leave jax's settings alone
    model, ref, path = models[kind]
    images, pairs, labels = workspace / "data" / "images", workspace / "data" / "pairs.jsonl", workspace / "labels.txt"
    (tmp_path / "templates.txt").write_text("{}\n")
    # (batches of 4 rows throughout: one compilation serves every subcommand)
    files = [images / f"{i}.png" for i in range(4)]
    results = json.loads(run_cli(capsys, "zero-shot", "--model", path, "--labels", "red,green,blue", "--templates",
                                 tmp_path / "templates.txt", "--json", *files))["results"]
    pictures = [np.asarray(Image.open(f)) for f in files]
    want = torch.sigmoid(torch_forward(model, reference(ref, ["red", "green", "blue"], pictures)).logits_per_image)
    for row, result in zip(want.numpy(), results):
        np.testing.assert_allclose(result["probabilities"], [row[["red", "green", "blue"].index(n)]
                                                             for n in result["labels"]], atol=1e-5)

    run_cli(capsys, "embed", "--model", path, "--images", images, "--out", tmp_path / "index.safetensors",
            "--batch-size", 4)
    found = json.loads(run_cli(capsys, "search", "--model", path, "--index", tmp_path / "index.safetensors",
                               "--top-k", 3, "--json", "a photo of the red square"))[0]["results"]
    assert len(found) == 3 and found[0]["score"] >= found[2]["score"]
    figures = json.loads(run_cli(capsys, "eval", "--model", path, "--data", pairs, "--labels-file", labels, "--json",
                                 "--batch-size", 4, "--out", tmp_path / "report"))
    assert figures["images"] == 12 and 0 <= figures["zero_shot_accuracy"] <= 1

    out = tmp_path / "tuned"
    run_cli(capsys, "train", "--vision", path, "--text", path, "--data", pairs, "--out", out, "--steps", 2,
            "--batch-size", 4, "--cache", "--quiet")
    config, params = dualenc.load_pretrained(path)
    tuned_config, tuned = dualenc.load_pretrained(out)
    assert tuned_config == config  # the whole SigLIP model, trained with its own loss
    jax.tree_util.tree_map(np.testing.assert_array_equal, tuned["vision"], params["vision"])  # locked, cached
    assert max_diff(tuned["text"]["head"]["kernel"], params["text"]["head"]["kernel"]) > 1e-4
    tf = _transformers()
    loaded, info = getattr(tf, model.__class__.__name__).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(tf.AutoProcessor.from_pretrained(out)).__name__ == PROCESSOR_CLASSES[kind]

    capsys.readouterr()
    code = cli.main(["train", "--vision", str(path), "--text", str(path), "--data", str(pairs), "--out",
                     str(tmp_path / "no"), "--projection-dim", "8", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "projection_dim does not apply" in err[0]


@pytest.mark.filterwarnings("ignore::dualenc.UnusedWeightsWarning")  # the SigLIP 2 directory's text tower
def test_train_a_naflex_vision_tower_with_another_text_tower(models, workspace, tmp_path, capsys, monkeypatch):
    """SigLIP 2's NaFlex tower, locked but not cached (the train step runs it on the batches' NaFlex arrays), beside
    a BERT: new projections, CLIP's loss."""
    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")
    path = models["siglip2"][2]
    run_cli(capsys, "train", "--vision", path, "--text", workspace / "text", "--data",
            workspace / "data" / "pairs.jsonl", "--out", tmp_path / "lit", "--steps", 2, "--batch-size", 4,
            "--projection-dim", 8, "--quiet")
    config, params = dualenc.load_pretrained(tmp_path / "lit")
    assert config.model_type == "vision-text-dual-encoder" and isinstance(config.vision, dualenc.Siglip2VisionConfig)
    assert config.default_loss == "clip" and params["visual_projection"]["kernel"].shape == (32, 8)
    _, original = dualenc.load_pretrained(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["vision"], original["vision"])  # locked
    assert isinstance(dualenc.Processor.from_pretrained(tmp_path / "lit").image_processor, dualenc.NaFlexImageProcessor)
