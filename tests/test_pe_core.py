"""open_clip's Perception Encoder towers (PE-Core: timm's vit_pe_core_* Evas under timm_pool "map", timm_proj null,
with open_clip's own text transformer; dualenc.towers.eva, dualenc.formats.open_clip_eva): parity with open_clip, the
dual encoder folder it saves, its preprocessing (PE's mean / std 0.5, bilinear, squash) and tokenizer, training, the
CLI, and what stays refused.

open_clip passes timm only the model name, so the references are tiny timm Evas with PE's options built under test
names (timm's create_model patched, dualenc's name table given the same architectures): AttentionRope's fused qkv
with one bias, a LayerNorm before the blocks and a bias-free patch embedding, rotary embeddings over the grid offset
by 1 in "xy" order scaled to a non-square reference grid, the AttentionPoolLatent head with its own heads and MLP
ratio, timm's classifier as the embedding; and PE-Core-bigG's variant without a class token. The real
vit_pe_core_* names are checked against timm's own architectures in tests/test_eva.py (test_the_name_table_is_timms).
"""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import open_clip_towers as towers
import pytest
from conftest import max_diff
from safetensors.torch import save_file

import dualenc
from dualenc import model
from dualenc.formats import open_clip_eva
from dualenc.formats.open_clip_eva import Arch
from dualenc.towers import eva
from dualenc.towers.eva import EvaConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("pe_core")

IMAGE, EMBED, WIDTH, LENGTH = 32, 16, 32, 32
# patch, width, depth, heads, mlp ratio, mlp, scaled, post-norm, rope reference grid, image size, pool,
# class token, PE, rope grid offset, rope indexing, pool heads, pool mlp ratio
TINY = {"vit_pe_core_test": Arch(8, WIDTH, 2, 2, 3.0, "gelu", False, False, (5, 3), IMAGE, "map", True, True, 1.0,
                                 "xy", 4, 2.0),
        "vit_pe_core_test_nocls": Arch(8, WIDTH, 1, 2, 4.0, "gelu", False, False, (6, 6), IMAGE, "map", False, True,
                                       0.0, "xy", 8, 4.0)}
VISION = {"image_size": IMAGE, "timm_model_name": "vit_pe_core_test", "timm_model_pretrained": False,
          "timm_pool": "map", "timm_proj": None}
TEXT = {"context_length": LENGTH, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 1}
PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}  # _pecfg
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def tiny_names():
    """The test names in timm (create_model) and in dualenc's table, for this module's tests."""
    with towers.tiny_timm_names(open_clip_eva.EVA, TINY, pe_trunk):
        yield


def pe_trunk(a, **kw):
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    kw.setdefault("global_pool", a.pool)  # the vit_pe_core_* registrations' default
    return Eva(img_size=a.image_size, patch_size=a.patch, embed_dim=a.width, depth=a.depth, num_heads=a.heads,
               mlp_ratio=a.mlp_ratio, attn_type="rope", class_token=a.class_token, use_pre_transformer_norm=True,
               use_rot_pos_emb=True, ref_feat_shape=a.rope, rope_grid_offset=a.rope_offset,
               rope_grid_indexing=a.rope_indexing, attn_pool_num_heads=a.pool_heads,
               attn_pool_mlp_ratio=a.pool_mlp_ratio, norm_layer=partial(LayerNorm, eps=1e-5), **kw)


def model_cfg(**vision):
    return {"embed_dim": EMBED, "vision_cfg": {**VISION, **vision}, "text_cfg": dict(TEXT), "custom_text": True}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = model_cfg()
    ref = towers.build(cfg)
    return towers.reference(ref, towers.save(ref, cfg, tmp_path_factory.mktemp("pe") / "open_clip", PREPROCESS))


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference["path"])


def test_config_processing_and_parity_with_open_clip(reference, loaded):
    config, params = loaded
    v, t = config.vision, config.text
    assert config.model_type == "vision-text-dual-encoder" and isinstance(v, EvaConfig)
    assert (v.hidden_size, v.intermediate_size, v.mlp, v.scale_mlp, v.scale_attn_inner, v.post_norm, v.head_size) == (
        WIDTH, 96, "gelu", False, False, False, EMBED)
    assert (v.global_pool, v.pool_heads, v.pool_mlp_ratio, v.class_token, v.patch_bias, v.pre_norm, v.key_bias) == (
        "map", 4, 2.0, True, False, True, True)
    assert (v.ref_feat_shape, v.rope_grid_offset, v.rope_grid_indexing, v.layer_norm_eps) == ((5, 3), 1.0, "xy", 1e-5)
    assert (t.max_position_embeddings, t.num_hidden_layers) == (LENGTH, 1)
    np.testing.assert_array_equal(params["visual_projection"]["kernel"], np.eye(EMBED))
    processor = dualenc.Processor.from_pretrained(reference["path"])
    texts = [f"a photo of {label}" for label in LABELS] + ["a tree " * 20]
    batch = processor(text=texts, images=reference["photos"], max_length=LENGTH)
    assert max_diff(batch["pixel_values"], reference["pixels"]) < 1e-5  # real photos, open_clip's own transform
    np.testing.assert_array_equal(batch["input_ids"], reference["tokenizer"](texts).numpy())
    ids, pixels = batch["input_ids"][:3], reference["pixels"]
    ref = towers.open_clip_outputs(reference["model"], pixels, ids)
    run = jax.jit(dualenc.apply, static_argnames=("output_hidden_states", "dtype"))
    out = run(params, config, input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    diffs = dict(image=max_diff(out.image_embeds, ref["image"] / ref["image"].norm(dim=-1, keepdim=True)),
                 text=max_diff(out.text_embeds, ref["text"] / ref["text"].norm(dim=-1, keepdim=True)),
                 logits=max_diff(out.logits_per_image, ref["logits"]),
                 trunk=max_diff(out.vision_outputs.last_hidden_state, ref["trunk"]))
    assert len(out.vision_outputs.hidden_states) == 3
    stacked = jax.jit(dualenc.get_image_features)(model.stack_layers(params), config, pixels)  # lax.scan
    diffs["stacked"] = max_diff(stacked, ref["image"])
    bf16 = run(params, config, input_ids=ids, pixel_values=pixels, dtype=jnp.bfloat16)
    print(f"max |dualenc - open_clip| float32 {diffs}; bfloat16 logits "
          f"{max_diff(bf16.logits_per_image, ref['logits']):.3g}, image embeds "
          f"{max_diff(bf16.image_embeds, out.image_embeds):.3g}")
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_without_a_class_token_matches_open_clip(tmp_path):
    """PE-Core-bigG's variant: no class token (positions and rotary embeddings over the patches alone), the rope
    grid unshifted, the attention pool's MLP ratio apart from the blocks'."""
    cfg = model_cfg(timm_model_name="vit_pe_core_test_nocls")
    ref = towers.build(cfg, seed=1)
    assert ref.visual.trunk.cls_token is None and ref.visual.trunk.rope.grid_offset == 0.0
    config, params = dualenc.load_pretrained(towers.save(ref, cfg, tmp_path / "nocls", PREPROCESS))
    v = config.vision
    assert not v.class_token and v.prefix_tokens == 0 and v.rope_grid_offset == 0.0 and v.pool_heads == 8
    assert "cls" not in params["vision"]["embeddings"]
    pixels = np.random.default_rng(1).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    want = towers.open_clip_outputs(ref, pixels, np.zeros((1, LENGTH), np.int64))
    out = jax.jit(dualenc.get_image_features)(params, config, pixels)
    vision = jax.jit(eva.apply, static_argnums=1)(params["vision"], config.vision, pixels)
    diffs = dict(image=max_diff(out, want["image"]), trunk=max_diff(vision.last_hidden_state, want["trunk"]))
    print(f"max |dualenc - open_clip| float32, no class token: {diffs}")
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_train_step_save_load_and_zero_shot_command(reference, loaded, tmp_path, capsys, monkeypatch):
    """One train step with drop path (the text tower locked) moves the image tower, its attention pool included;
    save_pretrained writes dualenc's VisionTextDualEncoder layout (no transformers class holds PE: an "eva"
    vision_config with PE's options), read back equal; zero-shot runs on it with open_clip's probabilities."""
    from dualenc import train

    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")  # in this process: leave jax's settings alone
    config, params = loaded
    ids = reference["tokenizer"](LABELS).numpy()
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray((ids > 0).astype(np.int32)),
                 pixel_values=jnp.asarray(reference["pixels"]))
    dropping = dataclasses.replace(config, vision=dataclasses.replace(config.vision, drop_path_rate=0.2))
    optimizer = train.default_optimizer(1e-3, total_steps=2, warmup_steps=0)
    new, metrics = train.make_train_step(dropping, optimizer, locked=("text",), donate=False)(
        train.init_state(params, optimizer, locked=("text",), seed=0), batch)
    assert np.isfinite(float(metrics["loss"]))
    for path in (("embeddings", "cls"), ("pre_norm", "scale"), ("encoder", 0, "attention", "key", "bias"),
                 ("head", "probe"), ("head", "attention", "in_proj", "kernel"), ("head", "mlp", "fc2", "bias"),
                 ("head", "kernel")):
        before, after = params["vision"], new.trainable["vision"]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-6, path

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(reference["path"]))
    written = json.loads((folder / "config.json").read_text())["vision_config"]
    assert (written["model_type"], written["global_pool"], written["rope_grid_indexing"], written["pre_norm"]) == (
        "eva", "map", "xy", True)
    back_config, back = dualenc.load_pretrained(folder)
    assert back_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    towers.check_zero_shot_command(reference, folder, LABELS, tmp_path, capsys)


@pytest.mark.parametrize("vision,field", [
    (dict(timm_model_name="vit_pe_spatial_tiny_patch16_512"), "timm_model_name"),
    (dict(timm_pool="token"), "timm_pool"),
    (dict(timm_pool="avg"), "timm_pool"),
    (dict(timm_proj="linear"), "timm_proj"),
    (dict(timm_proj="none"), "timm_proj"),
    (dict(timm_drop=0.1), "timm_drop"),
    (dict(timm_drop_path=1.5), "timm_drop_path"),
    (dict(patch_dropout=0.5), "patch_dropout"),
    (dict(image_size=48), "image_size"),
])
def test_unimplemented_pe_configs_are_refused(vision, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(**vision)}))
    with pytest.raises(dualenc.ConfigError, match=field):
        dualenc.load_pretrained(tmp_path)


@pytest.mark.parametrize("fields,field", [
    (dict(global_pool="token", class_token=False), "global_pool"),
    (dict(global_pool="map", pool_heads=3), "pool_heads"),
    (dict(rope_grid_indexing="yx"), "rope_grid_indexing"),
])
def test_inconsistent_eva_configs_are_refused(fields, field):
    with pytest.raises(dualenc.ConfigError, match=field):
        EvaConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, **fields)


def test_a_pool_missing_a_tensor_is_refused(reference, tmp_path):
    tensors = {k: v.contiguous() for k, v in reference["model"].state_dict().items()}
    del tensors["visual.trunk.attn_pool.kv.bias"]
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match=r"attn_pool\.q\.bias|in_proj_bias"):
        dualenc.load_pretrained(tmp_path)
