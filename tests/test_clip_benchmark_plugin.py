"""The "dualenc" model type for LAION's CLIP_benchmark: the clip-benchmark package's own runs give the same metrics
with it as with its open_clip model type on the same model, a BERT text tower's class scores through it equal
dualenc's own, NaFlex images pass through its tensors, and its commands run."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import tomllib
import warnings

import numpy as np
import pytest
import torch
from benchmark_data import CLASSES, COMMON, TEMPLATES, run_clip_benchmark
from conftest import TINY
from PIL import Image

import dualenc
from dualenc.benchmark import clip_benchmark as plugin

# One worker runs this module (its datasets, models and CLIP_benchmark runs are built once).
pytestmark = pytest.mark.xdist_group("clip_benchmark")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"zeroshot_classification": "cls", "zeroshot_retrieval": "ret"}


def run_eval(tmp, main, *args):
    """`main` (CLIP_benchmark's command, or the plugin's) run in this process on `eval ARGS`: its results JSON."""
    return run_clip_benchmark(main, [*args, *COMMON], os.path.join(tmp, f"result{len(os.listdir(tmp))}.json"))


@pytest.fixture(scope="module")
def folders(clip_benchmark_folders, tmp_path_factory):
    """The session's CLIP_benchmark datasets and tiny open_clip model (conftest), by task, and a folder for
    results."""
    f = clip_benchmark_folders
    out = tmp_path_factory.mktemp("plugin")
    (out / "out").mkdir()
    return {"root": out, "model": f["model"], **{task: f[name] for task, name in TASKS.items()}}


@pytest.fixture(scope="module")
def results(folders, clip_benchmark_native):
    """{(model_type, task): metrics} of CLIP_benchmark's runs on the tiny open_clip model (its native runs are the
    session's, conftest's clip_benchmark_native)."""
    out, found = folders["root"] / "out", {}
    for task, name in TASKS.items():
        found["open_clip", task] = clip_benchmark_native[name]["metrics"]
        found["dualenc", task] = run_eval(out, plugin.main, "--model", folders["model"], "--model_type", "dualenc",
                                          "--dataset", "wds/tiny", "--dataset_root", folders[task], "--task",
                                          task)["metrics"]
    return found


@pytest.mark.parametrize("task", ["zeroshot_classification", "zeroshot_retrieval"])
def test_dualenc_model_type_gives_open_clips_metrics(results, task):
    ours, native = results["dualenc", task], results["open_clip", task]
    assert sorted(ours) == sorted(native) and len(ours) == (3 if task == "zeroshot_classification" else 6)
    assert ours == pytest.approx(native, abs=1e-6, nan_ok=False)
    if task == "zeroshot_classification":  # the trained model tells classes apart
        assert native["acc1"] > 1 / len(CLASSES)
    else:
        assert native["image_retrieval_recall@1"] < native["image_retrieval_recall@10"]


def test_register_is_idempotent():
    from clip_benchmark import models

    plugin.register()
    plugin.register()
    assert models.MODEL_TYPES.count("dualenc") == 1 and models.TYPE2FUNC["dualenc"] is plugin.load_dualenc
    assert "open_clip" in models.MODEL_TYPES


def test_loader_refuses_what_it_does_not_use(folders):
    with pytest.raises(dualenc.ConfigError, match="--pretrained"):
        plugin.load_dualenc(folders["model"], "laion400m_e32")
    with pytest.raises(dualenc.ConfigError, match="--model_cache_dir"):
        plugin.load_dualenc(folders["model"], "", cache_dir="/tmp/cache")


def test_packed_tensors_are_checked(folders):
    model, _, _ = plugin.load_dualenc(folders["model"])
    with pytest.raises(dualenc.InputError, match="encode_text takes"):
        model.encode_text(torch.zeros((2, 5), dtype=torch.int64))  # open_clip's own token layout
    with pytest.raises(dualenc.InputError, match=r"\(n, C, H, W\)"):
        model.encode_image(torch.zeros((3, 32, 32)))


def split_images(root, split="test"):
    """A split's images and labels, read from its tars in order."""
    images, labels = [], []
    folder = os.path.join(root, split)
    for shard in sorted(n for n in os.listdir(folder) if n.endswith(".tar")):
        with tarfile.open(os.path.join(folder, shard)) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".cls"):
                    labels.append(int(data))
                else:
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images, np.asarray(labels)


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "photo", "of", "the", "blurry", "itap",
              *sorted({w for c in CLASSES for w in c.split()})]


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory):
    """A VisionTextDualEncoder of a ViT (30 x 30 images) and a BERT text tower whose vocabulary holds every word of
    the class prompts (so that prompts of different lengths get padded), saved with its processor."""
    import jax
    from conftest import _transformers, hf_text_config, hf_vision_config, randomize

    tf, root = _transformers(), tmp_path_factory.mktemp("bert")
    randomize(tf.ViTModel(hf_vision_config("vit")), seed=1).save_pretrained(root / "vision")
    randomize(tf.BertModel(hf_text_config("bert", vocab_size=len(BERT_VOCAB))), seed=2).save_pretrained(root / "text")
    (root / "text" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dualenc.NewlyInitializedWarning)
        config, params = dualenc.from_vision_text_pretrained(root / "vision", root / "text", key=jax.random.key(3),
                                                             projection_dim=16)
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 30, "width": 30}),
                                  dualenc.Tokenizer.from_pretrained(root / "text"))
    path = str(root / "model")
    dualenc.save_pretrained(path, config, params, processor=processor)
    return path, config, params, processor


def test_bert_text_tower_scores_equal_dualencs_own(bert_model, folders):
    """CLIP_benchmark's zero-shot classifier and logits through the plugin equal dualenc's own encoders'; its
    command's metrics on the model equal those of these logits."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    from sklearn.metrics import balanced_accuracy_score

    path, config, params, processor = bert_model
    model, transform, tokenizer = plugin.load_dualenc(path)
    images, labels = split_images(folders["zeroshot_classification"])
    templates = list(TEMPLATES)
    classifier = zc.zero_shot_classifier(model, tokenizer, list(CLASSES), templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader([(transform(image), label) for image, label in zip(images, labels)],
                                         batch_size=8)  # torch's default collate, as CLIP_benchmark's
    logits, target = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    weights = dualenc.zero_shot_classifier(params, config, processor, CLASSES, templates)
    direct = 100 * dualenc.encode_images(params, config, processor, images) @ weights
    np.testing.assert_allclose(classifier.numpy(), weights, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), direct, atol=1e-4)
    assert np.array_equal(target.numpy(), labels)

    tokens = tokenizer(["a photo of a red temple.", "a blurry photo of the grey flower."])
    assert (tokens[0, 1] == 0).any()  # the shorter prompt is padded, so the mask is in play
    unmasked = tokens.clone()
    unmasked[:, 1] = 1
    assert not torch.allclose(model.encode_text(tokens)[0], model.encode_text(unmasked)[0], atol=1e-3)

    metrics = run_eval(folders["root"] / "out", plugin.main, "--model", path, "--model_type", "dualenc",
                       "--dataset", "wds/tiny", "--dataset_root", folders["zeroshot_classification"],
                       "--task", "zeroshot_classification")["metrics"]
    predicted = direct.argmax(1)
    assert metrics["acc1"] == pytest.approx(np.mean(predicted == labels), abs=1e-6)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-6)


def test_naflex_images_pass_through_the_packed_tensor(bert_model):
    """A SigLIP 2 NaFlex vision tower: the transform packs patches, mask and grid into one tensor per image, and
    encode_image on their batch gives dualenc.encode_images' embeddings, for images of several aspect ratios."""
    import jax
    from benchmark_data import photos

    _, config, _, processor = bert_model
    config = dataclasses.replace(config, vision=dualenc.Siglip2VisionConfig(**TINY, patch_size=8, num_patches=16))
    params = dualenc.init(jax.random.key(5), config)
    processor = dualenc.Processor(dualenc.NaFlexImageProcessor(patch_size=8, max_num_patches=16),
                                  processor.tokenizer)
    model = plugin.BenchmarkModel(config, params, processor)
    transform = plugin.BenchmarkTransform(processor.image_processor)
    pics = photos()
    images = [Image.fromarray(a) for a in (pics["temple"][:90, :400], pics["flower"][:300, :60],
                                           pics["temple"][100:260, 100:260], pics["flower"][:20, :11])]
    packed = torch.stack([transform(image) for image in images])
    assert packed.shape == (4, 17, 8 * 8 * 3 + 1)
    got = torch.nn.functional.normalize(model.encode_image(packed), dim=-1).numpy()
    np.testing.assert_allclose(got, dualenc.encode_images(params, config, processor, images), atol=1e-5)
    with pytest.raises(dualenc.InputError, match="NaFlex"):
        model.encode_image(torch.zeros((2, 3, 30, 30)))


@pytest.fixture(scope="module")
def command_env(tmp_path_factory):
    """The environment of a command in a subprocess: dualenc importable from this checkout, and a sitecustomize
    that does what conftest does here (torchvision's op schemas). CLIP_benchmark's accuracy is left as it is:
    the command itself stands in for it under numpy 2.4."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import torchvision_shim\ntorchvision_shim.install()\n")
    path = os.pathsep.join(filter(None, [str(site), ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}


def test_console_script_help(command_env):
    """The console script pyproject.toml declares, run as pip's wrapper runs it, lists the model type."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, function = tomllib.load(f)["project"]["scripts"]["dualenc-clip-benchmark"].split(":")
    code = (f"import sys; from {module} import {function}; sys.argv[0] = 'dualenc-clip-benchmark'; "
            f"sys.exit({function}())")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--help"], capture_output=True, text=True,
                          env=command_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dualenc-clip-benchmark eval" in proc.stdout and "dualenc}" in proc.stdout  # --model_type's choices
    assert "sitecustomize" not in proc.stderr


def test_python_m_runs_an_evaluation(folders, results, command_env):
    out = folders["root"] / "python_m.json"
    proc = subprocess.run([sys.executable, "-m", "dualenc.benchmark.clip_benchmark", "eval", "--model",
                           folders["model"], "--model_type", "dualenc", "--dataset", "wds/tiny", "--dataset_root",
                           folders["zeroshot_classification"], "--task", "zeroshot_classification", *COMMON,
                           "--output", str(out)], capture_output=True, text=True, env=command_env,
                          cwd=folders["root"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        assert json.load(f)["metrics"] == pytest.approx(results["dualenc", "zeroshot_classification"], abs=1e-6)
