"""Batched encoding (one compile per shape), zero-shot classification and retrieval metrics."""

import contextlib

import jax
import jax.monitoring
import numpy as np
import pytest
from conftest import TINY

import dualenc
from dualenc import encode, evaluate


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def tiny(projection_dim=16, text="bert"):
    text_cls = dualenc.BertConfig if text == "bert" else dualenc.RobertaConfig
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(**TINY, image_size=30, patch_size=10),
        text=text_cls(**TINY, vocab_size=99, max_position_embeddings=80), projection_dim=projection_dim)
    return config, dualenc.init(jax.random.key(projection_dim), config)


def to_pixels(images):
    """A stand-in image processor: HWC uint8 arrays -> NCHW float32 in [-1, 1]."""
    return np.stack([np.asarray(i, np.float32).transpose(2, 0, 1) / 127.5 - 1 for i in images])


class CharTokenizer:
    """A stand-in tokenizer with the processing.Tokenizer interface: one id per character."""

    pad_token_id = 0
    max_length = 64

    def __call__(self, texts, max_length=None, padding="max_length"):
        max_length = max_length or self.max_length
        rows = [[2] + [3 + ord(c) % 90 for c in t][: max_length - 1] for t in texts]
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": 0 * ids}


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(n)]


def test_encode_images_compiles_once_and_matches_the_forward():
    config, params = tiny(projection_dim=11)
    images = random_images(23)
    with count_compiles() as compiles:
        embeds = dualenc.encode_images(params, config, to_pixels, iter(images), batch_size=5)
    assert len(compiles) == 1  # five batches (the last padded), one compiled shape
    with count_compiles() as compiles:
        dualenc.encode_images(params, config, to_pixels, images, batch_size=5)
    assert len(compiles) == 0
    assert embeds.shape == (23, 11) and embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-5)
    direct = dualenc.get_image_features(params, config, to_pixels(images))
    direct = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(embeds, direct, atol=1e-5)
    assert dualenc.encode_images(params, config, to_pixels, [], batch_size=5).shape == (0, 11)
    # fewer images than a batch are padded to the next power of two only: 3 and 4 images share one 4-row program
    few = dualenc.encode_images(params, config, to_pixels, images[:3], batch_size=32)
    np.testing.assert_allclose(few, embeds[:3], atol=1e-5)
    with count_compiles() as compiles:
        dualenc.encode_images(params, config, to_pixels, images[:4], batch_size=32)
        dualenc.encode_images(params, config, to_pixels, images[:3], batch_size=32)
    assert len(compiles) == 0 and encode.batch_rows(3, 32) == 4 and encode.batch_rows(40, 32) == 32
    with pytest.raises(ValueError, match="batch_size"):
        dualenc.encode_images(params, config, to_pixels, images, batch_size=0)


def test_encode_texts_buckets_lengths():
    config, params = tiny(projection_dim=13, text="roberta")
    tokenizer = CharTokenizer()
    texts = [("word " * n).strip() for n in (1, 1, 1, 1, 2, 2, 2, 2, 20, 1, 3, 1, 1, 2)]
    with count_compiles() as compiles:
        embeds = dualenc.encode_texts(params, config, tokenizer, texts, batch_size=4)
    # batches need lengths 5, 10, 64 and 10 (1 + 5 characters a word) -> buckets 8, 16, 64, 16
    assert len(compiles) == 3
    with count_compiles() as compiles:
        again = dualenc.encode_texts(params, config, tokenizer, (t for t in texts), batch_size=4)
    assert len(compiles) == 0
    np.testing.assert_array_equal(embeds, again)
    full = tokenizer(texts, max_length=64)
    direct = np.array(dualenc.get_text_features(params, config, full["input_ids"], full["attention_mask"]))
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(embeds, direct, atol=1e-5)
    assert evaluate.length_buckets(64) == (8, 16, 32, 64)
    assert evaluate.length_buckets(77) == (8, 16, 32, 64, 77)


def test_zero_shot_classifier_is_renormalised_template_mean():
    config, params = tiny(projection_dim=9)
    tokenizer = CharTokenizer()
    templates = ["a photo of a {}.", "{}", "art of the {}"]
    weights = dualenc.zero_shot_classifier(params, config, tokenizer, ["cat", "dog"], templates)
    assert weights.shape == (9, 2)
    for j, name in enumerate(["cat", "dog"]):
        e = dualenc.encode_texts(params, config, tokenizer, [t.format(name) for t in templates])
        mean = e.mean(axis=0)
        np.testing.assert_allclose(weights[:, j], mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ValueError, match=r"templates\[1\]"):
        dualenc.zero_shot_classifier(params, config, tokenizer, ["cat"], ["a {}", "no placeholder"])
    with pytest.raises(ValueError, match="classnames"):
        dualenc.zero_shot_classifier(params, config, tokenizer, [], templates)
    assert all(t.count("{}") == 1 for t in evaluate.DEFAULT_TEMPLATES)


def test_zero_shot_predict_by_hand():
    classifier = np.eye(3, dtype=np.float32)
    images = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], np.float32)
    top, probs = dualenc.zero_shot_predict(images, classifier, k=2, logit_scale=1.0)
    np.testing.assert_array_equal(top, [[0, 1], [2, 1]])
    e = np.exp
    np.testing.assert_allclose(probs[0], [e(1) / (e(1) + 2), 1 / (e(1) + 2)], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [e(0.8) / (1 + e(0.6) + e(0.8)), e(0.6) / (1 + e(0.6) + e(0.8))],
                               rtol=1e-6)
    every, _ = dualenc.zero_shot_predict(images, classifier, k=5, logit_scale=1.0)  # k past the classes: all
    np.testing.assert_array_equal(every[:, :2], top)
    assert every.shape == (2, 3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            dualenc.zero_shot_predict(images, classifier, k=bad, logit_scale=1.0)


def test_zero_shot_predict_uses_the_models_own_logit_scale_and_bias():
    """With params, the probabilities come from the model's exp(logit_scale) (and its logit_bias: sigmoids),
    not a fixed 100; with neither params nor a scale it refuses rather than guess."""
    classifier = np.eye(3, dtype=np.float32)
    images = np.array([[0.6, 0.8, 0.0]], np.float32)
    params = {"logit_scale": np.float32(np.log(2.0))}
    _, probs = dualenc.zero_shot_predict(images, classifier, k=3, params=params)
    logits = 2.0 * np.array([0.8, 0.6, 0.0])
    np.testing.assert_allclose(probs[0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-5)
    _, sig = dualenc.zero_shot_predict(images, classifier, k=3, params={**params, "logit_bias": np.float32(-1.0)})
    np.testing.assert_allclose(sig[0], 1 / (1 + np.exp(-(logits - 1.0))), rtol=1e-5)
    with pytest.raises(ValueError, match="params"):
        dualenc.zero_shot_predict(images, classifier)
    with pytest.raises(ValueError, match="not both"):
        dualenc.zero_shot_predict(images, classifier, params=params, logit_scale=100.0)


def test_retrieval_metrics_by_hand_with_ties_and_several_captions():
    images = np.eye(3)
    # scores[i, t] = texts[t, i]; texts 0 and 1 describe image 0, text 2 image 1, text 3 image 2
    texts = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.0], [0.3, 0.3, 0.8], [0.1, 0.0, 0.7]])
    m = dualenc.retrieval_metrics(images, texts, [0, 0, 1, 2])
    # text ranks: 1, 2 (0.5 > 0.2), 3 (tie 0.3 = 0.3 counts against, 0.8 above), 1
    assert m["t2i_R@1"] == 0.5 and m["t2i_R@5"] == 1.0 and m["t2i_R@10"] == 1.0
    assert m["t2i_mean_rank"] == 1.75 and m["t2i_median_rank"] == 1.5
    # image ranks: 1 (best caption 0.9), 2 (text 1's 0.5 beats its 0.3), 2 (text 2's 0.8 beats 0.7)
    assert m["i2t_R@1"] == pytest.approx(1 / 3) and m["i2t_R@5"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx(5 / 3) and m["i2t_median_rank"] == 2.0
    with pytest.warns(UserWarning, match="4 of 4 texts embed the same"):  # a constant model ties every text
        constant = dualenc.retrieval_metrics(np.ones((4, 2)), np.ones((4, 2)), [0, 1, 2, 3])
    assert constant["i2t_R@1"] == 0.0 and constant["t2i_mean_rank"] == 4.0
    with pytest.raises(ValueError, match="no relevant text"):
        dualenc.retrieval_metrics(images, texts, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        dualenc.retrieval_metrics(images, texts, [0, 0, 1, 3])


def test_real_processor_encoding_and_a_complete_saved_directory(tmp_path):
    """Processor -> encode_* -> save_pretrained(processor=...) -> transformers loads model and processor."""
    import transformers
    from conftest import hf_dual_model

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "the", "##s"]
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 30, "width": 30}),
                                  dualenc.Tokenizer.from_pretrained(tmp_path / "vocab", max_length=16))
    model = hf_dual_model("vit", "bert", text_kw=dict(vocab_size=len(words)))
    model.save_pretrained(tmp_path / "hf")
    config, params = dualenc.load_pretrained(tmp_path / "hf")
    images = [np.full((40, 50, 3), v, np.uint8) for v in (0, 90, 200)] + random_images(2)
    texts = ["a photo of a cat", "dogs", "", "the cat of the dog"]
    image_embeds = dualenc.encode_images(params, config, processor, images, batch_size=2)
    text_embeds = dualenc.encode_texts(params, config, processor, texts, batch_size=3)
    inputs = processor(text=texts, images=images)
    out = dualenc.apply(params, config, **inputs)
    np.testing.assert_allclose(image_embeds, out.image_embeds, atol=1e-5)
    np.testing.assert_allclose(text_embeds, out.text_embeds, atol=1e-5)

    dualenc.save_pretrained(tmp_path / "ours", config, params, processor=processor)
    hf_processor = transformers.VisionTextDualEncoderProcessor.from_pretrained(tmp_path / "ours")
    hf_inputs = hf_processor(text=texts, images=images, padding="max_length", max_length=16, return_tensors="np")
    np.testing.assert_array_equal(hf_inputs["input_ids"], inputs["input_ids"])
    np.testing.assert_allclose(hf_inputs["pixel_values"], inputs["pixel_values"], atol=1e-6)
    # the default length comes from the model beside it: its 40 positions, under the cap of 64
    assert dualenc.Processor.from_pretrained(tmp_path / "ours").tokenizer.max_length == 40


def test_progress_bar_only_when_asked_or_long_on_a_terminal(capsys, monkeypatch):
    config, params = tiny(projection_dim=11)
    dualenc.encode_images(params, config, to_pixels, random_images(6), batch_size=5, progress=True)
    assert "images" in capsys.readouterr().err
    dualenc.encode_images(params, config, to_pixels, random_images(30), batch_size=5)
    assert capsys.readouterr().err == ""  # long, but stderr is not a terminal here
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert encode._progress(30, 5, None, "x") is not None
    assert encode._progress(10, 5, None, "x") is None


def test_class_level_retrieval_and_chance():
    images = np.array([[1.0, 0.0], [0.6, 0.0], [0.0, 1.0]])  # labels 0, 0, 1
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])  # labels 0, 1, 1
    m = dualenc.retrieval_metrics(images, texts, image_labels=[0, 0, 1], text_labels=[0, 1, 1], ks=(1, 2))
    # images: 1 (text 0 best), 1, 1 (text 1 scores 1.0) -> i2t R@1 = 1
    assert m["i2t_R@1"] == 1.0
    # texts: text 0 -> image 0 first; text 1 -> image 2 first; text 2: image 2 ties with image 0 at .7 -> 2
    assert m["t2i_R@1"] == pytest.approx(2 / 3) and m["t2i_mean_rank"] == pytest.approx(4 / 3)
    assert m["i2t_chance_R@1"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert evaluate.chance_recall(10, 1, 5) == pytest.approx(0.5)
    assert evaluate.chance_recall(20, 2, 5) == pytest.approx(1 - (18 * 17 * 16 * 15 * 14) / (20 * 19 * 18 * 17 * 16))
    with pytest.raises(ValueError, match="text_to_image, or both"):
        dualenc.retrieval_metrics(images, texts)


def test_relevance_rule_is_explicit_and_identical_captions_warn():
    """Class-level captions repeat across images: instance relevance ties them against each other (README's
    example printed i2t R@1 = 0.0 on the demo data), label relevance does not, and the tie is warned about."""
    from dualenc.data import PairDataset

    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    classes = rng.standard_normal((3, 8))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    images = classes[labels] + 0.05 * rng.standard_normal((6, 8))
    pairs = PairDataset([f"{i}.png" for i in range(6)], [f"class {c}" for c in labels], np.arange(6), labels)
    texts = classes[labels]  # one caption per image, the same text for every image of a class
    assert set(pairs.relevance("instance")) == {"text_to_image"}
    assert set(pairs.relevance()) == set(pairs.relevance("label")) == {"image_labels", "text_labels"}
    with pytest.warns(UserWarning, match="6 of 6 texts embed the same as a text of another image"):
        instance = dualenc.retrieval_metrics(images, texts, **pairs.relevance("instance"))
    label = dualenc.retrieval_metrics(images, texts, **pairs.relevance("label"))
    assert instance["i2t_R@1"] == 0.0 and label["i2t_R@1"] == 1.0  # every tie counted against the model
    unlabelled = pairs._replace(labels=None)
    assert set(unlabelled.relevance()) == {"text_to_image"}
    with pytest.raises(dualenc.DataError, match="needs a label for every image"):
        unlabelled.relevance("label")
    with pytest.raises(dualenc.DataError, match="'auto', 'instance' or 'label'"):
        pairs.relevance("class")
