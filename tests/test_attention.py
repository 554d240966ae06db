"""Attention chosen by name: every implementation that runs on CPU gives "xla"'s numbers through dualenc.apply
(masked and causal text, unmasked and masked vision, a pooling head's probe), the per-backend default, and the
errors for a name that is unknown or cannot run here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY as SIZES

import dualenc
from dualenc import layers

VOCAB, LENGTH = 40, 8
TINY = {**SIZES, "num_hidden_layers": 1}  # one layer: every path, less to compile
ON_CPU = [name for name, impl in layers.IMPLEMENTATIONS.items() if not impl.backends or "cpu" in impl.backends]
OTHERS = [name for name in ON_CPU if name != "xla"]


def _text(config, padded=True):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (3, LENGTH)).astype(np.int32)
    mask = np.ones((3, LENGTH), np.int32)
    if padded:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    eos = getattr(config.text, "eos_token_id", None)
    if isinstance(eos, int) and eos >= 2:  # CLIP pools at the end-of-text token
        ids[np.arange(3), mask.sum(1) - 1] = eos
    batch = {"input_ids": ids, "attention_mask": mask}
    return batch


def vit_bert():
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
                                       dualenc.BertConfig(**TINY, vocab_size=VOCAB), projection_dim=8)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    return config, {**_text(config), "pixel_values": pixels}


def clip():
    config = dualenc.DualEncoderConfig(
        dualenc.CLIPVisionConfig(**TINY, image_size=16, patch_size=8),
        dualenc.CLIPTextConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=2),
        projection_dim=8, model_type="clip")
    pixels = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    return config, {**_text(config), "pixel_values": pixels}


def naflex():
    config = dualenc.DualEncoderConfig(
        dualenc.Siglip2VisionConfig(**TINY, patch_size=8, num_patches=16),
        dualenc.Siglip2TextConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=16),
        projection_dim=32, model_type="siglip2", logit_bias_init_value=-10.0)
    shapes = np.array([[2, 3], [4, 4], [1, 2]], np.int32)
    mask = np.zeros((3, 16), np.int32)
    for row, (h, w) in enumerate(shapes):
        mask[row, :h * w] = 1
    pixels = np.random.default_rng(3).normal(size=(3, 16, 3 * 8 * 8)).astype(np.float32)
    return config, {**_text(config, padded=False), "pixel_values": pixels, "pixel_attention_mask": mask,
                    "spatial_shapes": shapes}


FORWARD = jax.jit(dualenc.apply, static_argnames=("attention", "output_attentions"))


@pytest.mark.parametrize("model", [vit_bert, clip, naflex], ids=lambda f: f.__name__)
def test_implementations_on_cpu_give_xla_numbers(model):
    config, batch = model()
    params = dualenc.init(jax.random.key(0), config)
    ref = FORWARD(params, config, **batch, attention="xla")
    for name in OTHERS:
        out = FORWARD(params, config, **batch, attention=name)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5, err_msg=name)


def test_features_take_the_name_and_probabilities_come_from_xla():
    config, batch = vit_bert()
    params = dualenc.init(jax.random.key(1), config)
    features = jax.jit(dualenc.get_text_features, static_argnames="attention")
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = features(params, config, **text, attention="xla")
    for name in OTHERS:
        np.testing.assert_allclose(features(params, config, **text, attention=name), ref, rtol=1e-5, atol=2e-5)
    # A layer asked for its probabilities runs "xla" whichever name is given: the fused kernels have none.
    layer = jax.tree_util.tree_map(lambda a: a[0], dualenc.stack_layers(params)["text"]["encoder"]["attention"])
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, LENGTH, 32)), jnp.float32)
    bias = layers.attention_bias(jnp.asarray(batch["attention_mask"]))
    spec = dualenc.towers.bert.encoder_spec(config.text)
    want = layers.attention(layer, x, bias, spec, jnp.float32, None, need_probs=True, attention="xla")
    for name in OTHERS:
        got = layers.attention(layer, x, bias, spec, jnp.float32, None, need_probs=True, attention=name)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_default_is_a_pure_function_of_the_backend():
    assert layers.default_attention("gpu") == "jax"
    assert layers.default_attention("cpu") == "xla"
    assert layers.default_attention("tpu") == "xla"
    assert layers.resolve_attention(None, backend="gpu") == "jax"
    assert layers.resolve_attention(None, backend="some-new-chip") == "xla"
    assert layers.resolve_attention("cudnn", jnp.bfloat16, backend="gpu") == "cudnn"
    assert layers.resolve_attention("cudnn", jnp.dtype(jnp.float16), backend="gpu") == "cudnn"  # as towers pass it
    assert layers.resolve_attention("xla", backend="gpu") == "xla"
    assert layers.resolve_attention(None) == layers.default_attention(jax.default_backend())
    with pytest.raises(dualenc.InputError, match="cudnn.*bfloat16 or float16, got float32"):
        layers.resolve_attention("cudnn", None, backend="gpu")


def test_unknown_or_unrunnable_names_are_clear_errors():
    config, batch = vit_bert()
    params = dualenc.init(jax.random.key(2), config)
    listed = "'xla', 'jax', 'cudnn'"
    for bad in ("flash", "XLA", 3):
        with pytest.raises(dualenc.InputError, match=f"attention must be one of {listed}.*got {bad!r}"):
            dualenc.apply(params, config, **batch, attention=bad)
    with pytest.raises(dualenc.InputError, match="attention must be one of"):
        layers.encoder(params["text"]["encoder"], jnp.zeros((1, 2, 32)), None, dualenc.towers.bert.encoder_spec(
            config.text), dtype=jnp.float32, attention="flash")
    if jax.default_backend() == "cpu":
        for call in (lambda: dualenc.apply(params, config, **batch, attention="cudnn", dtype=jnp.bfloat16),
                     lambda: dualenc.get_text_features(params, config, batch["input_ids"], attention="cudnn"),
                     lambda: dualenc.towers.vit.apply(params["vision"], config.vision, batch["pixel_values"],
                                                      attention="cudnn")):
            with pytest.raises(dualenc.InputError, match="'cudnn' runs on gpu only, and this is the cpu backend: "
                                                         "use one of 'xla', 'jax'"):
                call()
