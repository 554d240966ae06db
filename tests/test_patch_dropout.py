"""Patch dropout (FLIP): parity with open_clip's PatchDropout (CLIP) and with transformers' SigLIP / SigLIP 2
vision towers fed only the kept tokens; the draw, gradients and the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dualenc
from conftest import TINY, _transformers, max_diff, pixels, randomize
from dualenc.formats.transformers import load_tower
from dualenc.towers import siglip, siglip2, vit

P = 0.5
OPEN_CLIP_CFG = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 30, "patch_size": 10, "width": 32, "layers": 2, "head_width": 8,
                                "patch_dropout": P},
                 "text_cfg": {"context_length": 12, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}


def keep_rows(batch, n, k, seed):
    """(batch, k) distinct patch indices per image, in a random order."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n)[:k] for _ in range(batch)]).astype(np.int32)


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    import open_clip

    cfg = OPEN_CLIP_CFG
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("oc")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return model, dualenc.load_pretrained(str(path))


def test_clip_matches_open_clip_patch_dropout(open_clip_model, monkeypatch):
    import open_clip.transformer

    model, (config, params) = open_clip_model
    images = pixels(3)
    n = config.vision.num_patches
    k = vit.kept_count(P, n)
    keep = keep_rows(3, n, k, seed=1)
    assert isinstance(model.visual.patch_dropout, open_clip.transformer.PatchDropout) and k == max(1, int(n * P))
    scores = np.full((3, n), -1.0, np.float32)  # open_clip keeps randn's top k, in score order: ours
    np.put_along_axis(scores, keep, np.arange(k, 0, -1, dtype=np.float32)[None], axis=1)
    monkeypatch.setattr(open_clip.transformer.torch, "randn", lambda *shape, **kw: torch.tensor(scores))
    model.train()  # patch dropout acts in training only; every dropout rate is 0
    with torch.no_grad():
        embeds = model.encode_image(torch.tensor(images))
        proj, model.visual.proj = model.visual.proj, None
        pooled = model.encode_image(torch.tensor(images))
        model.visual.proj = proj
    model.eval()
    # Through the dual encoder's run_tower, as the train step calls it.
    out = dualenc.model.run_tower(params, config, "vision", {"pixel_values": images}, patch_dropout=P,
                                  keep_indices=keep)
    assert out.last_hidden_state.shape == (3, 1 + k, 32)
    assert max_diff(out.pooler_output, pooled) < 1e-5
    assert max_diff(dualenc.model.project(params, "vision", out.pooler_output), embeds) < 1e-5


@pytest.fixture(scope="module")
def clip_tower(open_clip_model):
    _, (config, params) = open_clip_model
    return config.vision, params["vision"]


def test_drawn_patches(clip_tower):
    config, params = clip_tower
    images, n = pixels(3), config.num_patches
    k = vit.kept_count(P, n)
    base = vit.apply(params, config, images, output_hidden_states=True)
    zero = vit.apply(params, config, images, output_hidden_states=True, patch_dropout=0.0,
                     patch_key=jax.random.key(0))
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(zero)):
        assert np.array_equal(a, b)  # p = 0 is the normal forward, bit for bit, whatever the key
    key = jax.random.key(7)
    drawn = vit.patch_indices(P, key, None, 3, n)
    assert drawn.shape == (3, k) and all(len(set(row)) == k for row in np.asarray(drawn).tolist())
    assert len({tuple(sorted(row)) for row in np.asarray(drawn).tolist()}) > 1  # per image
    other = vit.patch_indices(P, jax.random.key(8), None, 3, n)
    assert not np.array_equal(np.sort(drawn, 1), np.sort(other, 1))  # per key
    out = vit.apply(params, config, images, output_hidden_states=True, patch_dropout=P, patch_key=key)
    # The encoder input: the class token, then the kept patches' rows of the full forward's (LayerNorm is per token).
    first, full = np.asarray(out.hidden_states[0]), np.asarray(base.hidden_states[0])
    assert first.shape == (3, 1 + k, config.hidden_size)
    np.testing.assert_allclose(first[:, 0], full[:, 0], atol=1e-6)
    np.testing.assert_allclose(first[:, 1:], np.take_along_axis(full[:, 1:], np.asarray(drawn)[..., None], 1),
                               atol=1e-6)
    assert max_diff(out.pooler_output, base.pooler_output) > 1e-3
    # The drawn patches injected give the same output; pooled_only and interpolate_pos_encoding keep working.
    pooled = vit.apply(params, config, images, patch_dropout=P, keep_indices=drawn, pooled_only=True)
    np.testing.assert_allclose(pooled.pooler_output, out.pooler_output, atol=1e-5)
    tower = jax.jit(vit.apply, static_argnames=("interpolate_pos_encoding", "patch_dropout"))
    big = tower(params, config, pixels(2, size=40), interpolate_pos_encoding=True, patch_dropout=P, patch_key=key)
    assert big.last_hidden_state.shape == (2, 1 + vit.kept_count(P, 16), config.hidden_size)


def test_gradients_flow_to_kept_patches_only(clip_tower):
    config, params = clip_tower
    images, key = pixels(1), jax.random.key(3)

    def loss(p):
        return jnp.sum(vit.apply(p, config, images, patch_dropout=P, patch_key=key).pooler_output ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(np.asarray(grads["embeddings"]["patch"]["kernel"])).sum() > 0
    position = np.abs(np.asarray(grads["embeddings"]["position"])).sum(-1)  # (1 + 9,): class token first
    kept = 1 + np.asarray(vit.patch_indices(P, key, None, 1, 9))[0]
    dropped = np.setdiff1d(np.arange(1, 10), kept)
    assert len(dropped) == 9 - vit.kept_count(P, 9)
    assert position[0] > 0 and np.all(position[kept] > 0) and np.all(position[dropped] == 0)


def gather_hook(indices):
    """A forward hook that keeps the embeddings' tokens at indices (B, K), as patch dropout does."""
    idx = torch.tensor(np.asarray(indices), dtype=torch.long)
    return lambda module, args, output: output[torch.arange(idx.shape[0])[:, None], idx]


def test_siglip_matches_transformers_fed_the_kept_tokens(tmp_path):
    tf = _transformers()
    vision = tf.SiglipVisionModel(tf.SiglipVisionConfig(**{**TINY, "image_size": 30, "patch_size": 10}))
    vision.config._attn_implementation = "eager"
    randomize(vision.eval(), 2).save_pretrained(tmp_path / "vision")
    config, params, _, _ = load_tower(tmp_path / "vision", jax.random.key(0))
    images, key = pixels(3), jax.random.key(5)
    for keep in (keep_rows(3, 9, 4, seed=2), vit.patch_indices(P, key, None, 3, 9)):
        handle = vision.embeddings.register_forward_hook(gather_hook(keep))
        with torch.no_grad():
            ref = vision(pixel_values=torch.tensor(images))
        handle.remove()
        given = dict(keep_indices=keep) if isinstance(keep, np.ndarray) else dict(patch_key=key)
        out = siglip.apply(params, config, images, patch_dropout=P, **given)
        assert out.last_hidden_state.shape == (3, 4, 32)
        assert max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-5
        assert max_diff(out.pooler_output, ref.pooler_output) < 1e-5


def test_naflex_drops_real_patches_only(tmp_path):
    tf = _transformers()
    vision = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**{**TINY, "patch_size": 8, "num_patches": 16}))
    vision.config._attn_implementation = "eager"
    randomize(vision.eval(), 4).save_pretrained(tmp_path / "vision")
    config, params, _, _ = load_tower(tmp_path / "vision", jax.random.key(0))
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((40, 90, 3), (64, 24, 3), (16, 16, 3))]
    batch = dualenc.NaFlexImageProcessor(patch_size=8, max_num_patches=20)(crops)
    mask, n = np.asarray(batch["pixel_attention_mask"]), batch["pixel_values"].shape[1]
    counts = mask.sum(1)
    assert counts.min() < n  # padding to drop around
    key = jax.random.key(11)
    drawn = vit.patch_indices(P, key, None, 3, n, real=mask.astype(bool))
    _, drawn_mask = siglip2.drop_patches(jnp.zeros((3, n, 1)), mask, P, key, None)
    kept = np.asarray(drawn_mask)
    assert kept.shape == (3, vit.kept_count(P, n))
    assert kept.sum(1).tolist() == [max(1, int(c * P)) for c in counts]
    assert all(np.all(row[m == 1] < c) for row, m, c in zip(np.asarray(drawn), kept, counts))  # real patches
    injected = keep_rows(3, n, vit.kept_count(P, n), seed=3)
    for keep, keep_mask, given in ((drawn, kept, dict(patch_key=key)),
                                   (injected, np.take_along_axis(mask, injected, 1), dict(keep_indices=injected))):
        handle = vision.embeddings.register_forward_hook(gather_hook(keep))
        with torch.no_grad():
            ref = vision(pixel_values=torch.tensor(batch["pixel_values"]), pixel_attention_mask=torch.tensor(keep_mask),
                         spatial_shapes=torch.tensor(batch["spatial_shapes"]))
        handle.remove()
        out = siglip2.apply(params, config, **batch, patch_dropout=P, **given)
        assert max_diff(out.pooler_output, ref.pooler_output) < 1e-5
        rows = np.asarray(keep_mask, bool)
        assert max_diff(np.asarray(out.last_hidden_state)[rows], ref.last_hidden_state.numpy()[rows]) < 1e-5


def test_errors_name_the_argument(open_clip_model, clip_tower):
    config, params = clip_tower
    images, key = pixels(2), jax.random.key(0)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(dualenc.InputError, match=r"patch_dropout must be in \[0, 1\)"):
            vit.apply(params, config, images, patch_dropout=bad, patch_key=key)
    for bad in (True, np.float32(0.5), jnp.asarray(0.5)):
        with pytest.raises(dualenc.InputError, match="patch_dropout must be a Python float"):
            vit.apply(params, config, images, patch_dropout=bad, patch_key=key)
    with pytest.raises(dualenc.InputError, match="patch_dropout must be a Python float"):
        jax.jit(lambda p: vit.apply(params, config, images, patch_dropout=p, patch_key=key))(0.5)
    with pytest.raises(dualenc.InputError, match="needs a patch_key"):
        vit.apply(params, config, images, patch_dropout=P)
    keep = keep_rows(2, 9, 4, seed=0)
    with pytest.raises(dualenc.InputError, match="patch_key and keep_indices"):
        vit.apply(params, config, images, patch_dropout=P, patch_key=key, keep_indices=keep)
    for bad, match in ((keep[:1], "keep_indices must be an integer array"), (keep.astype(np.float32), "integer"),
                       (keep[:, :3], "keeps 3 patches"), (keep + 6, r"keep_indices must be in \[0, 9\)")):
        with pytest.raises(dualenc.InputError, match=match):
            vit.apply(params, config, images, patch_dropout=P, keep_indices=bad)
    # A tower without patch dropout (the text tower here) refuses a rate, and ignores 0 and a key without a rate.
    _, (model_config, model_params) = open_clip_model
    text = {"input_ids": np.ones((2, 12), np.int32)}
    with pytest.raises(dualenc.InputError, match=r"patch_dropout is not supported by the text tower \(clip_text\)"):
        dualenc.model.run_tower(model_params, model_config, "text", text, patch_dropout=P, patch_key=key)
    out = dualenc.model.run_tower(model_params, model_config, "text", text, patch_dropout=0.0, patch_key=key)
    assert out.pooler_output.shape == (2, 32)
