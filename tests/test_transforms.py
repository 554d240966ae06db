"""jit, grad, vmap, pmap and mesh sharding give the same numbers as the plain forward; scan keeps HLO flat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_dual_model, max_diff, pixels, text_batch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import dualenc


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model = hf_dual_model("vit", "roberta", seed=21)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    config, params = dualenc.load_pretrained(path)
    return model, config, params


def clip_loss(logits_per_text):
    labels = jnp.arange(logits_per_text.shape[0])
    text_loss = -jnp.mean(jax.nn.log_softmax(logits_per_text, axis=1)[labels, labels])
    image_loss = -jnp.mean(jax.nn.log_softmax(logits_per_text, axis=0)[labels, labels])
    return (text_loss + image_loss) / 2


def test_jit_equals_eager(loaded):
    _, config, params = loaded
    batch, px = text_batch(config.text, batch=4), pixels(4)
    eager = dualenc.apply(params, config, **batch, pixel_values=px)
    jitted = jax.jit(dualenc.apply)(params, config, **batch, pixel_values=px)
    assert max_diff(jitted.logits_per_image, eager.logits_per_image) <= 1e-5


def test_grad_matches_torch_backward(loaded):
    model, config, params = loaded
    batch, px = text_batch(config.text, batch=4, seed=3), pixels(4, seed=3)

    def loss_fn(p):
        return clip_loss(dualenc.apply(p, config, **batch, pixel_values=px).logits_per_text)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    model.zero_grad()
    out = model(**{k: torch.tensor(v) for k, v in batch.items()}, pixel_values=torch.tensor(px), return_loss=True)
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    named = dict(model.named_parameters())
    pairs = [
        (grads["logit_scale"], named["logit_scale"].grad),
        (grads["text_projection"]["kernel"], named["text_projection.weight"].grad.T),
        (grads["vision"]["embeddings"]["patch"]["kernel"],
         named["vision_model.embeddings.patch_embeddings.projection.weight"].grad.permute(1, 2, 3, 0)),
        (grads["text"]["encoder"][1]["attention"]["query"]["kernel"],
         named["text_model.encoder.layer.1.attention.self.query.weight"].grad.T),
        (grads["vision"]["encoder"][0]["mlp_norm"]["scale"],
         named["vision_model.layers.0.layernorm_after.weight"].grad),
    ]
    for ours, theirs in pairs:
        scale = max(1.0, float(theirs.abs().max()))
        assert max_diff(ours, theirs) <= 1e-5 * scale
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_vmap_per_example_equals_batched(loaded):
    _, config, params = loaded
    batch, px = text_batch(config.text, batch=3, seed=5), pixels(3, seed=5)
    full = dualenc.apply(params, config, **batch, pixel_values=px)

    def one(ids, mask, types, image):
        out = dualenc.apply(params, config, input_ids=ids[None], attention_mask=mask[None],
                            token_type_ids=types[None], pixel_values=image[None])
        return out.text_embeds[0], out.image_embeds[0]

    text, image = jax.vmap(one)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], px)
    assert max_diff(text, full.text_embeds) <= 1e-6
    assert max_diff(image, full.image_embeds) <= 1e-6


def test_vmap_over_params(loaded):
    """An ensemble of param sets, stacked on a leading axis, runs in one vmapped call."""
    _, config, params = loaded
    other = dualenc.init(jax.random.key(9), config)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
    batch, px = text_batch(config.text), pixels(2)
    logits = jax.vmap(lambda p: dualenc.apply(p, config, **batch, pixel_values=px).logits_per_image)(stacked)
    for i, p in enumerate((params, other)):
        assert max_diff(logits[i], dualenc.apply(p, config, **batch, pixel_values=px).logits_per_image) <= 1e-5


def test_pmap_matches_single_device(loaded):
    _, config, params = loaded
    n = jax.local_device_count()
    assert n == 4, "conftest sets 4 virtual CPU devices"
    batch, px = text_batch(config.text, batch=8, seed=6), pixels(8, seed=6)
    full = dualenc.apply(params, config, **batch, pixel_values=px)
    split = lambda x: x.reshape((n, -1) + x.shape[1:])  # noqa: E731
    out = jax.pmap(lambda b, x: dualenc.apply(params, config, **b, pixel_values=x))(
        {k: split(v) for k, v in batch.items()}, split(px))
    assert max_diff(out.image_embeds.reshape(8, -1), full.image_embeds) <= 1e-5
    assert max_diff(out.text_embeds.reshape(8, -1), full.text_embeds) <= 1e-5
    for d in range(n):  # each device's logits are the diagonal block of the global ones
        block = np.asarray(full.logits_per_image)[2 * d:2 * d + 2, 2 * d:2 * d + 2]
        assert max_diff(out.logits_per_image[d], block) <= 1e-4


def test_jit_over_mesh_matches_single_device(loaded):
    _, config, params = loaded
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    batch, px = text_batch(config.text, batch=8, seed=7), pixels(8, seed=7)
    full = dualenc.apply(params, config, **batch, pixel_values=px)
    data = NamedSharding(mesh, P("data"))
    sharded_batch = {k: jax.device_put(v, data) for k, v in batch.items()}
    sharded_px = jax.device_put(px, data)
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    out = jax.jit(dualenc.apply)(replicated, config, **sharded_batch, pixel_values=sharded_px)
    assert len(out.image_embeds.sharding.device_set) == 4
    assert max_diff(out.logits_per_image, full.logits_per_image) <= 1e-4


def test_scan_keeps_compiled_program_flat_in_depth(loaded):
    _, config, _ = loaded
    sizes = []
    for depth in (2, 12):
        deep = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_hidden_layers=depth),
                                   text=dataclasses.replace(config.text, num_hidden_layers=depth))
        params = jax.eval_shape(functools.partial(dualenc.init, stacked=True), jax.random.key(0), deep)
        batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in text_batch(deep.text).items()}
        lowered = jax.jit(dualenc.apply).lower(params, deep, **batch,
                                                pixel_values=jax.ShapeDtypeStruct((2, 3, 30, 30), jnp.float32))
        sizes.append(len(lowered.compile().as_text()))
    assert sizes[1] <= 1.05 * sizes[0], sizes
