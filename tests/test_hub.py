"""Hugging Face Hub model ids, read from a hand-built offline hub cache (nothing is downloaded)."""

import argparse
import contextlib
import io
import json
import os
import shutil
import sys

import chex
import jax
import numpy as np
import pytest
from conftest import TINY, WORDS
from PIL import Image

import dualenc
import huggingface_hub  # the hub extra, installed with dev
from huggingface_hub import constants

from dualenc import cli, hub
from dualenc.formats import assembly
from dualenc.train import loop as trainer
from dualenc.cli import training_checks

CONFIG = dualenc.DualEncoderConfig(vision=dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                   text=dualenc.BertConfig(**TINY, vocab_size=40, max_position_embeddings=16),
                                   projection_dim=8)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_model(path, seed):
    vocab = path.parent / f"{path.name}-vocab"
    vocab.mkdir(parents=True)
    (vocab / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(vocab))
    dualenc.save_pretrained(path, CONFIG, dualenc.init(jax.random.key(seed), CONFIG), processor=processor)
    shutil.rmtree(vocab)
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("hub") / "model", seed=0)


@pytest.fixture
def cache(saved, tmp_path, monkeypatch):
    """An offline hub cache holding org/name (with a pickle that must never be opened); returns its snapshot."""
    root = tmp_path / "hub-cache"
    repo = root / "models--org--name"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(saved, snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"not a pickle; must never be opened")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, value in (("HF_HUB_CACHE", str(root)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))  # read from the environment at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(snapshot)


def test_an_id_loads_as_its_snapshot(cache):
    config, params = dualenc.load_pretrained("org/name")
    want_config, want = dualenc.load_pretrained(cache)
    assert config == want_config == CONFIG
    chex.assert_trees_all_equal(params, want)
    assert dualenc.load_config("org/name") == CONFIG
    _, at_main = dualenc.load_pretrained("org/name", revision="main")
    chex.assert_trees_all_equal(at_main, want)
    processor = dualenc.Processor.from_pretrained("org/name")
    expected = dualenc.Processor.from_pretrained(cache)
    for key, value in expected(text=["a red square"], images=[np.zeros((20, 20, 3), np.uint8)]).items():
        np.testing.assert_array_equal(processor(text=["a red square"], images=[np.zeros((20, 20, 3), np.uint8)])[key],
                                      value)
    assert dualenc.Tokenizer.from_pretrained("org/name").max_length == expected.tokenizer.max_length
    assert dualenc.ImageProcessor.from_pretrained("org/name").to_dict() == expected.image_processor.to_dict()
    config, params, processor = assembly.start_from(model_path="org/name", key=jax.random.key(0))
    assert config == CONFIG and isinstance(processor, dualenc.Processor)
    chex.assert_trees_all_equal(params, want)
    with pytest.raises(dualenc.ConfigError, match=f"{COMMIT}/config.json is a whole dual encoder"):
        dualenc.from_vision_text_pretrained("org/name", "org/name", key=jax.random.key(1))  # found, single towers only


def test_only_safetensors_json_and_tokenizer_files_are_asked_for(cache, monkeypatch):
    calls = []

    def record(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return cache

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    dualenc.load_pretrained("org/name", revision="v1.0")
    dualenc.Processor.from_pretrained("org/name", revision="v1.0")
    assert [(repo, kw["revision"]) for repo, kw in calls] == [("org/name", "v1.0")] * 2
    repo_files = ["model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
                  "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "open_clip_model.safetensors",
                  "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pt", "flax_model.msgpack",
                  "tf_model.h5", "model.ckpt", "weights/model.npz"]
    kept = list(huggingface_hub.utils.filter_repo_objects(repo_files, allow_patterns=calls[0][1]["allow_patterns"]))
    assert kept == repo_files[:9]


def test_a_missing_id_is_one_line_naming_it_and_offline_mode(cache):
    for load in (dualenc.load_pretrained, dualenc.Processor.from_pretrained, hub.resolve):
        with pytest.raises(FileNotFoundError) as e:
            load("org/missing")
        message = str(e.value)
        assert "\n" not in message and "'org/missing'" in message and "HF_HUB_OFFLINE is set" in message
        assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_local_folder_wins_and_paths_never_reach_the_hub(cache, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("snapshot_download called for a local path")

    monkeypatch.chdir(tmp_path)
    save_model(tmp_path / "org" / "name", seed=5)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    _, local = dualenc.load_pretrained("org/name")
    chex.assert_trees_all_equal(local, dualenc.load_pretrained(tmp_path / "org" / "name")[1])
    for path in ("/nowhere/model", "./org/other", "a/b/c", "~user/x", "org/name/", "a--b", str(tmp_path / "gone")):
        assert hub.resolve(path) == path
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: /nowhere/model"):
        dualenc.load_pretrained("/nowhere/model")


def test_without_huggingface_hub_an_id_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"org/name.*pip install 'dualenc\[hub\]'"):
        hub.resolve("org/name")
    assert hub.resolve("/nowhere/model") == "/nowhere/model"


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_the_command_takes_an_id(cache, tmp_path):
    image = tmp_path / "red.png"
    Image.fromarray(np.full((20, 20, 3), (220, 30, 30), np.uint8)).save(image)
    code, out, err = run("zero-shot", "--model", "org/name", "--labels", "a,b", "--json", image)
    assert code == 0, err
    assert out.strip() and json.loads(out.strip().splitlines()[0])
    code, out, err = run("zero-shot", "--model", "org/missing", "--labels", "a,b", "--json", image)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'org/missing'" in lines[0] and "HF_HUB_OFFLINE" in lines[0], err
    assert not os.path.exists("org")
    args = cli.parser().parse_args(["train", "--model", "org/name", "--data", "pairs.jsonl", "--out", "out"])
    training_checks.check_args(args)
    with pytest.raises(FileNotFoundError, match="'org/missing'"):
        training_checks.check_args(argparse.Namespace(**{**vars(args), "model": "org/missing"}))


@pytest.mark.parametrize("offline", [True, False])
def test_a_ref_pointing_out_of_the_cache_is_refused(cache, tmp_path, monkeypatch, offline):
    """refs/main holding a path instead of a commit, offline or as the fallback when the network fails."""
    import httpx2

    if not offline:
        def down(*args, **kwargs):
            raise httpx2.ConnectError("network is unreachable")

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", down)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", down)
    repo = tmp_path / "hub-cache" / "models--org--name"
    elsewhere = save_model(tmp_path / "private" / "model", seed=3)
    ref = repo / "refs" / "main"
    for content in (os.path.relpath(elsewhere, repo / "snapshots"), "../../..", elsewhere, COMMIT + "/../..",
                    COMMIT + "\n", "x" * (1 << 20)):
        ref.write_text(content)
        with pytest.raises(dualenc.CheckpointError) as e:
            hub.resolve("org/name")
        message = str(e.value)
        assert str(ref) in message and "not a commit" in message and "\n" not in message, message
    ref.write_text("f" * 40)  # a commit whose snapshot is a symlink out of snapshots/
    os.symlink(elsewhere, repo / "snapshots" / ("f" * 40))
    for revision in (None, "f" * 40):
        with pytest.raises(dualenc.CheckpointError, match=f"snapshots/{'f' * 40} .*outside"):
            hub.resolve("org/name", revision=revision)
    ref.write_text(COMMIT)
    assert hub.resolve("org/name") == cache
