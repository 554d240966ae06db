"""big_vision SigLIP .npz checkpoints: parity with open_clip's load_big_vision_weights (a timm MAP ViT + open_clip
text tower), the transformers SiglipModel it converts to, and strict refusal of bad files; SigLIP 2 NaFlex files
against timm's NaFlexVit (its own big_vision .npz loader) and the transformers Siglip2Model they convert to."""

import pickle
import unittest.mock
import zipfile

import jax
import numpy as np
import pytest
import torch

import dualenc
from conftest import _transformers, max_diff
from dualenc.errors import CheckpointError, ConfigError
from dualenc import load_big_vision

# Vision and text towers of different widths, heads, MLPs and depths, so that no mix-up goes unseen; the text
# head projects to the image width (as SigLIP 2 g-opt's does).
D, HEADS, MLP, DEPTH, PATCH, GRID = 32, 4, 37, 2, 8, 3
TD, THEADS, TMLP, TDEPTH, VOCAB, LENGTH = 24, 2, 36, 3, 50, 8
IMAGE = PATCH * GRID
NAFLEX_GRID = 4  # the NaFlex position grid: resized up and down to the images' grids


def _block(rng, d, heads, m):
    hd = d // heads
    n = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    out = {"LayerNorm_0/scale": 1 + n(d), "LayerNorm_0/bias": n(d), "LayerNorm_1/scale": 1 + n(d),
           "LayerNorm_1/bias": n(d), "MlpBlock_0/Dense_0/kernel": n(d, m), "MlpBlock_0/Dense_0/bias": n(m),
           "MlpBlock_0/Dense_1/kernel": n(m, d), "MlpBlock_0/Dense_1/bias": n(d)}
    for name in ("query", "key", "value"):
        out[f"MultiHeadDotProductAttention_0/{name}/kernel"] = n(d, heads, hd)
        out[f"MultiHeadDotProductAttention_0/{name}/bias"] = n(heads, hd)
    out["MultiHeadDotProductAttention_0/out/kernel"] = n(heads, hd, d)
    out["MultiHeadDotProductAttention_0/out/bias"] = n(d)
    return out


def big_vision_tensors(seed=0, scanned=False, prefix="", d=D, heads=HEADS, mlp=MLP, depth=DEPTH, td=TD,
                       theads=THEADS, tmlp=TMLP, tdepth=TDEPTH):
    """A random two_towers SigLIP checkpoint, named as big_vision's vit.py / text_transformer.py / two_towers.py."""
    rng = np.random.default_rng(seed)
    n = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    out = {"img/embedding/kernel": n(PATCH, PATCH, 3, d), "img/embedding/bias": n(d),
           "img/pos_embedding": n(1, GRID * GRID, d), "img/Transformer/encoder_norm/scale": 1 + n(d),
           "img/Transformer/encoder_norm/bias": n(d), "img/MAPHead_0/probe": n(1, 1, d),
           "txt/Embed_0/embedding": n(VOCAB, td), "txt/pos_embedding": n(1, LENGTH, td),
           "txt/Encoder_0/encoder_norm/scale": 1 + n(td), "txt/Encoder_0/encoder_norm/bias": n(td),
           "txt/head/kernel": n(td, d), "txt/head/bias": n(d),
           "t": np.array([2.1], np.float32), "b": np.array([-1.7], np.float32)}
    out.update({f"img/MAPHead_0/{k}": v for k, v in _block(rng, d, heads, mlp).items()
                if not k.startswith("LayerNorm_1")})
    for enc, (dd, hh, mm, depth_) in (("img/Transformer/", (d, heads, mlp, depth)),
                                      ("txt/Encoder_0/", (td, theads, tmlp, tdepth))):
        blocks = [_block(rng, dd, hh, mm) for _ in range(depth_)]
        if scanned:  # big_vision's pyloop_to_scan: one encoderblock, every leaf stacked on axis 0
            out.update({f"{enc}encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
        else:
            out.update({f"{enc}encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    return {prefix + k: v for k, v in out.items()}


def naflex_tensors(seed=0, scanned=True, prefix="params/"):
    """A random SigLIP 2 NaFlex checkpoint (big_vision naflex_vit.py): a Dense patch embedding over (row, column,
    channel)-flattened patches and a (G, G, D) learn_2d position grid; the rest as SigLIP's."""
    out = big_vision_tensors(seed, scanned, prefix)
    rng = np.random.default_rng(seed + 100)
    out[f"{prefix}img/embedding/kernel"] = (0.1 * rng.standard_normal((PATCH * PATCH * 3, D))).astype(np.float32)
    out[f"{prefix}img/pos_embedding"] = (0.3 * rng.standard_normal((NAFLEX_GRID, NAFLEX_GRID, D))).astype(np.float32)
    return out


def naflex_batch(seed=0):
    """Random photos of four aspect ratios (wide, tall, square, tiny) patchified by dualenc's NaFlex processor."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(20, 70, 3), (50, 13, 3), (33, 33, 3), (7, 9, 3)]]
    batch = dualenc.NaFlexImageProcessor(patch_size=PATCH, max_num_patches=30)(images)
    assert len({tuple(s) for s in batch["spatial_shapes"]}) == 4
    return batch


def fused(tensors):
    """The same per-layer checkpoint with fused (D, D) attention kernels, from which heads cannot be read."""
    def fuse(name, v):
        if "MultiHeadDotProductAttention" not in name or name.endswith("out/bias"):
            return v
        if name.endswith("out/kernel"):
            return v.reshape(-1, v.shape[-1])  # (heads, head_dim, D) -> (D, D)
        return v.reshape(v.shape[0], -1) if name.endswith("kernel") else v.reshape(-1)

    return {k: fuse(k, v) for k, v in tensors.items()}


def save(tmp_path, tensors, name="ckpt.npz"):
    path = str(tmp_path / name)
    np.savez(path, **tensors)
    return path


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, VOCAB, (3, LENGTH)),
            rng.standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("big_vision")
    return {"per-layer": save(root, big_vision_tensors(), "per_layer.npz"),
            "scanned": save(root, big_vision_tensors(scanned=True, prefix="params/"), "scanned.npz")}


def open_clip_model(path):
    """open_clip's CustomTextCLIP with a timm SigLIP ViT (MAP pooling, tanh GELU), loaded by
    open_clip.convert.load_big_vision_weights."""
    import open_clip
    import timm
    from open_clip.convert import load_big_vision_weights
    from timm.models.vision_transformer import VisionTransformer

    def tiny_vit(name, pretrained=False, **kw):  # timm.create_model for open_clip's TimmModel
        return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                 mlp_ratio=MLP / D, class_token=False, act_layer="gelu_tanh", **kw)

    vision = dict(image_size=IMAGE, timm_model_name="tiny_siglip", timm_model_pretrained=False, timm_pool="map",
                  timm_proj="none")
    text = dict(context_length=LENGTH, vocab_size=VOCAB, width=TD, heads=THEADS, layers=TDEPTH, mlp_ratio=TMLP / TD,
                no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6},
                act_kwargs={"approximate": "tanh"})
    with unittest.mock.patch.object(timm, "create_model", tiny_vit):
        model = open_clip.CustomTextCLIP(D, vision, text, init_logit_bias=-10.0)
    load_big_vision_weights(model, path)
    return model.eval()


@pytest.fixture(scope="module")
def reference(files):
    """open_clip's embeddings and logits for each layout (both files hold the same numbers)."""
    ids, images = inputs()
    out = {}
    for layout, path in files.items():
        model = open_clip_model(path)
        with torch.no_grad():
            img = model.encode_image(torch.tensor(images), normalize=True)
            txt = model.encode_text(torch.tensor(ids), normalize=True)
            logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
        out[layout] = dict(image_embeds=img, text_embeds=txt, logits_per_image=logits)
    return out


def test_config_read_from_shapes(files):
    for path in files.values():
        config, params = load_big_vision(path)
        v, t = config.vision, config.text
        assert config.model_type == "siglip" and config.projection_dim == D
        assert (v.hidden_size, v.num_attention_heads, v.intermediate_size, v.num_hidden_layers) == (D, HEADS, MLP,
                                                                                                    DEPTH)
        assert (v.image_size, v.patch_size, v.num_channels) == (IMAGE, PATCH, 3)
        assert (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.num_hidden_layers) == (TD, THEADS, TMLP,
                                                                                                    TDEPTH)
        assert (t.vocab_size, t.max_position_embeddings, t.projection_size) == (VOCAB, LENGTH, D)
        assert v.layer_norm_eps == t.layer_norm_eps == 1e-6
        assert v.hidden_act == t.hidden_act == "gelu_pytorch_tanh"  # flax's nn.gelu is the tanh approximation
        assert float(params["logit_scale"]) == pytest.approx(2.1) and float(params["logit_bias"]) == pytest.approx(-1.7)
        assert isinstance(params["vision"]["encoder"], tuple) and len(params["text"]["encoder"]) == TDEPTH


@pytest.mark.parametrize("layout,stacked", [("per-layer", False), ("scanned", True)])
def test_matches_open_clip(files, reference, layout, stacked):
    config, params = load_big_vision(files[layout], stacked=stacked)
    ids, images = inputs()
    out = jax.jit(dualenc.apply)(params, config, input_ids=ids, pixel_values=images)
    ref = reference[layout]
    diffs = {k: max_diff(getattr(out, k), ref[k]) for k in ref}
    print(f"{layout}: max |dualenc - open_clip| {diffs}")
    assert all(d < 1e-5 for d in diffs.values()), diffs
    assert max_diff(out.logits_per_text, ref["logits_per_image"].T) < 1e-5
    assert max_diff(reference["per-layer"]["logits_per_image"], ref["logits_per_image"]) < 1e-6


def test_saved_directory_loads_in_transformers(files, reference, tmp_path):
    tf = _transformers()
    config, params = load_big_vision(files["scanned"])
    path = dualenc.save_pretrained(tmp_path / "hf", config, params)
    model, info = tf.SiglipModel.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, images = inputs()
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images))
    diff = max_diff(out.logits_per_image.numpy(), reference["scanned"]["logits_per_image"])
    print(f"max |transformers - open_clip| logits {diff}")
    assert diff < 1e-5
    config2, params2 = dualenc.load_pretrained(path)
    assert config2.vision == config.vision and config2.text == config.text


def test_bfloat16_and_fused_kernels_load_the_same_numbers(files, tmp_path):
    """numpy saves bfloat16 as 2-byte void (read back as bfloat16); fused (D, D) attention kernels need the heads
    from a variant or an argument, and then give the per-head file's params."""
    import ml_dtypes

    tensors = big_vision_tensors()
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    _, ours = load_big_vision(save(tmp_path, rounded, "bf16.npz"))
    _, want = load_big_vision(save(tmp_path, {k: v.astype(np.float32) for k, v in rounded.items()}))
    jax.tree.map(np.testing.assert_array_equal, ours, want)

    path = save(tmp_path, fused(tensors), "fused.npz")
    with pytest.raises(ConfigError, match=r"fused.npz.*heads cannot be read from shapes: pass variant=.*"
                                          r"vision_num_attention_heads="):
        load_big_vision(path)
    config, ours = load_big_vision(path, vision_num_attention_heads=HEADS, text_num_attention_heads=THEADS)
    want_config, want = load_big_vision(files["per-layer"])
    assert config == want_config
    jax.tree.map(np.testing.assert_array_equal, ours, want)


def test_second_text_position_embedding_is_added(files, tmp_path):
    """big_vision's text_transformer.load adds an older checkpoint's txt/Encoder_0/pos_embedding to pos_embedding."""
    tensors = big_vision_tensors()
    second = np.full((1, LENGTH, TD), 0.25, np.float32)
    tensors["txt/pos_embedding"] -= second
    _, ours = load_big_vision(save(tmp_path, {**tensors, "txt/Encoder_0/pos_embedding": second}))
    _, want = load_big_vision(files["per-layer"])
    np.testing.assert_allclose(ours["text"]["embeddings"]["position"], want["text"]["embeddings"]["position"],
                               atol=1e-7)
    del tensors["txt/pos_embedding"]
    with pytest.raises(CheckpointError, match=r"ckpt.npz: txt/Encoder_0/pos_embedding \(1, 8, 24\) needs a floating "
                                              r"txt/pos_embedding"):
        load_big_vision(save(tmp_path, {**tensors, "txt/Encoder_0/pos_embedding": second}))


def test_text_tower_without_head_is_the_identity(tmp_path):
    """big_vision's out_dim None (the So400m/16 i18n file) has no txt/head: transformers converts it to eye / 0."""
    tensors = big_vision_tensors(td=D, theads=THEADS)
    identity = {**tensors, "txt/head/kernel": np.eye(D, dtype=np.float32), "txt/head/bias": np.zeros(D, np.float32)}
    config, ours = load_big_vision(save(tmp_path, {k: v for k, v in tensors.items() if "txt/head" not in k}))
    want_config, want = load_big_vision(save(tmp_path, identity, "identity.npz"))
    assert config == want_config and config.text.projection_size == D
    jax.tree.map(np.testing.assert_array_equal, ours, want)
    with pytest.raises(CheckpointError, match=r"ckpt.npz: missing tensor 'txt/head/kernel'"):
        load_big_vision(save(tmp_path, {k: v for k, v in identity.items() if k != "txt/head/kernel"}))


def test_variants(tmp_path):
    tensors = big_vision_tensors(d=32, heads=2, mlp=128, depth=1, td=32, theads=2, tmlp=128, tdepth=1)
    path = save(tmp_path, tensors)
    config, params = load_big_vision(path, variant=f"mu/{PATCH}")  # big_vision's "mu": 32 wide, 1 deep
    assert config.vision.num_attention_heads == config.text.num_attention_heads == 2
    fused_config, fused_params = load_big_vision(save(tmp_path, fused(tensors), "fused.npz"), variant="mu")
    assert fused_config == config  # the variant gives the heads the fused kernels do not show
    jax.tree.map(np.testing.assert_array_equal, fused_params, params)
    with pytest.raises(ConfigError, match=r"ckpt.npz: variant 'B/16' has vision hidden_size 768, but the "
                                          r"checkpoint's is 32 \(from 'img/embedding/kernel'\)"):
        load_big_vision(path, variant="B/16")
    with pytest.raises(ConfigError, match=r"variant 'mu/16' has vision patch_size 16.* is 8"):
        load_big_vision(path, variant="mu/16")
    with pytest.raises(ConfigError, match=r"text_variant 'S' has text hidden_size 384.*Embed_0/embedding"):
        load_big_vision(path, variant="mu", text_variant="S")
    with pytest.raises(ConfigError, match=r"variant='Q/16' is not a big_vision variant"):
        load_big_vision(path, variant="Q/16")
    other = save(tmp_path, big_vision_tensors(d=32, heads=2, mlp=128, depth=1), "other.npz")
    with pytest.raises(ConfigError, match=r"variant \(its name, for the text tower\) 'mu' has text hidden_size 32, "
                                          r"but the checkpoint's is 24 .*pass text_variant="):
        load_big_vision(other, variant=f"mu/{PATCH}")


def test_overrides(files):
    config, _ = load_big_vision(files["per-layer"], vision_image_size=IMAGE, text_pad_token_id=0,
                                        text_eos_token_id=1, text_bos_token_id=None)
    assert (config.text.pad_token_id, config.text.eos_token_id, config.text.bos_token_id) == (0, 1, None)
    # Any size giving the grid (the convolution drops the rest, as for So400m/14 at 384 pixels).
    assert load_big_vision(files["per-layer"], vision_image_size=IMAGE + PATCH - 1)[0].vision.image_size == 31
    with pytest.raises(ConfigError, match=r"vision_image_size=32 disagrees with the checkpoint's shapes: 24 "
                                          r"\(from 'img/pos_embedding' \(a 3x3 grid of 8-pixel patches: 24 to 31"):
        load_big_vision(files["per-layer"], vision_image_size=32)
    with pytest.raises(ConfigError, match=r"text_num_attention_heads=4 disagrees.*: 2 \(from 'txt/Encoder_0/"):
        load_big_vision(files["per-layer"], text_num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['vision_hidden_act'\]"):
        load_big_vision(files["per-layer"], vision_hidden_act="gelu")


@pytest.mark.parametrize("scanned", [False, True], ids=["per-layer", "scanned"])
def test_missing_extra_and_misshaped_tensors_listed_together(tmp_path, scanned):
    tensors = big_vision_tensors(scanned=scanned, prefix="params/" if scanned else "")
    p = "params/" if scanned else ""
    blk = "encoderblock" if scanned else "encoderblock_1"
    missing = f"{p}txt/Encoder_0/{blk}/MlpBlock_0/Dense_1/bias"
    misshaped = f"{p}img/Transformer/{blk}/LayerNorm_1/scale"
    del tensors[missing]
    tensors[f"{p}img/head/kernel"] = np.zeros((D, 5), np.float32)
    tensors[misshaped] = np.zeros(tensors[misshaped].shape[:-1] + (D + 1,), np.float32)
    tensors[f"{p}txt/head/bias"] = tensors[f"{p}txt/head/bias"].astype(np.int32)
    path = save(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        load_big_vision(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} does not match")
    assert f"missing 1 tensor(s): {missing}" in msg and f"unexpected 1 tensor(s): {p}img/head/kernel" in msg
    want = (DEPTH, D) if scanned else (D,)
    assert f"{misshaped} {want[:-1] + (D + 1,)} (expected {want})" in msg
    assert f"{p}txt/head/bias of dtype int32 (expected floating point)" in msg


def test_unreadable_files_refused(tmp_path, monkeypatch):
    good = big_vision_tensors()
    refuse = lambda *a, **k: pytest.fail("unpickled")  # noqa: E731
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    path = save(tmp_path, {**good, "img/extra": np.array([{"x": 1}], dtype=object)}, "pickled.npz")
    with pytest.raises(CheckpointError, match=r"pickled.npz: tensor 'img/extra' is a pickled object array"):
        load_big_vision(path)
    raw = tmp_path / "raw.npz"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)  # a pickle's opening bytes
    with pytest.raises(CheckpointError, match=r"raw.npz: neither an .npz nor an .npy file.*never unpickles"):
        load_big_vision(raw)

    data = open(save(tmp_path, good), "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.npz: not a readable .npz archive"):
        load_big_vision(truncated)
    with zipfile.ZipFile(tmp_path / "ckpt.npz") as z:  # damage one member's data, leave the directory intact
        info = z.getinfo("img/pos_embedding.npy")
    corrupt = bytearray(data)
    corrupt[info.header_offset + 30 + len(info.filename) + info.file_size - 4] ^= 0xFF
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointError, match=r"corrupt.npz: tensor 'img/pos_embedding' is unreadable .*Bad CRC"):
        load_big_vision(tmp_path / "corrupt.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"one.npy: holds one array"):
        load_big_vision(tmp_path / "one.npy")
    with pytest.raises(FileNotFoundError):
        load_big_vision(tmp_path / "absent.npz")


def test_unsupported_checkpoints_refused(tmp_path):
    tensors = big_vision_tensors()
    both = {**tensors, **{k: v for k, v in big_vision_tensors(scanned=True).items() if "encoderblock/" in k}}
    with pytest.raises(CheckpointError, match=r"both.npz: holds both per-layer .* and scanned"):
        load_big_vision(save(tmp_path, both, "both.npz"))
    no_text = {k: v for k, v in tensors.items() if "txt/Encoder_0/encoderblock" not in k}
    with pytest.raises(CheckpointError, match=r"no_text.npz: no text encoder blocks: expected "
                                              r"txt/Encoder_0/encoderblock_0/"):
        load_big_vision(save(tmp_path, no_text, "no_text.npz"))
    wide = {**tensors, "txt/head/kernel": np.zeros((TD, D + 8), np.float32),
            "txt/head/bias": np.zeros(D + 8, np.float32)}
    with pytest.raises(ConfigError, match=r"wide.npz: the text head projects to 40 .'txt/head/kernel'. but the image "
                                          r"tower is 32 wide"):
        load_big_vision(save(tmp_path, wide, "wide.npz"))


def timm_naflex_embeds(path, batch):
    """timm's NaFlexVit (SigLIP 2 settings: MAP pooling, tanh GELU, bilinear antialiased position resizing) loading
    the .npz with its own big_vision reader (vision_transformer._load_weights), on the same patches: NaFlexVit
    takes (row, column) coordinates and a validity mask for dualenc's spatial_shapes and pixel_attention_mask."""
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    cfg = NaFlexVitCfg(patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / D,
                       act_layer="gelu_tanh", global_pool="map", pos_embed_interp_mode="bilinear",
                       pos_embed_grid_size=(NAFLEX_GRID, NAFLEX_GRID))
    model = NaFlexVit(cfg=cfg, in_chans=3, num_classes=0).eval()
    model.load_pretrained(path, prefix="params/img/")
    index = np.arange(batch["pixel_values"].shape[1])
    coord = np.stack([np.stack([index // w, index % w], -1) * (index < h * w)[:, None]
                      for h, w in batch["spatial_shapes"]])
    with torch.no_grad():
        pooled = model({"patches": torch.tensor(batch["pixel_values"]), "patch_coord": torch.tensor(coord),
                        "patch_valid": torch.tensor(batch["pixel_attention_mask"].astype(bool))})
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_naflex_matches_timm_and_transformers(tmp_path):
    """A NaFlex file loads as a "siglip2" model whose image embeddings are timm's NaFlexVit's on a batch of four
    aspect ratios (grids above and below the 4x4 position grid), and whose saved directory is a transformers
    Siglip2Model with the same logits."""
    path = save(tmp_path, naflex_tensors(), "naflex.npz")
    config, params = load_big_vision(path, stacked=True)
    v = config.vision
    assert config.model_type == "siglip2" and isinstance(v, dualenc.Siglip2VisionConfig)
    assert isinstance(config.text, dualenc.Siglip2TextConfig) and config.text.projection_size == D
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size, v.num_hidden_layers) == (D, HEADS, MLP, DEPTH)
    assert (v.patch_size, v.num_channels, v.num_patches) == (PATCH, 3, NAFLEX_GRID ** 2)
    batch, ids = naflex_batch(), inputs()[0]
    out = jax.jit(dualenc.apply)(params, config, input_ids=ids, **batch)
    timm_diff = max_diff(out.image_embeds, timm_naflex_embeds(path, batch))

    tf = _transformers()
    hf = dualenc.save_pretrained(tmp_path / "hf", config, params)
    model, info = tf.Siglip2Model.from_pretrained(hf, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor(ids), **{k: torch.tensor(v) for k, v in batch.items()})
    diffs = {k: max_diff(getattr(out, k), getattr(ref, k)) for k in ("logits_per_image", "image_embeds",
                                                                      "text_embeds")}
    print(f"max |dualenc - timm NaFlexVit| image embeds {timm_diff}; max |dualenc - transformers| {diffs}")
    assert timm_diff < 1e-5 and all(d < 1e-5 for d in diffs.values()), (timm_diff, diffs)
    assert float(params["logit_scale"]) == pytest.approx(2.1) and float(params["logit_bias"]) == pytest.approx(-1.7)


def test_naflex_kernel_is_the_conv_kernel_flattened(files, reference, tmp_path):
    """big_vision's patchify flattens each patch (row, column, channel), so the conv's HWIO kernel reshaped to
    (p * p * C, D) embeds a patch as the conv does: a NaFlex file made so from the fixed-resolution one, on the
    same pixels patchified by dualenc's NaFlexImageProcessor at the native grid, gives open_clip's conv numbers."""
    tensors = big_vision_tensors()
    tensors["img/embedding/kernel"] = tensors["img/embedding/kernel"].reshape(-1, D)
    tensors["img/pos_embedding"] = tensors["img/pos_embedding"].reshape(GRID, GRID, D)
    config, params = load_big_vision(save(tmp_path, tensors, "naflex.npz"))
    ids, images = inputs()
    processor = dualenc.NaFlexImageProcessor(patch_size=PATCH, max_num_patches=GRID * GRID, do_resize=False,
                                             do_rescale=False, do_normalize=False)
    batch = processor(list(images.transpose(0, 2, 3, 1)))
    forward = jax.jit(dualenc.apply)
    out = forward(params, config, input_ids=ids, **batch)
    ref = reference["per-layer"]
    diffs = {k: max_diff(getattr(out, k), ref[k]) for k in ref}
    print(f"NaFlex from the conv file: max |dualenc - open_clip| {diffs}")
    assert all(d < 1e-5 for d in diffs.values()), diffs
    # The layout matters: the kernel read as (C, p, p) rows would embed other numbers.
    swapped = {**tensors, "img/embedding/kernel": tensors["img/embedding/kernel"].reshape(PATCH, PATCH, 3, D)
               .transpose(2, 0, 1, 3).reshape(-1, D)}
    _, wrong = load_big_vision(save(tmp_path, swapped, "swapped.npz"))
    assert max_diff(forward(wrong, config, input_ids=ids, **batch).image_embeds, ref["image_embeds"]) > 1e-2


def test_naflex_positions_resize_as_big_vision():
    """big_vision's naflex_vit resizes the (G, G, D) grid with jax.image.scale_and_translate (antialiased bilinear,
    scale = grid / G) and reads each patch's (row, column), padding reading (0, 0); dualenc (as transformers)
    resizes with torch's antialiased bilinear interpolate: the same numbers, up, down and mixed."""
    from dualenc.towers.siglip2 import resize_positions

    table = np.random.default_rng(0).standard_normal((NAFLEX_GRID, NAFLEX_GRID, D)).astype(np.float32)
    shapes, length = np.array([[3, 10], [10, 3], [2, 2], [1, 7], [4, 4], [6, 6]]), 40
    ours = resize_positions(table.reshape(-1, D), shapes, length)
    grids = jax.jit(jax.vmap(lambda scale: jax.image.scale_and_translate(
        table, (64, 64, D), (0, 1), scale, np.zeros(2, np.float32), method="bilinear", antialias=True)))(
        (shapes / NAFLEX_GRID).astype(np.float32))
    index = np.arange(length)
    for (h, w), grid, got in zip(shapes, np.asarray(grids), np.asarray(ours)):
        inside = index < h * w
        np.testing.assert_allclose(got, grid[index // w * inside, index % w * inside], atol=1e-6,
                                   err_msg=f"grid {h}x{w}")


def test_naflex_files_refused(tmp_path):
    tensors = naflex_tensors()
    p = "params/img/"
    del tensors[p + "embedding/bias"]
    tensors[p + "MAPHead_0/probe"] = np.zeros((1, 2, D), np.float32)
    tensors[p + "patchln_pre/scale"] = np.ones(PATCH * PATCH * 3, np.float32)  # naflex_vit's optional patch norm
    path = save(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        load_big_vision(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} does not match the big_vision SigLIP 2 NaFlex model"), msg
    assert f"missing 1 tensor(s): {p}embedding/bias" in msg and f"unexpected 1 tensor(s): {p}patchln_pre/scale" in msg
    assert f"{p}MAPHead_0/probe (1, 2, {D}) (expected (1, 1, {D}))" in msg

    good = naflex_tensors(prefix="")
    path = save(tmp_path, good, "good.npz")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['vision_image_size'\]; .*vision_num_patches"):
        load_big_vision(path, vision_image_size=32)
    with pytest.raises(ConfigError, match=r"vision_num_patches=25 disagrees .*: 16 \(from 'img/pos_embedding'\)"):
        load_big_vision(path, vision_num_patches=25)
    with pytest.raises(ConfigError, match=r"variant 'B' has vision hidden_size 768, but the checkpoint's is 32"):
        load_big_vision(path, variant="B")
    flat = {**good, "img/pos_embedding": good["img/pos_embedding"].reshape(1, -1, D)}
    with pytest.raises(ConfigError, match=r"flat.npz: 'img/pos_embedding' \(1, 16, 32\) is not a square \(G, G, D\)"):
        load_big_vision(save(tmp_path, flat, "flat.npz"))
    gray = {**good, "img/embedding/kernel": np.zeros((PATCH * PATCH, D), np.float32)}
    path = save(tmp_path, gray, "gray.npz")
    with pytest.raises(ConfigError, match=r"gray.npz: 'img/embedding/kernel' has 64 rows, not channels x patch\^2 "
                                          r"for 3 channels: pass the image's vision_num_channels="):
        load_big_vision(path)
    config, _ = load_big_vision(path, vision_num_channels=1)
    assert (config.vision.num_channels, config.vision.patch_size) == (1, PATCH)
