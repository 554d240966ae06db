"""open_clip's native-tower options beyond CLIP's: CLIPA (vision no_ln_pre, pool_type "avg", final_ln_after_pool;
text no_causal_mask, pool_type "last", a BERT tokenizer with strip_sep_token), MetaCLIP 2 "worldwide" (text
pool_type "eos" with eos_id 2, an XLM-V tokenizer) and SigLIP i18n's text proj_type "none": parity with open_clip,
tokenizer ids, what save_pretrained writes (and transformers reads), training, the CLI, and the refusals."""

import json
import random

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import open_clip_towers as towers
from conftest import _transformers, max_diff

import dualenc
from dualenc.formats import open_clip_timm

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("open_clip_options")

EMBED, WIDTH, LENGTH = 16, 32, 16
VISION = {"image_size": 32, "patch_size": 8, "width": WIDTH, "layers": 2, "head_width": 16}
WORDS = "a photo of the cat dog bird red green blue house car tree river city night day people".split()
TEXTS = ["a photo of the cat", "  the RED   house, at night!", "a blue bird " * 8, "zebra", ""]
LABELS = ["a red car", "a green tree", "a blue river"]


def clipa_cfg(vocab, **vision):
    return {"embed_dim": EMBED,
            "vision_cfg": {**VISION, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True, **vision},
            "text_cfg": {"context_length": LENGTH, "vocab_size": vocab, "hf_tokenizer_name": "bert-base-uncased",
                         "tokenizer_kwargs": {"strip_sep_token": True}, "width": WIDTH, "heads": 2, "layers": 2,
                         "pool_type": "last", "no_causal_mask": True}}


def worldwide_cfg(vocab):
    return {"embed_dim": EMBED, "quick_gelu": True, "vision_cfg": dict(VISION),
            "text_cfg": {"hf_tokenizer_name": "facebook/xlm-v-base", "pool_type": "eos", "eos_id": 2,
                         "context_length": LENGTH, "vocab_size": vocab, "width": WIDTH, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BertTokenizer (uncased) on a small WordPiece vocabulary: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4."""
    tf = _transformers()
    path = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "!", *WORDS, "##s", "##ed"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # vocab= (transformers 5 ignores vocab_file= here: every word would be [UNK])
    tokenizer = tf.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids(WORDS[0]) == vocab.index(WORDS[0])
    tokenizer.save_pretrained(path / "tokenizer")
    return path / "tokenizer", len(vocab)


@pytest.fixture(scope="module")
def xlm_dir(tmp_path_factory):
    """An XLMRobertaTokenizer (xlm-v-base's class) on a trained SentencePiece unigram model: <s> 0, <pad> 1,
    </s> 2, <unk> 3, <mask> last."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    tf = _transformers()
    root = tmp_path_factory.mktemp("xlmv")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(root / "sp"), vocab_size=40,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((root / "sp.model").read_bytes())
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in proto.pieces if p.type == 1] + [("<mask>", 0.0)]
    tokenizer = tf.XLMRobertaTokenizer(vocab=vocab,
                                       _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "tokenizer", len(tokenizer)


@pytest.fixture(scope="module")
def clipa(tmp_path_factory, bert_dir):
    folder, vocab = bert_dir
    cfg = clipa_cfg(vocab)
    model = towers.build(cfg)
    return towers.reference(model, towers.save(model, cfg, tmp_path_factory.mktemp("clipa") / "oc", files=folder))


@pytest.fixture(scope="module")
def worldwide(tmp_path_factory, xlm_dir):
    folder, vocab = xlm_dir
    cfg = worldwide_cfg(vocab)
    model = towers.build(cfg, seed=1)
    return towers.reference(model, towers.save(model, cfg, tmp_path_factory.mktemp("ww") / "oc", files=folder))


def check_parity(ref, config, params, ids):
    """Image and text embeddings and logits as open_clip's (float32); bfloat16 printed."""
    want = towers.open_clip_outputs(ref["model"], ref["pixels"], ids)
    pixels = ref["pixels"]
    out = dualenc.apply(params, config, input_ids=ids, pixel_values=pixels)
    for ours, theirs in ((out.image_embeds, want["image"]), (out.text_embeds, want["text"])):
        assert max_diff(ours, theirs / theirs.norm(dim=-1, keepdim=True)) < 1e-5
    assert max_diff(out.logits_per_image, want["logits"]) < 1e-5
    bf16 = dualenc.apply(params, config, input_ids=ids, pixel_values=pixels, dtype=jnp.bfloat16)
    print(f"{config.model_type} {type(config.vision).__name__}/{type(config.text).__name__}: bfloat16 logits max abs "
          f"diff {max_diff(bf16.logits_per_image.astype(jnp.float32), want['logits']):.3g}")


def test_clipa_matches_open_clip(clipa):
    config, params = dualenc.load_pretrained(clipa["path"])
    assert config.model_type == "vision-text-dual-encoder"
    assert type(config.vision) is dualenc.config.OpenCLIPVisionConfig and not config.vision.pre_norm
    assert config.vision.norm_after_pool and "pre_norm" not in params["vision"]
    assert type(config.text) is dualenc.config.OpenCLIPTextConfig and config.text_padding == "max_length"
    ids = clipa["tokenizer"](TEXTS).numpy()
    assert (ids[2, :-1] != 0).all() and (ids[0] == 0).sum() > 1  # a row filling the context, and padding
    check_parity(clipa, config, params, ids)


def test_average_pool_with_the_norm_before_the_mean(tmp_path, bert_dir):
    """final_ln_after_pool false: post_layernorm on every patch token, then the mean."""
    cfg = clipa_cfg(bert_dir[1], final_ln_after_pool=False)
    model = towers.build(cfg, seed=2)
    config, params = dualenc.load_pretrained(towers.save(model, cfg, tmp_path))
    assert not config.vision.norm_after_pool
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = towers.open_clip_outputs(model, pixels, np.ones((1, LENGTH), np.int64))["image"]
    assert max_diff(dualenc.get_image_features(params, config, pixels), want) < 1e-5


def test_clipa_tokenizer_strips_the_separator(clipa):
    """open_clip's HFTokenizer with strip_sep_token: BERT's ids with 0 for [SEP], padded to the context; input_ids
    alone (open_clip's text transformer reads no mask and no token types)."""
    ref = clipa["tokenizer"](TEXTS).numpy()
    ours = dualenc.Tokenizer.from_pretrained(clipa["path"])(TEXTS)
    assert set(ours) == {"input_ids"}
    np.testing.assert_array_equal(ours["input_ids"], ref)
    assert not (ref == 3).any() and (ref[:, 0] == 2).all() and (ref == 1).any()  # no [SEP]; [CLS]; an unknown word


def test_clipa_saves_dualencs_own_towers(clipa, tmp_path):
    """save_pretrained writes a VisionTextDualEncoder of dualenc's own towers, which transformers refuses rather
    than reading it as something else; dualenc reads it back the same."""
    config, params = dualenc.load_pretrained(clipa["path"])
    dualenc.save_pretrained(tmp_path / "saved", config, params)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["vision_config"]["model_type"], saved["text_config"]["model_type"]) == (
        "open_clip_vision", "open_clip_text")
    again, loaded = dualenc.load_pretrained(tmp_path / "saved")
    assert again == config
    ids = clipa["tokenizer"](TEXTS[:3]).numpy()
    want = towers.open_clip_outputs(clipa["model"], clipa["pixels"], ids)["logits"]
    assert max_diff(dualenc.apply(loaded, again, input_ids=ids, pixel_values=clipa["pixels"]).logits_per_image,
                    want) < 1e-5
    with pytest.raises(ValueError, match="open_clip_"):
        _transformers().AutoConfig.from_pretrained(tmp_path / "saved")


def test_clipa_train_step_and_zero_shot(clipa, tmp_path, capsys):
    """One train step moves both towers; `dualenc zero-shot` on the open_clip folder gives open_clip's
    probabilities (its tokenizer, its transform)."""
    from dualenc import train

    config, params = dualenc.load_pretrained(clipa["path"])
    ids = clipa["tokenizer"](TEXTS[:3]).numpy()
    optimizer = train.default_optimizer(1e-2, total_steps=2, warmup_steps=0)
    batch = dict(input_ids=jnp.asarray(ids, jnp.int32), pixel_values=jnp.asarray(clipa["pixels"]))
    state, metrics = train.make_train_step(config, optimizer, donate=False)(
        train.init_state(params, optimizer, seed=0), batch)
    assert np.isfinite(float(metrics["loss"]))
    for side, path in (("vision", ("post_norm", "scale")), ("text", ("final_norm", "scale"))):
        new, old = state.trainable[side], params[side]
        for key in path:
            new, old = new[key], old[key]
        assert not np.allclose(new, old), side
    towers.check_zero_shot_command(clipa, clipa["path"], LABELS, tmp_path, capsys)


def test_worldwide_matches_open_clip_and_saves_a_metaclip_2(worldwide, tmp_path):
    """eos_id 2 pools at the first </s> (not the argmax of the ids): a MetaClip2Model, which transformers loads
    with the same numbers; the tokenizer is open_clip's HFTokenizer on the XLM-R files."""
    tf = _transformers()
    config, params = dualenc.load_pretrained(worldwide["path"])
    assert config.model_type == "metaclip_2" and config.text.eos_token_id == 2
    ids = worldwide["tokenizer"](TEXTS).numpy()
    assert (ids.argmax(-1) != (ids == 2).argmax(-1)).any()  # the argmax rule would pool elsewhere
    check_parity(worldwide, config, params, ids)
    ours = dualenc.Tokenizer.from_pretrained(worldwide["path"])(TEXTS)
    np.testing.assert_array_equal(ours["input_ids"], ids)

    dualenc.save_pretrained(tmp_path / "saved", config, params,
                            processor=dualenc.Processor.from_pretrained(worldwide["path"]))
    hf, info = tf.MetaClip2Model.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(worldwide["pixels"])).logits_per_image
    want = towers.open_clip_outputs(worldwide["model"], worldwide["pixels"], ids)["logits"]
    assert max_diff(theirs.numpy(), want) < 1e-5
    again, loaded = dualenc.load_pretrained(tmp_path / "saved")
    assert again == config
    assert max_diff(dualenc.apply(loaded, again, input_ids=ids, pixel_values=worldwide["pixels"]).logits_per_image,
                    want) < 1e-5


def test_siglip_text_without_a_projection(tmp_path, monkeypatch):
    """SigLIP i18n's text proj_type "none" beside a timm SigLIP ViT: a SiglipModel whose text head is the identity,
    the same numbers as open_clip's; saved as transformers' SiglipModel."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    real = timm.create_model

    def create_model(name, pretrained=False, **kw):
        if name != "vit_test_i18n":
            return real(name, pretrained=pretrained, **kw)
        trunk = VisionTransformer(img_size=32, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=2, mlp_ratio=2.0,
                                  class_token=False, act_layer="gelu_tanh", **kw)
        trunk.default_cfg = {}
        return trunk

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setitem(open_clip_timm.SIGLIP_VIT, "vit_test_i18n", (16, WIDTH, 1, 2, 2.0, True, 32))
    cfg = {"embed_dim": WIDTH, "init_logit_bias": -10, "custom_text": True,
           "vision_cfg": {"image_size": 32, "timm_model_name": "vit_test_i18n", "timm_model_pretrained": False,
                          "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": {"context_length": LENGTH, "vocab_size": 50, "tokenizer_kwargs": {"clean": "canonicalize"},
                        "hf_tokenizer_name": "timm/ViT-B-16-SigLIP-i18n-256", "width": WIDTH, "heads": 2, "layers": 2,
                        "mlp_ratio": 2.0, "no_causal_mask": True, "pool_type": "last", "proj_type": "none",
                        "norm_kwargs": {"eps": 1e-6}}}
    model = towers.build(cfg, scale=lambda name, p: p.ndim == 1 and "norm" in name and name.endswith("weight"))
    assert model.text.text_projection is None
    config, params = dualenc.load_pretrained(towers.save(model, cfg, tmp_path / "oc"))
    assert config.model_type == "siglip" and config.text.projection_size == WIDTH
    np.testing.assert_array_equal(params["text"]["head"]["kernel"], np.eye(WIDTH))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.random.default_rng(1).integers(0, 50, (3, LENGTH))
    want = towers.open_clip_outputs(model, pixels, ids)
    assert max_diff(dualenc.get_text_features(params, config, ids), want["text"]) < 1e-5
    assert max_diff(dualenc.apply(params, config, input_ids=ids, pixel_values=pixels).logits_per_image,
                    want["logits"]) < 1e-5
    dualenc.save_pretrained(tmp_path / "saved", config, params)
    hf = _transformers().SiglipModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        theirs = hf.get_text_features(input_ids=torch.tensor(ids))
    theirs = getattr(theirs, "pooler_output", theirs)
    assert max_diff(theirs.numpy(), want["text"]) < 1e-5


@pytest.mark.parametrize("vision,text,field", [
    (dict(no_ln_pre=True), {}, "no_ln_pre"),  # without average pooling
    (dict(pool_type="none"), {}, "pool_type"),
    ({}, dict(pool_type="last"), "no_causal_mask"),  # pooled at the last position with a causal mask
    ({}, dict(no_causal_mask=True, pool_type="eos"), "no_causal_mask"),
    ({}, dict(pool_type="first"), "pool_type"),
    ({}, dict(proj_type="none"), "proj_type"),
    ({}, dict(embed_cls=True), "embed_cls"),
])
def test_unimplemented_options_are_refused(vision, text, field):
    from dualenc.formats import open_clip as reader

    cfg = {"embed_dim": EMBED, "vision_cfg": {**VISION, **vision},
           "text_cfg": {"context_length": LENGTH, "vocab_size": 40, "width": WIDTH, "heads": 2, "layers": 1, **text}}
    with pytest.raises(dualenc.ConfigError, match=f"'{field}'"):
        reader.config_from_dict({"model_cfg": cfg})


def test_open_clips_own_configs_read():
    """The shipped CLIPA, worldwide and SigLIP i18n configs read, with their sizes."""
    import open_clip
    from open_clip.factory import get_model_config

    from dualenc.formats import open_clip as reader

    del open_clip
    for name, kind, width, text_width in (("ViT-bigG-14-CLIPA-336", "vision-text-dual-encoder", 1664, 1280),
                                          ("ViT-H-14-worldwide-quickgelu", "metaclip_2", 1280, 1024),
                                          ("ViT-bigG-14-worldwide-378", "metaclip_2", 1664, 1280),
                                          ("ViT-SO400M-16-SigLIP-i18n-256", "siglip", 1152, 1152)):
        config = reader.config_from_dict({"model_cfg": get_model_config(name)})
        assert config.model_type == kind, name
        assert (config.vision.hidden_size, config.text.hidden_size) == (width, text_width), name
