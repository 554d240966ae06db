"""open_clip's timm ConvNeXt image towers (dualenc.towers.convnext): parity with open_clip, the dual encoder and
transformers folder it converts to, its preprocessing and tokenizer, training, the CLI, and what stays refused.

open_clip passes timm only the model name, so the references are tiny timm ConvNeXts built under test names (timm's
create_model patched, dualenc's name table given the same architectures): one with Linear MLPs, one with timm's
1x1-convolution MLPs and LayerNorm eps 1e-5 (as convnext_xxlarge). Every real name of the table is checked against
timm's own architecture, on the meta device (shapes only)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import open_clip_towers as towers
from conftest import _transformers, max_diff
from safetensors.torch import save_file

import dualenc
from dualenc import tables
from dualenc.formats import open_clip_timm
from dualenc.towers import convnext
from dualenc.towers.convnext import ConvNextConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("convnext")

IMAGE, EMBED = 32, 16
# name -> (depths, widths, eps, conv_mlp): the test architectures, for timm and for dualenc's table
TINY = {"convnext_test": ((1, 1, 1, 1), (8, 16, 24, 32), 1e-6, False),
        "convnext_test_conv": ((1, 1, 2, 1), (8, 16, 16, 24), 1e-5, True)}
VISION = {"timm_model_name": "convnext_test", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
          "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": IMAGE}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def tiny_names():
    """The test names in timm (create_model) and in dualenc's table, for this module's tests."""
    table_rows = {name: (depths, dims, eps) for name, (depths, dims, eps, _) in TINY.items()}
    with towers.tiny_timm_names(open_clip_timm.CONVNEXT, TINY, convnext_trunk, table_rows):
        yield


def convnext_trunk(row, **kw):
    from timm.models.convnext import ConvNeXt

    depths, dims, eps, conv_mlp = row
    return ConvNeXt(depths=depths, dims=dims, norm_eps=eps, conv_mlp=conv_mlp, **kw)


def model_cfg(**vision):
    return {"embed_dim": EMBED, "vision_cfg": {**VISION, **vision}, "text_cfg": dict(TEXT)}


build, save = towers.build, towers.save


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = model_cfg()
    model = build(cfg)
    return towers.reference(model, save(model, cfg, tmp_path_factory.mktemp("convnext") / "open_clip"))


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference["path"])


open_clip_outputs = towers.open_clip_outputs


def test_config_processing_and_parity_with_open_clip(reference, loaded):
    config, params = loaded
    v = config.vision
    assert config.model_type == "vision-text-dual-encoder" and isinstance(v, ConvNextConfig)
    assert (v.hidden_sizes, v.depths, v.norm_eps, v.layer_norm_eps, v.head_hidden_size) == (
        (8, 16, 24, 32), (1, 1, 1, 1), 1e-6, 1e-6, None)
    assert v.drop_path_rate == pytest.approx(0.1) and config.projection_dim == EMBED
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
    assert len(out.vision_outputs.hidden_states) == 5
    assert max_diff(out.vision_outputs.hidden_states[-1], ref["trunk"]) == diffs["trunk"]
    bf16 = run(params, config, input_ids=ids, pixel_values=pixels, dtype=jnp.bfloat16)
    print(f"max |dualenc - open_clip| float32 {diffs}; bfloat16 logits "
          f"{max_diff(bf16.logits_per_image, ref['logits']):.3g}")
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_conv_mlp_eps_and_the_mlp_head_match_open_clip(tmp_path):
    """timm's 1x1-convolution MLPs, LayerNorm eps 1e-5 and open_clip's "mlp" head (its first Linear the tower's
    head, its last the visual projection), on an image of another size (no position table: any size runs)."""
    cfg = model_cfg(timm_model_name="convnext_test_conv", timm_proj="mlp")
    model = build(cfg, seed=1)
    assert model.visual.trunk.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
    config, params = dualenc.load_pretrained(save(model, cfg, tmp_path / "mlp"))
    assert config.vision.head_hidden_size == 2 * EMBED and config.vision.norm_eps == 1e-5
    assert params["visual_projection"]["kernel"].shape == (2 * EMBED, EMBED)
    pixels = np.random.default_rng(1).standard_normal((2, 3, IMAGE + 8, IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode_image(torch.tensor(pixels))
    assert max_diff(jax.jit(dualenc.get_image_features)(params, config, pixels), ref) < 1e-5


def test_saved_folder_loads_back_and_into_transformers(reference, loaded, tmp_path):
    """No transformers CLIP class holds a ConvNeXt: save_pretrained writes a VisionTextDualEncoderModel (ConvNextModel
    + CLIPTextModel), which dualenc reads back equal and transformers loads with open_clip's logits."""
    config, params = loaded
    dualenc.save_pretrained(tmp_path / "hf", config, params)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["VisionTextDualEncoderModel"]
    assert written["vision_config"]["model_type"] == "convnext" and written["vision_config"]["hidden_size"] == 32
    back_config, back = dualenc.load_pretrained(tmp_path / "hf")
    assert back_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    tf = _transformers()
    hf, info = tf.VisionTextDualEncoderModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = reference["tokenizer"](LABELS).numpy()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(reference["pixels"]))
    ref = open_clip_outputs(reference["model"], reference["pixels"], ids)
    assert max_diff(theirs.logits_per_image, ref["logits"]) < 1e-5


def test_train_step_and_zero_shot_command(reference, loaded, tmp_path, capsys, monkeypatch):
    from dualenc import train

    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")  # in this process: leave jax's settings alone
    config, params = loaded
    ids = reference["tokenizer"](LABELS).numpy()
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray((ids > 0).astype(np.int32)),
                 pixel_values=jnp.asarray(reference["pixels"]))
    optimizer = train.default_optimizer(1e-3, total_steps=2, warmup_steps=0)
    state = train.init_state(params, optimizer, seed=0)
    new, metrics = train.make_train_step(config, optimizer, donate=False)(state, batch)  # drop path at 0.1
    assert np.isfinite(float(metrics["loss"]))
    for path in (("embeddings", "patch", "kernel"), ("stages", "3", "blocks", "0", "dwconv", "kernel")):
        before, after = params["vision"], new.trainable["vision"]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-5, path

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(reference["path"]))
    towers.check_zero_shot_command(reference, folder, LABELS, tmp_path, capsys)


@pytest.mark.parametrize("name", [n for n in open_clip_timm.CONVNEXT if n not in TINY])
def test_the_name_table_is_timms(name):
    """Each real name's architecture (on the meta device: shapes only) gives exactly the tensors, shapes and eps
    dualenc's config for that name declares."""
    import timm

    with torch.device("meta"):
        trunk = timm.create_model(name, num_classes=0)
    config = open_clip_timm.vision_config({"timm_model_name": name}, EMBED, "test")
    assert trunk.stages[0].blocks[0].norm.eps == config.norm_eps and trunk.head.norm.eps == config.layer_norm_eps
    table = {e.hf: e for e in convnext.table(config)}
    shapes = {p.path: p.full_shape for p in convnext.specs(config)}
    got = {}
    for key, value in trunk.state_dict().items():
        renamed, array = open_clip_timm.transformers_name("visual.trunk." + key,
                                                          np.broadcast_to(np.float32(0), value.shape), name, "test")
        entry = table[renamed[len("vision_model."):]]
        got[entry.path] = tables.TO_PARAM[entry.kind](array).shape
    assert got == shapes


@pytest.mark.parametrize("vision,field", [
    (dict(timm_model_name="vit_base_patch16_224"), "timm_model_name"),
    (dict(timm_model_name="convnext_tiny_hnf"), "timm_model_name"),
    (dict(timm_model_name="convnextv2_atto"), "timm_model_name"),
    (dict(timm_proj="none"), "timm_proj"),
    (dict(timm_proj_bias=True), "timm_proj_bias"),
    (dict(timm_pool="max"), "timm_pool"),
    (dict(timm_drop=0.1), "timm_drop"),
    (dict(timm_drop_path=1.5), "timm_drop_path"),
    (dict(patch_dropout=0.5), "patch_dropout"),
    (dict(image_size=[32, 48]), "image_size"),
    (dict(attn_pooler="yes"), "attn_pooler"),
])
def test_unimplemented_timm_configs_are_refused(vision, field, tmp_path):
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
    del tensors["visual.trunk.norm_pre.weight"], tensors["visual.trunk.stages.2.blocks.0.gamma"]
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(dualenc.CheckpointError, match="stages.2.layers.0.layer_scale_parameter"):
        dualenc.load_pretrained(tmp_path)
