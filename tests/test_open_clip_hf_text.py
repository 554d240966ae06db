"""open_clip's HF text towers (text_cfg.hf_model_name: the multilingual XLM-RoBERTa CLIPs): parity with open_clip on
a local tiny XLM-RoBERTa folder, its poolers and projection heads, the tokenizer, saving, training, refusals."""

import json
import random

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dualenc
from conftest import _transformers, max_diff, randomize

# (hf_pooler_type, hf_proj_type): the LAION XLM-RoBERTa CLIPs' (mean, open_clip's default mlp head), and the rest.
# every pooler and both heads, in three models: the LAION models' own (mean, mlp) first, (cls, linear) the one a
# transformers VisionTextDualEncoderModel holds
VARIANTS = [("mean_pooler", "mlp"), ("cls_pooler", "linear"), ("cls_last_hidden_state_pooler", "mlp")]
CONTEXT = 16
WORDS = "a photo of the cat dog bird fox quick brown lazy café naïve 東京 写真 hund katze foto ein das".split()
TEXTS = ["a photo of the cat", "  ein   Foto\tder katze  ", "東京 写真", "Ｆｕｌｌ café &amp; naïve",
         "the quick brown fox " * 6, ""]


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    """A local folder holding a tiny XLM-RoBERTa config and an XLMRobertaTokenizer on a trained SentencePiece
    unigram model (fairseq's ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last), as the hub's xlm-roberta-base."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    tf = _transformers()
    root = tmp_path_factory.mktemp("xlmr")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(1000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(root / "sp"), vocab_size=50,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((root / "sp.model").read_bytes())
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in proto.pieces if p.type == 1] + [("<mask>", 0.0)]
    tokenizer = tf.XLMRobertaTokenizer(vocab=vocab,
                                       _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)
    folder = root / "xlm-roberta-tiny"
    tokenizer.save_pretrained(folder)
    tf.XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, type_vocab_size=1,
                        layer_norm_eps=1e-5).save_pretrained(folder)
    return folder, tokenizer


def model_cfg(folder, pooler="mean_pooler", proj="mlp", **text):
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 30, "patch_size": 10, "width": 32, "layers": 2, "head_width": 8},
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_pooler_type": pooler,
                         "hf_proj_type": proj, "hf_model_pretrained": False, "context_length": CONTEXT, **text}}


def write_open_clip(path, cfg, model=None, tokenizer=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    if model is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(xlmr, tmp_path_factory):
    """{variant: (open_clip model, its directory)}: open_clip.create_model from each local-dir, random weights."""
    import open_clip

    folder, tokenizer = xlmr
    out = {}
    for i, (pooler, proj) in enumerate(VARIANTS):
        path = write_open_clip(tmp_path_factory.mktemp("oc") / f"{pooler}-{proj}", model_cfg(folder, pooler, proj))
        model = open_clip.create_model(f"local-dir:{path}", pretrained_text=False).eval()
        for tower in (model.text.transformer,):
            tower.config._attn_implementation = "eager"
        randomize(model, seed=i)
        with torch.no_grad():
            model.logit_scale.fill_(2.3)
        out[(pooler, proj)] = (model, str(write_open_clip(path, model_cfg(folder, pooler, proj), model, tokenizer)))
    return out


@pytest.fixture(scope="module")
def ids(references):
    import open_clip

    path = references[VARIANTS[0]][1]
    return open_clip.get_tokenizer(f"local-dir:{path}")(TEXTS[:4]).numpy()


def images(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 30, 30)).astype(np.float32)


def test_hf_text_towers_match_open_clip(references, ids):
    """Each pooler and head: logits, embeddings and RobertaModel's last hidden state as open_clip's; the LAION
    models' own (mean_pooler, mlp) also the unnormalised features, image side included, and bfloat16 (reported)."""
    pixels = images()
    mask = (ids != 1).astype(np.int64)  # open_clip's own: the tokens that are not <pad>
    t_ids, t_pix = torch.tensor(ids), torch.tensor(pixels)
    for variant in VARIANTS:
        model, path = references[variant]
        config, params = dualenc.load_pretrained(path)
        pooler, proj = variant
        assert config.model_type == "vision-text-dual-encoder"
        assert isinstance(config.vision, dualenc.CLIPVisionConfig)  # open_clip's native ViT
        if variant == ("cls_pooler", "linear"):
            assert type(config.text) is dualenc.RobertaConfig and config.text.model_type == "xlm-roberta"
        else:
            assert config.text.pooler_type == pooler and config.text.text_model_type == "xlm-roberta"
            assert config.text.head_hidden_size == ((32 + 16) // 2 if proj == "mlp" else None)
            assert ("pooler" in params["text"]) == (pooler == "cls_pooler")
        with torch.no_grad():
            text_ref = model.encode_text(t_ids, normalize=True)
            logits_ref = model.get_logits(t_pix, t_ids)[0]
            hidden_ref = model.text.transformer(input_ids=t_ids, attention_mask=torch.tensor(mask)).last_hidden_state
        out = dualenc.apply(params, config, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert max_diff(out.logits_per_image, logits_ref) < 1e-5, variant
        assert max_diff(out.text_embeds, text_ref) < 1e-5, variant
        assert max_diff(out.text_outputs.last_hidden_state, hidden_ref) < 1e-5, variant

    model, path = references[VARIANTS[0]]
    config, params = dualenc.load_pretrained(path)
    with torch.no_grad():
        text_ref, image_ref = model.encode_text(t_ids), model.encode_image(t_pix)
    assert max_diff(dualenc.get_image_features(params, config, pixels), image_ref) < 1e-5
    assert max_diff(dualenc.get_text_features(params, config, ids, mask), text_ref) < 1e-5
    # without an attention_mask the tower derives open_clip's from the padding id
    assert max_diff(dualenc.get_text_features(params, config, ids), text_ref) < 1e-5
    bf16 = dualenc.get_text_features(params, config, ids, mask, dtype=jnp.bfloat16)
    print(f"bfloat16 text features max abs diff {max_diff(bf16.astype(jnp.float32), text_ref):.3g}")


def test_cls_pooler_with_a_linear_head_saves_a_transformers_vision_text_dual_encoder(references, ids, tmp_path):
    """open_clip -> dualenc -> transformers VisionTextDualEncoderModel (CLIPVisionModel + XLMRobertaModel with its
    pooler), the same logits; the other poolers save dualenc's own text_config ("open_clip_hf_text")."""
    tf = _transformers()
    model, path = references[("cls_pooler", "linear")]
    config, params = dualenc.load_pretrained(path)
    dualenc.save_pretrained(tmp_path / "vtde", config, params)
    hf, info = tf.VisionTextDualEncoderModel.from_pretrained(tmp_path / "vtde", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    pixels = images()
    with torch.no_grad():
        ref = model.get_logits(torch.tensor(pixels), torch.tensor(ids))[0]
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 1).long(),
                    pixel_values=torch.tensor(pixels)).logits_per_image
    assert max_diff(theirs.numpy(), ref) < 1e-5

    model, path = references[("mean_pooler", "mlp")]
    config, params = dualenc.load_pretrained(path)
    dualenc.save_pretrained(tmp_path / "own", config, params)
    saved = json.loads((tmp_path / "own" / "config.json").read_text())
    assert saved["model_type"] == "vision-text-dual-encoder"
    assert saved["text_config"]["model_type"] == "open_clip_hf_text"
    assert saved["text_config"]["pooler_type"] == "mean_pooler" and saved["text_config"]["head_hidden_size"] == 24
    again, loaded = dualenc.load_pretrained(tmp_path / "own")
    assert again == config
    with torch.no_grad():
        ref = model.get_logits(torch.tensor(pixels), torch.tensor(ids))[0]
    assert max_diff(dualenc.apply(loaded, again, input_ids=ids, pixel_values=pixels).logits_per_image, ref) < 1e-5
    with pytest.raises(ValueError, match="open_clip_hf_text"):  # no transformers class reads it
        tf.AutoConfig.from_pretrained(tmp_path / "own")


@pytest.mark.parametrize("changes,field", [
    (dict(pooler="max_pooler"), "hf_pooler_type"),
    (dict(proj=None), "hf_proj_type"),
    (dict(output_tokens=True), "output_tokens"),
    (dict(hf_model_name="no-such-model"), "hf_model_name"),
    (dict(hf_model_name="BERT"), "hf_model_name"),
])
def test_unimplemented_hf_text_configs_are_refused(changes, field, xlmr, tmp_path):
    folder, _ = xlmr
    if changes.get("hf_model_name") == "BERT":
        _transformers().BertConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path / "bert")
        changes = dict(hf_model_name=str(tmp_path / "bert"))
    pooler, proj = changes.pop("pooler", "mean_pooler"), changes.pop("proj", "mlp")
    write_open_clip(tmp_path, model_cfg(folder, pooler, proj, **changes))
    with pytest.raises(dualenc.ConfigError, match=field):
        dualenc.load_pretrained(tmp_path)


def test_the_hub_names_open_clip_configs_use_read_offline():
    """open_clip's shipped xlm-roberta-base-ViT-B-32 and xlm-roberta-large-ViT-H-14 configs name hub models."""
    import os

    import open_clip
    from dualenc.formats import open_clip as reader

    root = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    for name, width, layers, embed in (("xlm-roberta-base-ViT-B-32", 768, 12, 512),
                                       ("xlm-roberta-large-ViT-H-14", 1024, 24, 1024)):
        with open(os.path.join(root, name + ".json")) as f:
            config = reader.config_from_dict({"model_cfg": json.load(f)})
        text = config.text
        assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (width, layers, 250002)
        assert text.pooler_type == "mean_pooler" and text.head_hidden_size == (width + embed) // 2
        assert config.projection_dim == embed and config.vision.patch_size in (32, 14)


def test_tokenizer_ids_are_open_clips_hf_tokenizers(references):
    """An open_clip directory naming an hf_tokenizer_name: its own XLMRobertaTokenizer files, open_clip's
    whitespace cleaning first, padded and truncated to text_cfg.context_length."""
    import open_clip

    path = references[VARIANTS[0]][1]
    ref = open_clip.get_tokenizer(f"local-dir:{path}")(TEXTS).numpy()
    ours = dualenc.Tokenizer.from_pretrained(path)(TEXTS)
    assert ours["input_ids"].shape == (len(TEXTS), CONTEXT)
    np.testing.assert_array_equal(ours["input_ids"], ref)
    np.testing.assert_array_equal(ours["attention_mask"], ref != 1)
    assert (ref == 3).any() and (ref[:, -1] == 2).any()  # unknown words, and a truncated row ending in </s>


def test_train_step_and_embed_on_a_saved_folder(references, ids, tmp_path):
    """One train step (the image tower locked) moves the text tower's head (the mlp's hidden layer) and encoder;
    the model saved with its processor runs `dualenc embed` in process."""
    import contextlib
    import io

    from safetensors.numpy import load_file

    from dualenc import cli, train

    _, path = references[VARIANTS[0]]
    config, params = dualenc.load_pretrained(path)
    optimizer = train.default_optimizer(1e-2, total_steps=2, warmup_steps=0)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(ids != 1, jnp.int32),
                 token_type_ids=jnp.zeros(ids.shape, jnp.int32), pixel_values=jnp.asarray(images(len(ids))))
    new_state, metrics = train.make_train_step(config, optimizer, locked=("vision",), donate=False)(
        train.init_state(params, optimizer, locked=("vision",), seed=0), batch)
    assert np.isfinite(float(metrics["loss"]))
    text = new_state.trainable["text"]
    assert not np.allclose(text["head"]["kernel"], params["text"]["head"]["kernel"])
    assert not np.allclose(text["encoder"][0]["attention"]["query"]["kernel"],
                           params["text"]["encoder"][0]["attention"]["query"]["kernel"])

    saved = tmp_path / "saved"
    dualenc.save_pretrained(saved, config, params, processor=dualenc.Processor.from_pretrained(path))
    (tmp_path / "texts.txt").write_text("a photo of the cat\nein foto der katze\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["embed", "--model", str(saved), "--texts", str(tmp_path / "texts.txt"), "--out",
                         str(tmp_path / "t.safetensors")]) == 0
    written = list(load_file(str(tmp_path / "t.safetensors")).values())
    assert any(a.shape == (2, 16) and np.all(np.isfinite(a)) for a in written)
