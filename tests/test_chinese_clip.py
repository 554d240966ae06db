"""Chinese-CLIP from transformers directories: parity with transformers' PyTorch ChineseCLIPModel (the CLIP vision
tower, the BERT text tower pooled at [CLS] without its pooler), its processor (ChineseCLIPImageProcessorPil and
BertTokenizer on a Chinese vocabulary), saving what transformers loads, training and the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dualenc
from conftest import TINY, _transformers, max_diff, randomize

# A Chinese vocabulary: BERT's specials, single CJK characters (BertTokenizer splits CJK text into characters),
# a few Latin words and word pieces, full-width punctuation.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一张猫狗的照片红色蓝绿天空海和在上", "，", "。", "！",
         "a", "photo", "of", "cat", "##s", "dog", "red", "blue"]
TEXTS = ["一张猫的照片", "红色的狗在海上！", "a photo of cats，蓝天。", "绿色 dog 和 未知字"]
LABELS = ["猫", "狗", "天空"]
SIZE = 30  # the model's image_size; the processor resizes the shortest edge to 32 and crops 30


def hf_chinese_clip(seed=0, projection_dim=16):
    tf = _transformers()
    text = tf.ChineseCLIPTextConfig(**TINY, vocab_size=len(VOCAB), max_position_embeddings=40)
    vision = tf.ChineseCLIPVisionConfig(**TINY, image_size=SIZE, patch_size=10, projection_dim=projection_dim)
    config = tf.ChineseCLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  projection_dim=projection_dim)
    model = tf.ChineseCLIPModel(config).eval()
    for part in (model, model.text_model, model.vision_model):
        part.config._attn_implementation = "eager"
    model = randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
    return model


@pytest.fixture(scope="module")
def cc(tmp_path_factory):
    """(model, its ChineseCLIPProcessor, a directory holding both as transformers saves them)."""
    tf = _transformers()
    root = tmp_path_factory.mktemp("chinese_clip")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = tf.BertTokenizer(vocab=str(root / "vocab.txt"))
    image_processor = tf.ChineseCLIPImageProcessorPil(size={"shortest_edge": 32},
                                                      crop_size={"height": SIZE, "width": SIZE})
    processor = tf.ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = hf_chinese_clip()
    path = root / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, str(path)


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def reference(processor, texts=None, images=None):
    return {k: np.asarray(v) for k, v in processor(text=texts, images=images, padding="max_length", max_length=40,
                                                   return_tensors="np").items()}


# One compiled forward with every output, shared by the tests (the same shapes: one compilation).
FORWARD = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "output_attentions"))


def torch_forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()}, **kw)


def test_matches_transformers_every_output(cc, photos):
    model, processor, path = cc
    config, params = dualenc.load_pretrained(path)
    assert config.model_type == "chinese_clip" and config.projection_dim == 16
    assert isinstance(config.vision, dualenc.config.ChineseCLIPVisionConfig)
    assert isinstance(config.text, dualenc.config.ChineseCLIPTextConfig) and "pooler" not in params["text"]
    inputs = reference(processor, TEXTS, photos)
    ref = torch_forward(model, inputs, output_hidden_states=True, output_attentions=True)
    out = FORWARD(params, config, **inputs, output_hidden_states=True, output_attentions=True)
    ids = {k: torch.tensor(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        vision_pooled = model.vision_model(pixel_values=torch.tensor(inputs["pixel_values"])).pooler_output
        text_cls = model.text_model(**ids).last_hidden_state[:, 0]  # what ChineseCLIPModel projects
        text_features = model.get_text_features(**ids).pooler_output
    projected = np.asarray(out.text_outputs.pooler_output) @ np.asarray(params["text_projection"]["kernel"])
    for ours, theirs in ((out.logits_per_image, ref.logits_per_image), (out.logits_per_text, ref.logits_per_text),
                         (out.text_embeds, ref.text_embeds), (out.image_embeds, ref.image_embeds),
                         (out.vision_outputs.pooler_output, vision_pooled), (out.text_outputs.pooler_output, text_cls),
                         (projected, text_features)):
        assert max_diff(ours, theirs) < 1e-5
    for tower, theirs in ((out.text_outputs, ref.text_model_output), (out.vision_outputs, ref.vision_model_output)):
        assert max_diff(tower.last_hidden_state, theirs.last_hidden_state) < 1e-5
        assert len(tower.hidden_states) == len(theirs.hidden_states) == 3
        assert len(tower.attentions) == len(theirs.attentions) == 2
        for a, b in zip((*tower.hidden_states, *tower.attentions), (*theirs.hidden_states, *theirs.attentions)):
            assert max_diff(a, b) < 1e-5
    bf16 = jax.jit(dualenc.apply, static_argnames=("dtype",))(params, config, **inputs, dtype=jnp.bfloat16)
    diffs = {k: max_diff(getattr(bf16, k), getattr(ref, k)) for k in ("image_embeds", "text_embeds")}
    print("bfloat16 vs float32 reference:", diffs)
    assert max(diffs.values()) < 0.1  # reported, not a parity claim


def test_tokenizer_ids_and_pixels_are_transformers(cc, photos, tmp_path):
    tf = _transformers()
    model, processor, path = cc
    ours = dualenc.Processor.from_pretrained(path)
    assert ours.image_processor.image_processor_type == "ChineseCLIPImageProcessor"
    got, want = ours(text=TEXTS, images=photos), reference(processor, TEXTS, photos)
    assert set(got) == set(want) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert 1 in got["input_ids"][3]  # 未 and 知 are unknown characters
    assert max_diff(got["pixel_values"], want["pixel_values"]) < 1e-5
    # The hub's Chinese-CLIP layout: vocab.txt and no tokenizer class (AutoTokenizer takes the model's
    # BertTokenizer), a feature extractor resizing to a square without a crop.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (bare / "config.json").write_text(model.config.to_json_string())
    settings = {"feature_extractor_type": "ChineseCLIPFeatureExtractor", "do_center_crop": False, "resample": 3,
                "size": {"height": SIZE, "width": SIZE}, "image_mean": processor.image_processor.image_mean,
                "image_std": processor.image_processor.image_std}
    (bare / "preprocessor_config.json").write_text(json.dumps(settings))
    auto = tf.AutoTokenizer.from_pretrained(bare)
    theirs = auto(TEXTS, padding="max_length", max_length=40, return_tensors="np")
    mine = dualenc.Tokenizer.from_pretrained(bare)(TEXTS)
    np.testing.assert_array_equal(mine["input_ids"], theirs["input_ids"])
    hub_pixels = tf.ChineseCLIPImageProcessorPil(**settings)(photos, return_tensors="np")["pixel_values"]
    mine_pixels = dualenc.AutoImageProcessor.from_pretrained(bare)(photos)
    assert mine_pixels.shape == (2, 3, SIZE, SIZE) and max_diff(mine_pixels, hub_pixels) < 1e-5


def test_saves_what_transformers_loads(cc, photos, tmp_path):
    tf = _transformers()
    _, processor, path = cc
    config, params = dualenc.load_pretrained(path)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # not simply the loaded bytes
    dualenc.save_pretrained(tmp_path / "ours", config, params, processor=dualenc.Processor.from_pretrained(path))
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "chinese_clip" and saved["architectures"] == ["ChineseCLIPModel"]
    assert saved["text_config"]["model_type"] == "chinese_clip_text_model"
    back, info = tf.ChineseCLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    image_processor = tf.AutoImageProcessor.from_pretrained(tmp_path / "ours", backend="pil")
    assert type(image_processor).__name__ == "ChineseCLIPImageProcessorPil"
    inputs = reference(processor, TEXTS, photos)
    assert max_diff(image_processor(photos, return_tensors="np")["pixel_values"], inputs["pixel_values"]) < 1e-5
    ref = torch_forward(back.eval(), inputs)
    out = FORWARD(params, config, **inputs, output_hidden_states=True, output_attentions=True)
    assert max_diff(out.logits_per_text, ref.logits_per_text) < 1e-5
    config2, params2 = dualenc.load_pretrained(tmp_path / "ours")
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_towers_compose_keeping_the_projections(cc):
    """from_vision_text_pretrained of the one directory keeps its towers, projections and logit scale: a
    VisionTextDualEncoder of the two Chinese-CLIP towers computes what the ChineseCLIPModel does."""
    _, _, path = cc
    whole, expected = dualenc.load_pretrained(path)
    config, params = dualenc.from_vision_text_pretrained(path, path, key=jax.random.key(0))
    assert config.model_type == "vision-text-dual-encoder" and config.projection_dim == whole.projection_dim
    assert (config.vision, config.text) == (whole.vision, whole.text)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_trains_and_zero_shot_command(cc, photos, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from dualenc import cli, train

    model, processor, path = cc
    config, params = dualenc.load_pretrained(path)
    batch = reference(processor, TEXTS, photos * 2)
    optimizer = train.clipped_adamw(1e-3, clip_norm=1.0)
    state = train.init_state(params, optimizer)
    state, metrics = train.make_train_step(config, optimizer, donate=False)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for side, leaf in (("text", ("encoder",)), ("vision", ("encoder",))):
        before, after = params[side][leaf[0]], state.trainable[side][leaf[0]]
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                           jax.tree_util.tree_leaves(after))), side

    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")
    files = []
    for i, photo in enumerate(photos):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(photo).resize((64, 48)).save(files[-1])
    (tmp_path / "templates.txt").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    code = cli.main(["zero-shot", "--model", path, "--labels", ",".join(LABELS), "--templates",
                     str(tmp_path / "templates.txt"), "--json", *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    results = json.loads(out)["results"]
    pictures = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    want = torch_forward(model, reference(processor, LABELS, pictures)).logits_per_image.softmax(-1).numpy()
    for row, result in zip(want, results):
        np.testing.assert_allclose(result["probabilities"], [row[LABELS.index(n)] for n in result["labels"]],
                                   atol=1e-5)


def test_refusals_name_the_field(cc):
    _, _, path = cc
    config, _ = dualenc.load_pretrained(path)
    clip_text = dualenc.CLIPTextConfig(**TINY, vocab_size=99, max_position_embeddings=20)
    with pytest.raises(dualenc.ConfigError, match="model_type.*ChineseCLIPVisionConfig and ChineseCLIPTextConfig"):
        dualenc.DualEncoderConfig(config.vision, clip_text, projection_dim=16, model_type="chinese_clip")
    raw = json.loads(open(f"{path}/config.json").read())
    bad = {**raw, "text_config": {**raw["text_config"], "pruned_heads": {"0": [1]}}}
    with pytest.raises(dualenc.ConfigError, match="pruned_heads"):
        dualenc.config.config_from_dict(bad)
    bad = {**raw, "vision_config": {**raw["vision_config"], "model_type": "clip_vision_model"}}
    with pytest.raises(dualenc.ConfigError, match="model_type.*chinese_clip_vision_model"):
        dualenc.config.config_from_dict(bad)
