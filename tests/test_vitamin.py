"""open_clip's timm ViTamin towers (dualenc.towers.vitamin, dualenc.formats.open_clip_vitamin): parity with open_clip,
the dual encoder folder it saves, its preprocessing and tokenizer, training, the CLI, and what stays refused.

open_clip passes timm only the model name, so the references are tiny timm ViTamins built under test names (timm's
create_model patched, dualenc's name table given the same architectures): one as vitamin_small..large2 (a position
table; the first stage's first block downsamples without widening, the second's widens its shortcut), one as the
xlarge models (no position table) run at an image size it was not built for, whose odd sides test the rounding of
every stride-2 convolution and of the average pool at the border. Every real name of the table is checked against
timm's own architecture on the meta device (shapes only), and every ViTamin config open_clip ships is read."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_diff
from open_clip_towers import (
    build, check_zero_shot_command, open_clip_outputs, reference as read_reference, save, tiny_timm_names)
from safetensors.torch import save_file

import dualenc
from dualenc import model, tables
from dualenc.formats import open_clip as open_clip_format, open_clip_timm, open_clip_vitamin
from dualenc.formats.open_clip_vitamin import Arch
from dualenc.towers import vitamin
from dualenc.towers.vitamin import VitaminConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("vitamin")

IMAGE, EMBED = 32, 16
TINY = {"vitamin_test": Arch(8, (8, 16), (2, 1), 32, 2, 2, 2.0, IMAGE, True),
        "vitamin_test_xl": Arch(8, (8, 16), (1, 1), 32, 1, 2, 2.0, IMAGE, False)}
VISION = {"image_size": IMAGE, "timm_model_name": "vitamin_test", "timm_model_pretrained": False, "timm_pool": "",
          "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def tiny_names():
    """The test names in timm (create_model) and in dualenc's table, for this module's tests."""
    with tiny_timm_names(open_clip_vitamin.VITAMIN, TINY, vitamin_trunk):
        yield


def vitamin_trunk(a, **kw):
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vitamin import GeGluMlp, MbConvStages, VitCfg, VitConvCfg

    cfg = VitCfg(embed_dim=(*a.stages, a.width), depths=(*a.stage_depths, 1), stem_width=a.stem,
                 conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    kw.setdefault("global_pool", "avg")  # the vitamin_* registrations' default
    return VisionTransformer(img_size=a.image_size, patch_size=1, embed_layer=partial(
        HybridEmbed, backbone=MbConvStages(cfg=cfg), proj=False), embed_dim=a.width, depth=a.depth,
        num_heads=a.heads, mlp_layer=GeGluMlp, mlp_ratio=a.mlp_ratio, class_token=False,
        pos_embed="learn" if a.position else "none", **kw)


def model_cfg(**vision):
    return {"embed_dim": EMBED, "vision_cfg": {**VISION, **vision}, "text_cfg": dict(TEXT), "custom_text": True}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = model_cfg()
    model = build(cfg)
    return read_reference(model, save(model, cfg, tmp_path_factory.mktemp("vitamin") / "open_clip"))


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference["path"])


def test_config_processing_and_parity_with_open_clip(reference, loaded):
    config, params = loaded
    v = config.vision
    assert config.model_type == "vision-text-dual-encoder" and isinstance(v, VitaminConfig)
    assert (v.hidden_size, v.intermediate_size, v.stem_size, v.stage_sizes, v.stage_depths, v.position_embedding,
            v.side, v.drop_path_rate) == (32, 64, 8, (8, 16), (2, 1), True, 2, 0.1)
    assert "shortcut" not in params["vision"]["embeddings"]["stages"]["0"]["0"]  # 8 -> 8: the pool alone
    assert params["visual_projection"]["kernel"].shape == (32, EMBED)
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


def test_no_position_table_at_another_image_size_matches_open_clip(tmp_path):
    """As ViTamin-XL-384 (built for 384 px, run at its config's 256): no position table, so open_clip runs the
    vision_cfg's image size; 40 px halves to 20, 10, 5, then 3 (odd sides at the stride-2 convolutions and pools)."""
    cfg = model_cfg(timm_model_name="vitamin_test_xl", image_size=40, timm_pool="avg")
    ref = build(cfg, seed=1)
    assert ref.visual.trunk.pos_embed is None
    config, params = dualenc.load_pretrained(save(ref, cfg, tmp_path / "xl"))
    v = config.vision
    assert not v.position_embedding and v.image_size == 40 and v.side == 3 and "position" not in \
        params["vision"]["embeddings"]
    pixels = np.random.default_rng(1).standard_normal((2, 3, 40, 40)).astype(np.float32)
    want = open_clip_outputs(ref, pixels, np.zeros((1, 77), np.int64))
    out = jax.jit(dualenc.get_image_features)(params, config, pixels)
    trunk = jax.jit(vitamin.apply, static_argnums=1)(params["vision"], v, pixels).last_hidden_state
    assert max_diff(out, want["image"]) < 1e-5 and max_diff(trunk, want["trunk"]) < 1e-5


def test_train_step_save_load_and_zero_shot_command(reference, loaded, tmp_path, capsys, monkeypatch):
    """One train step with drop path (the text tower locked) moves the image tower; save_pretrained writes
    dualenc's VisionTextDualEncoder layout (no transformers class holds a ViTamin: a "vitamin" vision_config,
    timm's names), read back equal; zero-shot runs on it with open_clip's probabilities."""
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
    for path in (("embeddings", "stem", "conv1", "kernel"), ("embeddings", "stages", "1", "0", "shortcut", "kernel"),
                 ("embeddings", "position"), ("encoder", 1, "mlp", "gate", "kernel"), ("post_norm", "scale")):
        before, after = params["vision"], new.trainable["vision"]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-6, path

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(reference["path"]))
    written = json.loads((folder / "config.json").read_text())
    assert written["vision_config"]["model_type"] == "vitamin" and written["vision_config"]["stage_sizes"] == [8, 16]
    back_config, back = dualenc.load_pretrained(folder)
    assert back_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    check_zero_shot_command(reference, folder, LABELS, tmp_path, capsys)


@pytest.mark.parametrize("name", [n for n in open_clip_vitamin.VITAMIN if n not in TINY])
def test_the_name_table_is_timms(name):
    """Each real name's architecture (on the meta device: shapes only, built as open_clip builds it) gives exactly
    the tensors and shapes dualenc's config for that name declares, with the same eps, grid, activations and
    pooling."""
    import timm

    arch = open_clip_vitamin.VITAMIN[name]
    with torch.device("meta"):
        trunk = timm.create_model(name)
        trunk.reset_classifier(0)  # open_clip's timm_proj "linear" with timm_pool ""
    config = open_clip_timm.vision_config({"timm_model_name": name, "timm_pool": "", "timm_proj": "linear",
                                           "image_size": arch.image_size}, EMBED, "test")
    backbone = trunk.patch_embed.backbone
    norms = [trunk.fc_norm, trunk.blocks[0].norm1, trunk.blocks[0].mlp.norm, backbone.stem.norm1,
             backbone.stages[0][0].pre_norm, backbone.pool.norm]
    assert {n.eps for n in norms} == {config.layer_norm_eps}
    assert trunk.global_pool == "avg" and isinstance(trunk.norm, torch.nn.Identity) and trunk.num_prefix_tokens == 0
    assert trunk.patch_embed.grid_size == (config.side,) * 2
    assert trunk.blocks[0].mlp.act.approximate == "none" and trunk.blocks[0].attn.scale == \
        (config.hidden_size // config.num_attention_heads) ** -0.5
    assert (trunk.pos_embed is not None) == config.position_embedding
    tensors = {"visual.trunk." + k: np.broadcast_to(np.float32(0), v.shape) for k, v in trunk.state_dict().items()}
    table = {e.hf: e for e in vitamin.table(config)}
    got, blocks = {}, set()
    for key, value in open_clip_vitamin.prepare(tensors, "test").items():
        renamed, array = open_clip_vitamin.tensor(key, value, "test")
        block = re.match(r"vision_model\.blocks\.(\d+)\.", renamed)
        blocks.add(block and int(block[1]))
        entry = table[re.sub(r"^blocks\.\d+\.", "blocks.{i}.", renamed[len("vision_model."):])]
        got[entry.path] = tables.TO_PARAM[entry.kind](array).shape
    assert got == {p.path: p.shape for p in vitamin.specs(config)}
    assert blocks == {None, *range(config.num_hidden_layers)}


def test_open_clips_vitamin_configs_read():
    """Every ViTamin config open_clip ships reads (its vision tower the name's architecture at the config's
    image size, drop path 0.1, the Linear head as visual_projection)."""
    import open_clip
    from open_clip.factory import get_model_config

    names = [n for n in open_clip.list_models() if n.startswith("ViTamin-")]
    assert len(names) == 15
    for name in names:
        cfg = get_model_config(name)
        config = open_clip_format.config_from_dict({"model_cfg": cfg})
        v, arch = config.vision, open_clip_vitamin.VITAMIN[cfg["vision_cfg"]["timm_model_name"]]
        assert isinstance(v, VitaminConfig) and config.projection_dim == cfg["embed_dim"], name
        assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.drop_path_rate) == \
            (arch.width, arch.depth, cfg["vision_cfg"]["image_size"], 0.1), name


@pytest.mark.parametrize("vision,field", [
    (dict(timm_model_name="vitamin_tiny_224"), "timm_model_name"),
    (dict(timm_pool="token"), "timm_pool"),
    (dict(timm_pool="map"), "timm_pool"),
    (dict(timm_proj=None), "timm_proj"),
    (dict(timm_proj="mlp"), "timm_proj"),
    (dict(timm_proj="none"), "timm_proj"),
    (dict(timm_proj_bias=True), "timm_proj_bias"),
    (dict(timm_drop=0.1), "timm_drop"),
    (dict(timm_drop_path=1.5), "timm_drop_path"),
    (dict(patch_dropout=0.5), "patch_dropout"),
    (dict(image_size=48), "image_size"),
    (dict(image_size=[32, 48]), "image_size"),
])
def test_unimplemented_vitamin_configs_are_refused(vision, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(**vision)}))
    with pytest.raises(dualenc.ConfigError, match=f"'{field}'"):
        dualenc.load_pretrained(tmp_path)


def test_missing_and_unknown_tensors_are_refused(reference, tmp_path):
    tensors = {k: v.contiguous() for k, v in reference["model"].state_dict().items()}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    tensors["visual.trunk.norm_pre.weight"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="norm_pre"):
        dualenc.load_pretrained(tmp_path)
    del tensors["visual.trunk.norm_pre.weight"]
    del tensors["visual.trunk.patch_embed.backbone.stages.1.0.shortcut.expand.bias"]
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match=r"stages\.1\.0\.shortcut\.expand\.bias"):
        dualenc.load_pretrained(tmp_path)
