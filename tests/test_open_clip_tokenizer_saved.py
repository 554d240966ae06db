"""A folder saved from an open_clip directory whose text_cfg names an hf_tokenizer_name (CLIPA's BERT tokenizer with
strip_sep_token, ids only; an XLM-R one with clean "canonicalize") tokenizes as open_clip's HFTokenizer did: the
same ids, the same arrays, read back by dualenc.Processor; `dualenc zero-shot` runs on the converted CLIPA folder;
bad saved settings are refused naming the file and the key."""

import json
import shutil

import numpy as np
import pytest
import open_clip_towers as towers
from conftest import _transformers
from test_open_clip_options import LABELS, WORDS, clipa_cfg, xlm_dir  # noqa: F401 - xlm_dir: a fixture

import dualenc
from dualenc.errors import ConfigError

# whitespace runs, HTML escapes, punctuation and capitals (canonicalize), an unknown word, texts truncated at the
# context length (where [SEP] would be kept), and the empty text
TEXTS = ["a photo of the cat", "  the RED   house,\tat night!", "a blue_bird " * 8, "zebra &amp; dog", "",
         "A_Photo, of THE city... ", "red " * 20]
XLM_CONTEXT = 12


def open_clip_ids(path, texts=TEXTS):
    import open_clip

    return open_clip.get_tokenizer(f"local-dir:{path}")(texts).numpy()


@pytest.fixture(scope="module")
def clipa(tmp_path_factory):
    """A CLIPA open_clip folder (random weights) with a BertTokenizer on a small WordPiece vocabulary: [PAD] 0,
    [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4; open_clip reading it (open_clip_towers.reference)."""
    root = tmp_path_factory.mktemp("clipa")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "!", "&", *WORDS, "##s", "##ed"]
    _transformers().BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(
        root / "tokenizer")
    cfg = clipa_cfg(len(vocab))
    model = towers.build(cfg, seed=3)
    return towers.reference(model, towers.save(model, cfg, root / "oc", files=root / "tokenizer"))


@pytest.fixture(scope="module")
def clipa_saved(clipa, tmp_path_factory):
    """The CLIPA folder saved by dualenc.save_pretrained with its processor."""
    config, params = dualenc.load_pretrained(clipa["path"])
    path = tmp_path_factory.mktemp("clipa-saved") / "saved"
    dualenc.save_pretrained(path, config, params, processor=dualenc.Processor.from_pretrained(clipa["path"]))
    return path


@pytest.fixture(scope="module")
def xlmr_folders(xlm_dir, tmp_path_factory):
    """An open_clip directory with an XLM-R tokenizer, an HF text tower named (not ids only), clean "canonicalize"
    and a context of 12 (its config and tokenizer files only), and its Processor saved into another folder."""
    folder, vocab = xlm_dir
    root = tmp_path_factory.mktemp("xlmr-oc")
    text = {"hf_tokenizer_name": "xlm-roberta-base", "hf_model_name": "xlm-roberta-base",
            "tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": XLM_CONTEXT}
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2},
           "text_cfg": text}
    shutil.copytree(folder, root / "oc")
    (root / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    dualenc.Processor.from_pretrained(root / "oc").save_pretrained(root / "saved")
    return root / "oc", root / "saved"


def test_saved_clipa_folder_tokenizes_as_open_clip(clipa, clipa_saved):
    """input_ids alone, [SEP] written as 0 (truncated rows too), padded to the context; transformers reads the
    wrapped BertTokenizer, which keeps [SEP], as the module docstring says."""
    ref = open_clip_ids(clipa["path"])
    ours = dualenc.Processor.from_pretrained(clipa_saved)(text=TEXTS)
    assert set(ours) == {"input_ids"}
    np.testing.assert_array_equal(ours["input_ids"], ref)
    assert not (ref == 3).any() and (ref[:, -1] == 0).all() and (ref[2] != 0).sum() == ref.shape[1] - 1
    assert (ref == 1).any() and len(set(ref.ravel())) > 10  # an unknown word among known ones
    np.testing.assert_array_equal(ref[3], open_clip_ids(clipa["path"], ["zebra & dog"])[0])  # HTML unescaped
    saved = json.loads((clipa_saved / "tokenizer_config.json").read_text())
    assert saved["dualenc_open_clip"] == {"clean": "whitespace", "strip_sep_token": True, "context_length": 16}
    hf = _transformers().AutoTokenizer.from_pretrained(clipa_saved)(TEXTS[:1], padding="max_length", truncation=True)
    assert set(hf) == {"input_ids"} and len(hf["input_ids"][0]) == 16 and 3 in hf["input_ids"][0]


def test_saved_xlmr_folder_tokenizes_as_open_clip(xlmr_folders):
    """canonicalize cleaning and the context of 12, the same arrays as the open_clip directory gives."""
    oc, saved = xlmr_folders
    ref = open_clip_ids(oc)
    before = dualenc.Tokenizer.from_pretrained(oc)(TEXTS)
    after = dualenc.Tokenizer.from_pretrained(saved)(TEXTS)
    assert after.keys() == before.keys() and after["input_ids"].shape == (len(TEXTS), XLM_CONTEXT)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    np.testing.assert_array_equal(after["input_ids"], ref)
    np.testing.assert_array_equal(ref[5], open_clip_ids(oc, ["a photo of the city"])[0])  # canonicalized
    assert ref[6, -1] == 2 and (ref[6] != 1).all()  # truncated to the context, ending in </s>


def test_zero_shot_command_on_the_saved_clipa_folder(clipa, clipa_saved, tmp_path, capsys):
    towers.check_zero_shot_command(clipa, clipa_saved, LABELS, tmp_path, capsys)


@pytest.mark.parametrize("value, key", [
    ("canonicalize", "dualenc_open_clip"),
    ({"clean": "shout", "strip_sep_token": True, "context_length": 16}, "dualenc_open_clip.clean"),
    ({"clean": "whitespace", "strip_sep_token": 1, "context_length": 16}, "dualenc_open_clip.strip_sep_token"),
    ({"clean": "whitespace", "strip_sep_token": True, "context_length": 1}, "dualenc_open_clip.context_length"),
    ({"clean": "whitespace", "strip_sep_token": True}, "dualenc_open_clip.context_length"),
    ({"clean": "whitespace", "strip_sep_token": True, "context_length": 16, "lang": "en"}, "dualenc_open_clip.lang"),
])
def test_bad_saved_settings_are_refused(clipa_saved, tmp_path, value, key):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clipa_saved / name, folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "dualenc_open_clip": value}))
    with pytest.raises(ConfigError, match=rf"tokenizer_config.json: field '{key}'"):
        dualenc.Tokenizer.from_pretrained(folder)
