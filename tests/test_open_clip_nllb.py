"""open_clip's NLLB-CLIP towers (text_cfg.hf_model_name an M2M100 / NLLB model, of which open_clip keeps the
encoder): parity with open_clip on a tiny local M2M100 config beside open_clip's ViT (a CLIP pair) and a timm SigLIP
ViT with a logit bias (a SigLIP pair), the NLLB tokenizer and its language, saving, training, the zero-shot command,
refusals."""

import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dualenc
import open_clip_towers as towers
from conftest import _transformers, max_diff

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("open_clip_nllb")

CONTEXT = 16
WORDS = "a photo of the cat dog bird fox quick brown lazy café naïve 東京 写真 hund katze foto ein das".split()
TEXTS = ["a photo of the cat", "  ein   Foto\tder katze  ", "東京 写真", "Ｆｕｌｌ café &amp; naïve",
         "the quick brown fox " * 6, ""]
LABELS = ["cat", "dog", "bird"]


SIGLIP = "vit_test_siglip_nllb"  # a tiny timm SigLIP ViT under a test name: (patch, width, depth, heads, ratio, tanh, size)
SIGLIP_ROW = (8, 32, 1, 2, 2.0, True, 16)


@pytest.fixture(scope="module", autouse=True)
def tiny_siglip_name():
    """The tiny SigLIP ViT's name in timm (create_model) and in dualenc's table, for this module's tests."""
    from dualenc.formats import open_clip_timm

    with towers.tiny_timm_names(open_clip_timm.SIGLIP_VIT, {SIGLIP: SIGLIP_ROW}, siglip_trunk):
        yield


def siglip_trunk(row, **kw):
    from timm.models.vision_transformer import VisionTransformer

    patch, width, depth, heads, ratio, _, size = row
    return VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             mlp_ratio=ratio, class_token=False, act_layer="gelu_tanh", **kw)


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    """(tokenizer folder, model folder): an NllbTokenizer over a BPE trained here (fairseq's <s> 0, <pad> 1, </s> 2,
    <unk> 3, the language codes after the pieces), and a tiny M2M100 config with NLLB's options (relu, scaled
    embeddings)."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import generate_merges

    tf = _transformers()
    root = tmp_path_factory.mktemp("nllb")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(1000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(root / "sp"), vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((root / "sp.model").read_bytes())
    vocab = {p: i for i, p in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + [p.piece for p in proto.pieces
                                                                            if p.type == 1])}
    tokenizer = tf.NllbTokenizer(vocab=vocab, merges=generate_merges(vocab),
                                 _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)
    tokenizer.save_pretrained(root / "tokenizer")
    tf.M2M100Config(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=1,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                    max_position_embeddings=40, encoder_layerdrop=0.0,
                    decoder_layerdrop=0.0).save_pretrained(root / "m2m")
    return root / "tokenizer", root / "m2m"


def model_cfg(model, pair="clip", **text):
    siglip = pair == "siglip"
    vision = ({"image_size": SIGLIP_ROW[-1], "timm_model_name": SIGLIP, "timm_model_pretrained": False,
               "timm_pool": "map", "timm_proj": "none"} if siglip else
              {"image_size": 30, "patch_size": 10, "width": 32, "layers": 2, "head_width": 8})
    return {"embed_dim": SIGLIP_ROW[1] if siglip else 16, "custom_text": True,
            **({"init_logit_bias": -10} if pair != "clip" else {}),
            "vision_cfg": vision,
            "text_cfg": {"hf_model_name": str(model), "hf_tokenizer_name": str(model), "hf_proj_type": "linear",
                         "hf_pooler_type": "cls_pooler", "hf_model_pretrained": False, "context_length": CONTEXT,
                         **text}}


@pytest.fixture(scope="module")
def refs(nllb, tmp_path_factory):
    """{"clip": open_clip's ViT + the NLLB text tower, "biased": the same with a logit bias, "siglip": a tiny timm
    SigLIP ViT + the NLLB text tower with a logit bias}: open_clip reading
    each saved folder (towers.reference), random weights."""
    tokenizer, model = nllb
    out = {}
    for i, pair in enumerate(("clip", "biased", "siglip")):
        cfg = model_cfg(model, pair)
        built = towers.build(cfg, seed=i)
        out[pair] = towers.reference(built, towers.save(built, cfg, tmp_path_factory.mktemp(pair), files=tokenizer))
    return out


def test_nllb_pairs_match_open_clip(refs):
    """Both pairs: raw text and image features, logits (+ the SigLIP pair's bias) and the encoder's last hidden state
    as open_clip's; the SigLIP pair reads as a sigmoid-rule dual encoder. bfloat16 is reported."""
    for pair, ref in refs.items():
        model = ref["model"]
        ids = ref["tokenizer"](TEXTS).numpy()
        want = towers.open_clip_outputs(model, ref["pixels"], ids)
        config, params = dualenc.load_pretrained(ref["path"])
        text = config.text
        assert (text.text_model_type, text.pooler_type, text.head_hidden_size) == \
            ("m2m_100", "cls_last_hidden_state_pooler", None)
        assert config.model_type == ("vision-text-dual-encoder" if pair == "clip" else
                                     "vision-text-dual-encoder-siglip")
        assert config.kind.logit_rule == ("exp_scale" if pair == "clip" else "sigmoid_bias")
        out = dualenc.apply(params, config, input_ids=ids, pixel_values=ref["pixels"])
        assert max_diff(out.logits_per_image, want["logits"]) < 1e-5, pair
        assert max_diff(dualenc.get_text_features(params, config, ids), want["text"]) < 1e-5, pair
        assert max_diff(dualenc.get_image_features(params, config, ref["pixels"]), want["image"]) < 1e-5, pair
        with torch.no_grad():
            t_ids = torch.tensor(ids)
            hidden = model.text.transformer(input_ids=t_ids, attention_mask=(t_ids != 1).long()).last_hidden_state
        assert max_diff(out.text_outputs.last_hidden_state, hidden) < 1e-5, pair
        bf16 = dualenc.get_text_features(params, config, ids, dtype=jnp.bfloat16).astype(jnp.float32)
        print(f"{pair}: text features max abs diff f32 "
              f"{max_diff(dualenc.get_text_features(params, config, ids), want['text']):.3g}, bf16 "
              f"{max_diff(bf16, want['text']):.3g}; logits f32 {max_diff(out.logits_per_image, want['logits']):.3g}")


def test_tokenizer_ids_are_open_clips(refs, tmp_path):
    """open_clip's HFTokenizer on the folder's NllbTokenizer: tokenizer_config's src_lang code first (eng_Latn by
    default; last, after </s>, with legacy_behaviour), padded with <pad>. tokenizer_kwargs language changes nothing:
    the tokenizer switches back to its src_lang at every call (transformers), undoing HFTokenizer.set_language."""
    import open_clip

    ref = refs["clip"]
    want = ref["tokenizer"](TEXTS).numpy()
    ours = dualenc.Tokenizer.from_pretrained(ref["path"])(TEXTS)
    np.testing.assert_array_equal(ours["input_ids"], want)
    np.testing.assert_array_equal(ours["attention_mask"], want != 1)
    assert (want == 3).any() and (want[:, -1] == 2).any()  # unknown words, a truncated row ending in </s>
    eng = want[0, 0]

    for name, kwargs, config in (("language", {"language": "fra_Latn"}, {}),
                                 ("src_lang", {}, {"src_lang": "fra_Latn", "legacy_behaviour": True})):
        folder = tmp_path / name
        shutil.copytree(ref["path"], folder)
        data = json.loads((folder / "open_clip_config.json").read_text())
        data["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = kwargs
        (folder / "open_clip_config.json").write_text(json.dumps(data))
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tok, **config}))
        want = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS).numpy()
        assert (want[:, 0] == eng).all() == (name == "language"), name
        np.testing.assert_array_equal(dualenc.Tokenizer.from_pretrained(folder)(TEXTS)["input_ids"], want)


def test_save_pretrained_round_trip(refs, tmp_path):
    """Saved as dualenc's layout (no transformers class computes an M2M100 encoder tower): text_config
    "open_clip_hf_text" with text_model_type "m2m_100"; the SigLIP pair's model_type keeps the sigmoid rule and
    its logit bias. Read back exactly (every param, the bias included)."""
    tf = _transformers()
    for pair in ("clip", "biased"):  # the SigLIP pair's image tower is dualenc.towers.siglip's, saved as these
        config, params = dualenc.load_pretrained(refs[pair]["path"])
        dualenc.save_pretrained(tmp_path / pair, config, params)
        saved = json.loads((tmp_path / pair / "config.json").read_text())
        assert saved["model_type"] == config.model_type and saved["architectures"] == ["VisionTextDualEncoderModel"]
        assert (saved["text_config"]["model_type"], saved["text_config"]["text_model_type"]) == \
            ("open_clip_hf_text", "m2m_100")
        again, loaded = dualenc.load_pretrained(tmp_path / pair)
        assert again == config
        flat, flat_again = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (params, loaded))
        assert [k for k, _ in flat] == [k for k, _ in flat_again]
        for (key, a), (_, b) in zip(flat, flat_again):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))
        with pytest.raises(ValueError):  # no transformers class reads it
            tf.AutoConfig.from_pretrained(tmp_path / pair)


def test_train_step_moves_the_m2m100_encoder(refs):
    """One train step on the CLIP pair (image tower locked): loss finite, the encoder's layers, its final LayerNorm
    and the text projection move."""
    from dualenc import train

    ref = refs["clip"]
    config, params = dualenc.load_pretrained(ref["path"])
    ids = ref["tokenizer"](TEXTS[:4]).numpy()
    optimizer = train.default_optimizer(1e-2, total_steps=2, warmup_steps=0)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(ids != 1, jnp.int32),
                 pixel_values=jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 30, 30)), jnp.float32))
    state, metrics = train.make_train_step(config, optimizer, locked=("vision",), donate=False)(
        train.init_state(params, optimizer, locked=("vision",), seed=0), batch)
    assert np.isfinite(float(metrics["loss"]))
    text = state.trainable["text"]
    for path in (("encoder", 0, "attention", "query", "kernel"), ("final_norm", "scale"), ("embeddings", "word")):
        new, old = text, params["text"]
        for key in path:
            new, old = new[key], old[key]
        assert not np.allclose(new, old), path
    assert not np.allclose(state.trainable["text_projection"]["kernel"], params["text_projection"]["kernel"])


def test_zero_shot_command_on_a_saved_pair_with_a_logit_bias(refs, tmp_path, capsys):
    """`dualenc zero-shot` on the pair with a logit bias saved with its processor: open_clip's sigmoid
    probabilities."""
    ref = refs["biased"]
    config, params = dualenc.load_pretrained(ref["path"])
    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(ref["path"]))
    towers.check_zero_shot_command(ref, folder, LABELS, tmp_path, capsys)


def test_the_nllb_hub_names_read_offline():
    """open_clip's shipped nllb-clip-* configs name facebook/nllb-200-distilled-600M / -1.3B: read without the
    hub, the SigLIP ones as the sigmoid-rule dual encoder."""
    import open_clip
    from dualenc.formats import open_clip as reader

    root = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    for name, layers, ffn, embed in (("nllb-clip-base", 12, 4096, 512), ("nllb-clip-large", 24, 8192, 1024),
                                     ("nllb-clip-base-siglip", 12, 4096, 768),
                                     ("nllb-clip-large-siglip", 24, 8192, 1152)):
        with open(os.path.join(root, name + ".json")) as f:
            config = reader.config_from_dict({"model_cfg": json.load(f)})
        text = config.text
        assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size) == \
            (1024, layers, ffn, 256206)
        assert text.scale_embedding and text.hidden_act == "relu" and config.projection_dim == embed
        assert config.kind.logit_rule == ("sigmoid_bias" if name.endswith("siglip") else "exp_scale")


@pytest.mark.parametrize("change,field", [
    ({"encoder_layerdrop": 0.05}, "encoder_layerdrop"),
    ({"activation_dropout": 0.1}, "activation_dropout"),
    ({"text_cfg": {"hf_pooler_type": "max_pooler"}}, "hf_pooler_type"),
    ({"legacy_behaviour": "yes"}, "legacy_behaviour"),
])
def test_unimplemented_nllb_options_are_refused(change, field, refs, tmp_path):
    folder = tmp_path / "oc"
    shutil.copytree(refs["clip"]["path"], folder)
    data = json.loads((folder / "open_clip_config.json").read_text())
    text = data["model_cfg"]["text_cfg"]
    if "text_cfg" in change:
        text.update(change["text_cfg"])
    elif "legacy_behaviour" in change:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tok, **change}))
    else:
        m2m = tmp_path / "m2m"
        shutil.copytree(text["hf_model_name"], m2m)
        raw = json.loads((m2m / "config.json").read_text())
        (m2m / "config.json").write_text(json.dumps({**raw, **change}))
        text["hf_model_name"] = str(m2m)
    (folder / "open_clip_config.json").write_text(json.dumps(data))
    with pytest.raises(dualenc.ConfigError, match=field):
        if "legacy_behaviour" in change:
            dualenc.Tokenizer.from_pretrained(folder)
        else:
            dualenc.load_pretrained(folder)
