"""Untrusted files: nothing is unpickled, evaluated or imported; data paths stay inside the data folder."""

import ast
import builtins
import io
import json
import os
import pathlib
import pickle
import shutil

import jax
import pytest
from conftest import TINY

import dualenc
from dualenc import data

PACKAGE = pathlib.Path(dualenc.__file__).parent
CONFIG = dualenc.DualEncoderConfig(vision=dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                   text=dualenc.BertConfig(**TINY, vocab_size=40, max_position_embeddings=16),
                                   projection_dim=8)


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def opened(monkeypatch):
    """Records every path the code under test opens."""
    paths = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def spy(real):
        def wrapper(file, *args, **kwargs):
            paths.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    return paths


def test_a_malicious_pytorch_model_bin_is_never_opened(tmp_path, opened):
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    dualenc.save_pretrained(model_dir, CONFIG, dualenc.init(jax.random.key(0), CONFIG))
    for name in ("pytorch_model.bin", "flax_model.msgpack", "training_args.bin"):
        (model_dir / name).write_bytes(pickle.dumps(Payload(marker)))
    only_pickles = tmp_path / "only-pickles"
    shutil.copytree(model_dir, only_pickles)
    os.remove(only_pickles / "model.safetensors")
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(CONFIG.vision.to_dict()))
    (tower / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    opened.clear()
    config, _ = dualenc.load_pretrained(model_dir)
    assert config == CONFIG
    with pytest.raises(dualenc.CheckpointError, match="never unpickles"):
        dualenc.load_pretrained(only_pickles)
    with pytest.raises(dualenc.CheckpointError, match="never unpickles"):
        dualenc.from_vision_text_pretrained(tower, tower, key=jax.random.key(0))
    assert any(str(p).endswith("model.safetensors") for p in opened)  # the spy does see the files read
    assert not any(str(p).endswith((".bin", ".msgpack")) for p in opened)
    assert not marker.exists()
    # the sanity check of the test itself: unpickling the file does run the payload
    pickle.loads((tower / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_config_code_references_are_ignored(tmp_path):
    d = CONFIG.to_dict()
    d.update(auto_map={"AutoModel": "evil.Model"}, trust_remote_code=True)
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    assert dualenc.load_config(tmp_path) == CONFIG
    assert not (tmp_path / "pwned").exists()


FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "importlib", "joblib", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "__import__", "compile"}


def test_no_code_path_unpickles_evaluates_or_imports_by_name():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 30 and any(s.parent.name == "towers" for s in sources)  # the subpackages too
    for source in sources:
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, (source, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, (source, node.lineno)
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                builtin = isinstance(func, ast.Name) or (isinstance(func, ast.Attribute) and isinstance(
                    func.value, ast.Name) and func.value.id == "builtins")
                assert not (builtin and name in FORBIDDEN_CALLS), (source, node.lineno, name)
                if name == "load" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    assert func.value.id not in ("torch", "pickle"), (source, node.lineno)
                    if func.value.id in ("np", "numpy"):  # only with pickles explicitly refused (big_vision .npz)
                        assert any(kw.arg == "allow_pickle" and getattr(kw.value, "value", None) is False
                                   for kw in node.keywords), (source, node.lineno)
                for kw in node.keywords:
                    assert not (kw.arg == "allow_pickle" and getattr(kw.value, "value", False)), (source, node.lineno)


def test_caption_paths_cannot_escape_the_data_folder(tmp_path):
    from PIL import Image

    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    (folder / "link.png").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "far.png")
    (folder / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    rows = ["ok.png,fine", "../secret.png,up", f"{outside},absolute", "link.png,symlink out", "./../data/ok.png,in",
            "images/far.png,through a symlinked folder", "images/../../secret.png,climbs out"]
    (folder / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    # The caption file cannot climb out; symlinks placed inside the folder (by whoever owns it) are followed.
    dataset = data.read_pairs(folder / "pairs.csv")
    assert dataset.captions == ["fine", "symlink out", "in", "through a symlinked folder"]
    assert dataset.skipped["path outside the data folder"] == 3
    (tmp_path / "link-to-data").symlink_to(folder, target_is_directory=True)
    via_link = data.read_pairs(tmp_path / "link-to-data" / "pairs.csv")
    assert via_link.captions == dataset.captions  # the data folder reached through a symlink
    allowed = data.read_pairs(folder / "pairs.csv", allow_outside=True)
    assert len(allowed.captions) == 7
