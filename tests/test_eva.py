"""open_clip's timm EVA image towers (dualenc.towers.eva, dualenc.formats.open_clip_eva): parity with open_clip, the
dual encoder folder it saves, its preprocessing and tokenizer, training, the CLI, and what stays refused.

open_clip passes timm only the model name, so the references are tiny timm Evas built under test names (timm's
create_model patched, dualenc's name table given the same architectures): one with eva02_*_clip's options (rotary
embeddings scaled to a reference grid, SwiGLU with its inner LayerNorm, the attention's inner LayerNorm, split q/k/v,
timm's classifier as the embedding), one with EVA02-E's (post-norm blocks, fused qkv with q_bias / v_bias, a GELU MLP,
no rotary embedding) under open_clip's "linear" head. Every real name of the table is checked against timm's own
architecture on the meta device (shapes only)."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import open_clip_towers as towers
from conftest import max_diff
from safetensors.torch import save_file

import dualenc
from dualenc import model, tables
from dualenc.formats import open_clip_eva, open_clip_timm
from dualenc.formats.open_clip_eva import Arch
from dualenc.towers import eva
from dualenc.towers.eva import EvaConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("eva")

IMAGE, EMBED = 32, 16
TINY = {"eva02_test": Arch(8, 32, 2, 2, 4 * 2 / 3, "swiglu", True, False, (5, 5), IMAGE),
        "eva02_test_post": Arch(8, 32, 2, 2, 3.0, "gelu", False, True, None, IMAGE)}
VISION = {"image_size": IMAGE, "timm_model_name": "eva02_test", "timm_model_pretrained": False, "timm_pool": "token",
          "timm_proj": None}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def tiny_names():
    """The test names in timm (create_model) and in dualenc's table, for this module's tests."""
    with towers.tiny_timm_names(open_clip_eva.EVA, TINY, eva_trunk):
        yield


def eva_trunk(a, **kw):
    from timm.models.eva import Eva

    kw.setdefault("global_pool", "token")  # the eva02_*_clip registrations' default
    return Eva(img_size=a.image_size, patch_size=a.patch, embed_dim=a.width, depth=a.depth, num_heads=a.heads,
               mlp_ratio=a.mlp_ratio, swiglu_mlp=a.mlp == "swiglu", scale_mlp=a.scaled, scale_attn_inner=a.scaled,
               use_post_norm=a.post_norm, use_rot_pos_emb=a.rope is not None, ref_feat_shape=a.rope,
               qkv_fused=a.post_norm, **kw)


def model_cfg(**vision):
    return {"embed_dim": EMBED, "vision_cfg": {**VISION, **vision}, "text_cfg": dict(TEXT), "custom_text": True}


build, save = towers.build, towers.save


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The open_clip model, its folder, its own transform and tokenizer (open_clip reading the folder), photos."""
    cfg = model_cfg()
    model = build(cfg)
    return towers.reference(model, save(model, cfg, tmp_path_factory.mktemp("eva") / "open_clip"))


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference["path"])


open_clip_outputs = towers.open_clip_outputs


def test_config_processing_and_parity_with_open_clip(reference, loaded):
    config, params = loaded
    v = config.vision
    assert config.model_type == "vision-text-dual-encoder" and isinstance(v, EvaConfig)
    assert (v.hidden_size, v.intermediate_size, v.mlp, v.scale_mlp, v.scale_attn_inner, v.rope, v.ref_feat_shape,
            v.head_size, v.post_norm) == (32, 85, "swiglu", True, True, True, (5, 5), EMBED, False)
    np.testing.assert_array_equal(params["visual_projection"]["kernel"], np.eye(EMBED))
    processor = dualenc.Processor.from_pretrained(reference["path"])
    texts = [f"a photo of {label}" for label in LABELS]
    batch = processor(text=texts, images=reference["photos"], max_length=77)
    assert max_diff(batch["pixel_values"], reference["pixels"]) < 1e-5  # real photos, open_clip's own transform
    np.testing.assert_array_equal(batch["input_ids"], reference["tokenizer"](texts).numpy())
    ids, pixels = batch["input_ids"], reference["pixels"]
    ref = open_clip_outputs(reference["model"], pixels, ids)
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


def test_post_norm_fused_qkv_and_the_linear_head_match_open_clip(tmp_path):
    """EVA02-E's block (post-norm, fused qkv with q_bias / v_bias, GELU MLP, no rotary embedding) under open_clip's
    bias-free "linear" head, which becomes the visual projection."""
    cfg = model_cfg(timm_model_name="eva02_test_post", timm_proj="linear")
    ref = build(cfg, seed=1)
    assert ref.visual.trunk.blocks[0].attn.qkv is not None
    config, params = dualenc.load_pretrained(save(ref, cfg, tmp_path / "post"))
    v = config.vision
    assert v.post_norm and not v.rope and v.mlp == "gelu" and v.head_size is None
    assert params["visual_projection"]["kernel"].shape == (32, EMBED)
    pixels = np.random.default_rng(1).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        want = ref.encode_image(torch.tensor(pixels))
    assert max_diff(jax.jit(dualenc.get_image_features)(params, config, pixels), want) < 1e-5


def test_train_step_save_load_and_zero_shot_command(reference, loaded, tmp_path, capsys, monkeypatch):
    """One train step with drop path (the text tower locked) moves the image tower; save_pretrained writes
    dualenc's VisionTextDualEncoder layout (no transformers class holds an EVA: an "eva" vision_config, timm's
    names), read back equal; zero-shot runs on it with open_clip's probabilities."""
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
    for path in (("embeddings", "cls"), ("encoder", 0, "attention", "key", "kernel"),
                 ("encoder", 1, "mlp", "gate", "kernel"), ("head", "bias")):
        before, after = params["vision"], new.trainable["vision"]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-6, path

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(reference["path"]))
    written = json.loads((folder / "config.json").read_text())
    assert written["vision_config"]["model_type"] == "eva" and written["vision_config"]["ref_feat_shape"] == [5, 5]
    back_config, back = dualenc.load_pretrained(folder)
    assert back_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    towers.check_zero_shot_command(reference, folder, LABELS, tmp_path, capsys)


@pytest.mark.parametrize("name", [n for n in open_clip_eva.EVA if n not in TINY])
def test_the_name_table_is_timms(name):
    """Each real name's architecture (on the meta device: shapes only, built as open_clip builds it) gives exactly
    the tensors and shapes dualenc's config for that name declares, and the same rotary settings and eps."""
    import timm

    pool = open_clip_eva.EVA[name].pool  # "token" (EVA), "map" (PE-Core)
    with torch.device("meta"):
        trunk = timm.create_model(name, num_classes=EMBED, global_pool=pool)
    config = open_clip_timm.vision_config({"timm_model_name": name, "timm_pool": pool, "timm_proj": None,
                                           "image_size": open_clip_eva.EVA[name].image_size}, EMBED, "test")
    assert trunk.blocks[0].norm1.eps == config.layer_norm_eps and trunk.patch_embed.grid_size == config.grid
    assert trunk.num_prefix_tokens == config.prefix_tokens
    if pool == "map":
        assert trunk.attn_pool.num_heads == config.pool_heads and trunk.attn_pool.norm.eps == config.layer_norm_eps
    rope = trunk.rope
    assert (rope is not None) == config.rope
    if rope is not None:
        assert (tuple(rope.ref_feat_shape), rope.temperature, rope.in_pixels, rope.grid_indexing, rope.grid_offset,
                rope.rotate_half) == (config.ref_feat_shape, config.rope_temperature, False,
                                      config.rope_grid_indexing, config.rope_grid_offset, False)
    tensors = {"visual.trunk." + k: np.broadcast_to(np.float32(0), v.shape) for k, v in trunk.state_dict().items()}
    table = {e.hf: e for e in eva.table(config)}
    got, blocks = {}, set()
    for key, value in open_clip_eva.prepare(tensors, "test").items():
        renamed, array = open_clip_eva.tensor(key, value, "test")
        if renamed == "visual_projection.weight":
            assert array.shape == (EMBED, EMBED)
            continue
        block = re.match(r"vision_model\.blocks\.(\d+)\.", renamed)
        blocks.add(block and int(block[1]))
        entry = table[re.sub(r"^blocks\.\d+\.", "blocks.{i}.", renamed[len("vision_model."):])]
        got[entry.path] = tables.TO_PARAM[entry.kind](array).shape
    assert got == {p.path: p.shape for p in eva.specs(config)}
    assert blocks == {None, *range(config.num_hidden_layers)}


@pytest.mark.parametrize("vision,field", [
    (dict(timm_model_name="eva02_tiny_patch14_224"), "timm_model_name"),
    (dict(timm_pool="avg"), "timm_pool"),
    (dict(timm_proj="mlp"), "timm_proj"),
    (dict(timm_proj="none"), "timm_proj"),
    (dict(timm_proj="linear", timm_proj_bias=True), "timm_proj_bias"),
    (dict(timm_drop=0.1), "timm_drop"),
    (dict(timm_drop_path=1.5), "timm_drop_path"),
    (dict(patch_dropout=0.5), "patch_dropout"),
    (dict(image_size=48), "image_size"),
])
def test_unimplemented_eva_configs_are_refused(vision, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(**vision)}))
    with pytest.raises(dualenc.ConfigError, match=field):
        dualenc.load_pretrained(tmp_path)


def test_missing_and_unknown_tensors_are_refused(reference, tmp_path):
    tensors = {k: v.contiguous() for k, v in reference["model"].state_dict().items()}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    tensors["visual.trunk.norm_pre.weight"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="norm_pre"):
        dualenc.load_pretrained(tmp_path)
    del tensors["visual.trunk.norm_pre.weight"], tensors["visual.trunk.blocks.1.mlp.norm.bias"]
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match=r"blocks\.1\.mlp\.norm\.bias"):
        dualenc.load_pretrained(tmp_path)
