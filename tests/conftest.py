"""Shared fixtures: tiny transformers reference models with fully random weights, saved to temp dirs."""

import collections
import os
import shutil
import sys
import tempfile
import warnings

# 4 virtual CPU devices; and LLVM's backend optimisation off: the tests' programs are tiny and each runs a few
# times, so compiling them is most of their cost (a train step's gradient: about 35% less compile CPU time at
# level 0). XLA's HLO passes (fusion, layout) still run, so the programs compute what they compute in use.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The `dualenc` command's compilation cache: a folder of this session's, not the home directory. The test
# processes (xdist's workers and the subprocesses tests start) share it through jax's own settings too, so a
# program compiled once (the same train step in several tests, or in each process of a resume test) is read
# back instead of compiled again. The session's first process (pytest, or xdist's controller) makes the folder
# and removes it at the end; the others inherit the variables (a subprocess importing this file makes none).
# Every program is kept, however fast it compiled: the small ones (each op run eagerly, the jitted helpers every
# command and test process compiles again) add up to more than the big train steps.
_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _CACHE = tempfile.mkdtemp(prefix="dualenc-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("DUALENC_COMPILATION_CACHE", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import torchvision_shim  # noqa: E402

torchvision_shim.install()  # before anything imports torchvision (transformers' image processors, open_clip)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _transformers():
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def hf_vision_config(kind="vit", **overrides):
    tf = _transformers()
    kw = {**TINY, "image_size": 30, "patch_size": 10, **overrides}
    return tf.ViTConfig(**kw) if kind == "vit" else tf.CLIPVisionConfig(**kw)


def hf_text_config(kind="bert", **overrides):
    tf = _transformers()
    kw = {**TINY, "vocab_size": 99, "max_position_embeddings": 40, **overrides}
    return tf.BertConfig(**kw) if kind == "bert" else tf.RobertaConfig(**kw)


def randomize(module, seed=0, std=0.1):
    """Random values for every param, LayerNorm and biases included (transformers' 0/1 init hides mistakes)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name.lower() and name.endswith("weight")) else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))
    return module


def hf_dual_model(vision="vit", text="bert", seed=0, projection_dim=16, vision_kw=None, text_kw=None):
    tf = _transformers()
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        hf_vision_config(vision, **(vision_kw or {})), hf_text_config(text, **(text_kw or {})),
        projection_dim=projection_dim)
    model = tf.VisionTextDualEncoderModel(config).eval()
    for tower in (model.vision_model, model.text_model):
        tower.config._attn_implementation = "eager"
    return randomize(model, seed)


def text_batch(text_config, batch=3, length=9, seed=0):
    """input_ids / attention_mask / token_type_ids with padded rows, as a tokenizer gives them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, text_config.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):
        mask[row, max(1, length - 2 * row - 1):] = 0
    ids[mask == 0] = text_config.pad_token_id
    token_types = rng.integers(0, text_config.type_vocab_size, (batch, length))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types)


def pixels(n=2, size=30, channels=3, seed=0, width=None):
    return np.random.default_rng(seed).standard_normal((n, channels, size, width or size)).astype(np.float32)


def max_diff(ours, ref):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))


@pytest.fixture
def hf_dir(tmp_path):
    """Saves a transformers model into a fresh temp dir and returns the path."""
    counter = iter(range(1000))

    def save(model):
        path = tmp_path / f"hf{next(counter)}"
        model.save_pretrained(path)
        return str(path)

    return save


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "red", "green", "blue", "square",
         "dark", "bright", "picture", "an", "image", "colour", "cat", "dog"]


def make_workspace(root):
    """Single-tower model directories (ViT + BERT with processor files) and 12 captioned images, for the CLI."""
    import json

    from PIL import Image

    import dualenc

    tf = _transformers()
    vision = randomize(tf.ViTModel(hf_vision_config("vit")), seed=1)
    vision.save_pretrained(root / "vision")
    dualenc.ImageProcessor(size={"height": 30, "width": 30}).save_pretrained(root / "vision")
    text = randomize(tf.BertModel(hf_text_config("bert", vocab_size=len(WORDS))), seed=2)
    text.save_pretrained(root / "text")
    (root / "text" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rows = []
    for i in range(12):
        name = list(colours)[i % 3]
        Image.fromarray(np.full((30, 30, 3), colours[name], np.uint8)).save(images / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "caption": f"a photo of the {name} square", "label": name})
    rows.append({"image": "images/missing.png", "caption": "a photo of nothing"})
    (root / "data" / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "labels.txt").write_text("red\ngreen\nblue\n")
    return root


_WORKERS_TRIED = collections.Counter()  # what pytest-xdist's workers' fuzzers tried, gathered here


def _tried():
    fuzz = sys.modules.get("test_fuzz")
    return collections.Counter(fuzz.TRIED) if fuzz is not None else collections.Counter()


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which sends workeroutput to the controller
def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the counts to the controller
        session.config.workeroutput["fuzz_tried"] = dict(_tried())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKERS_TRIED.update(getattr(node, "workeroutput", {}).get("fuzz_tried", {}))


def pytest_terminal_summary(terminalreporter):
    """Records how many inputs each fuzzer of test_fuzz.py tried (in this process and in xdist's workers)."""
    tried = _tried() + _WORKERS_TRIED
    if tried:
        terminalreporter.write_line("fuzz inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(tried.items())))


def pytest_unconfigure(config):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def clip_benchmark_folders(tmp_path_factory):
    """Datasets in CLIP_benchmark's layout made from real photos, and a tiny open_clip model in its local-dir
    layout (tests/benchmark_data.py), built once per worker: {"root", "model", "cls", "ret"}."""
    import benchmark_data

    root = tmp_path_factory.mktemp("clip_benchmark")
    return {"root": root, "model": benchmark_data.tiny_open_clip(str(root / "oc")),
            "cls": benchmark_data.classification_set(str(root / "cls")),
            "ret": benchmark_data.retrieval_set(str(root / "ret"))}


@pytest.fixture(scope="session")
def clip_benchmark_native(clip_benchmark_folders):
    """The clip-benchmark package's own results (its JSON) on both datasets with the open_clip model it loads
    natively: {"cls": ..., "ret": ...}."""
    import benchmark_data
    from clip_benchmark import cli

    f, out = clip_benchmark_folders, {}
    for name, task in (("cls", "zeroshot_classification"), ("ret", "zeroshot_retrieval")):
        out[name] = benchmark_data.run_clip_benchmark(
            cli.main, ["--dataset", f"wds/{name}", "--dataset_root", f[name], "--task", task, "--model",
                       f"local-dir:{f['model']}", "--model_type", "open_clip", *benchmark_data.COMMON],
            f["root"] / f"native-{name}.json")
    return out
