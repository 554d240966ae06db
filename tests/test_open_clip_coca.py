"""open_clip's CoCa as a dual encoder: its image tower pooled by the attentional pooler's first query
(OpenCLIPVisionConfig.attention_pool_size), its text tower with the class token appended (OpenCLIPTextConfig.embed_cls,
open_clip's legacy padding mask), its captioning decoder skipped with an UnusedWeightsWarning. Parity with open_clip's
CoCa, its tokenizer and pixels, the folder save_pretrained writes, a train step, the CLI, and the refusals."""

import copy
import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import open_clip_towers as towers
import pytest
import torch
from conftest import max_diff
from safetensors.torch import save_file

import dualenc
from dualenc.config import OpenCLIPTextConfig, OpenCLIPVisionConfig

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("open_clip_coca")

EMBED, WIDTH, LENGTH = 24, 32, 12  # the pooler's width (embed_dim) differs from the tower's: torch's kdim / vdim
CFG = {"embed_dim": EMBED, "custom_text": True,
       "vision_cfg": {"image_size": 32, "patch_size": 16, "width": WIDTH, "head_width": 16, "layers": 2,
                      "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 3,
                      "output_tokens": True},
       "text_cfg": {"context_length": LENGTH, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 2,
                    "embed_cls": True, "output_tokens": True},
       "multimodal_cfg": {"context_length": LENGTH, "vocab_size": 49408, "width": EMBED, "heads": 2, "layers": 1,
                          "attn_pooler_heads": 2}}
# "!" is id 0, open_clip's pad id: CoCa's mask reads it as padding wherever it is; a row past the context; an empty one.
TEXTS = ["a photo of the cat", "hello! the RED house!", "a blue bird " * 8, ""]
LABELS = ["a red car", "a green tree", "a blue river"]


def build(cfg, seed=0):
    """open_clip's CoCa with every param random as towers.build draws them (CoCa is not CLIP / CustomTextCLIP)."""
    import open_clip

    model = open_clip.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + noise if p.ndim == 1 and name.endswith("weight") else noise)
        model.logit_scale.fill_(2.1)
    return model


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    model = build(CFG)
    return towers.reference(model, towers.save(model, CFG, tmp_path_factory.mktemp("coca") / "oc"))


@pytest.fixture(scope="module")
def loaded(coca):
    """(config, params, the warnings load_pretrained gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, params = dualenc.load_pretrained(coca["path"])
    return config, params, caught


def test_parity_tokenizer_and_pixels_match_open_clip(coca, loaded):
    config, params, _ = loaded
    v, t = config.vision, config.text
    assert config.model_type == "vision-text-dual-encoder"
    assert type(v) is OpenCLIPVisionConfig and (v.attention_pool_size, v.attention_pool_heads, v.pre_norm) == \
        (EMBED, 2, True)
    assert type(t) is OpenCLIPTextConfig and t.causal and t.embed_cls and (t.max_position_embeddings, t.max_length) \
        == (LENGTH + 1, LENGTH)
    assert params["vision"]["pool"]["query"].shape == (EMBED,) and config.text_padding == "max_length"
    processor = dualenc.Processor.from_pretrained(coca["path"])
    batch = processor(text=TEXTS, images=coca["photos"])
    ids = coca["tokenizer"](TEXTS).numpy()
    np.testing.assert_array_equal(batch["input_ids"], ids)
    assert (ids[1, 1:-1] == 0).sum() >= 2 and (ids[2] != 0).all() and (ids[3] == 0).sum() == LENGTH - 2
    assert max_diff(batch["pixel_values"], coca["pixels"]) < 1e-5  # real photos, open_clip's own transform
    want = towers.open_clip_outputs(coca["model"], coca["pixels"], ids)
    run = jax.jit(dualenc.apply, static_argnames=("dtype",))
    out = run(params, config, input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=coca["pixels"])
    diffs = dict(image=max_diff(out.image_embeds, want["image"] / want["image"].norm(dim=-1, keepdim=True)),
                 text=max_diff(out.text_embeds, want["text"] / want["text"].norm(dim=-1, keepdim=True)),
                 logits=max_diff(out.logits_per_image, want["logits"]))
    features = jax.jit(dualenc.get_image_features)
    diffs["stacked"] = max_diff(features(dualenc.model.stack_layers(params), config, coca["pixels"]),
                                features(params, config, coca["pixels"]))  # lax.scan
    bf16 = run(params, config, input_ids=ids, pixel_values=coca["pixels"], dtype=jnp.bfloat16)
    print(f"CoCa max |dualenc - open_clip| float32 {diffs}; bfloat16 logits "
          f"{max_diff(bf16.logits_per_image.astype(jnp.float32), want['logits']):.3g}")
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_the_decoder_is_skipped_with_a_warning_naming_it(loaded):
    """The captioning side (the text decoder, the pooler's queries after the first) is named, never loaded."""
    _, params, caught = loaded
    unused = [str(w.message) for w in caught if issubclass(w.category, dualenc.UnusedWeightsWarning)]
    assert len(unused) == 1 and "captioning" in unused[0], unused
    assert "visual.attn_pool.query[1:3]" in unused[0] and "text_decoder.cross_attn.0.attn.in_proj_weight" in unused[0]
    assert not any("decoder" in "/".join(map(str, path)) for path, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0])


def test_packed_in_proj_when_the_widths_match(tmp_path):
    """embed_dim equal to the tower's width: torch packs the pooler's q, k, v in one in_proj."""
    cfg = copy.deepcopy(CFG)
    cfg["embed_dim"] = cfg["multimodal_cfg"]["width"] = WIDTH
    model = build(cfg, seed=1)
    assert model.visual.attn_pool.attn.in_proj_weight is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dualenc.UnusedWeightsWarning)
        config, params = dualenc.load_pretrained(towers.save(model, cfg, tmp_path))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model.encode_image(torch.tensor(pixels), normalize=False)
    assert max_diff(dualenc.get_image_features(params, config, pixels), want) < 1e-5


def test_train_step_save_load_and_zero_shot_command(coca, loaded, tmp_path, capsys, monkeypatch):
    """One train step moves the attentional pooler and the text class token; save_pretrained writes dualenc's
    VisionTextDualEncoder layout (no transformers class holds CoCa's towers), read back exactly; its tokenizer gives
    open_clip's ids but for the padding, where the attention mask makes them the same; zero-shot on it gives
    open_clip's probabilities."""
    from dualenc import train

    monkeypatch.setenv("DUALENC_COMPILATION_CACHE", "off")
    config, params, _ = loaded
    ids = coca["tokenizer"](LABELS).numpy()
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray((ids > 0).astype(np.int32)),
                 pixel_values=jnp.asarray(coca["pixels"]))
    optimizer = train.default_optimizer(1e-3, total_steps=2, warmup_steps=0)
    new, metrics = train.make_train_step(config, optimizer, donate=False)(
        train.init_state(params, optimizer, seed=0), batch)
    assert np.isfinite(float(metrics["loss"]))
    for side, path in (("vision", ("pool", "query")), ("vision", ("pool", "attention", "key", "kernel")),
                       ("vision", ("pool", "query_norm", "scale")), ("text", ("embeddings", "cls"))):
        before, after = params[side], new.trainable[side]
        for key in path:
            before, after = before[key], after[key]
        assert max_diff(after, before) > 1e-6, (side, path)

    folder = tmp_path / "saved"
    dualenc.save_pretrained(folder, config, params, processor=dualenc.Processor.from_pretrained(coca["path"]))
    written = json.loads((folder / "config.json").read_text())
    assert written["vision_config"]["model_type"] == "open_clip_vision"
    assert written["vision_config"]["attention_pool_size"] == EMBED and written["text_config"]["embed_cls"] is True
    back_config, back = dualenc.load_pretrained(folder)
    assert back_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    saved = dualenc.Tokenizer.from_pretrained(folder)(TEXTS)  # transformers' CLIPTokenizer: pads with end of text
    ids = coca["tokenizer"](TEXTS).numpy()
    np.testing.assert_array_equal(np.where(saved["attention_mask"] > 0, saved["input_ids"], 0), ids)
    assert (saved["input_ids"][ids == 0] == 49407).any()
    towers.check_zero_shot_command(coca, folder, LABELS, tmp_path, capsys)


def _model_cfg(vision=None, text=None, **model):
    cfg = copy.deepcopy(CFG)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return {k: v for k, v in {**cfg, **model}.items() if v is not None}


@pytest.mark.parametrize("cfg,field", [
    (_model_cfg(vision=dict(attentional_pool="parallel")), "attentional_pool"),
    (_model_cfg(vision=dict(pool_type="avg")), "pool_type"),
    (_model_cfg(vision=dict(attn_pooler_heads=5)), "attn_pooler_heads"),
    (_model_cfg(vision=dict(no_ln_pre=True)), "no_ln_pre"),
    (_model_cfg(text=dict(no_causal_mask=True)), "no_causal_mask"),
    (_model_cfg(text=dict(ls_init_value=0.1)), "ls_init_value"),
    (_model_cfg(multimodal_cfg=3), "multimodal_cfg"),
    # without the decoder: open_clip's CLIP reads no class token, and its towers would return tokens it cannot use
    (_model_cfg(multimodal_cfg=None), "attentional_pool"),
    (_model_cfg(multimodal_cfg=None, vision=dict(attentional_pool=False, output_tokens=False)), "embed_cls"),
    (_model_cfg(multimodal_cfg=None, vision=dict(attentional_pool=False), text=dict(embed_cls=False)),
     "output_tokens"),
])
def test_what_coca_configs_do_not_use_is_refused(cfg, field, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(dualenc.ConfigError, match=f"field '{field}' (= |must be an object, got int)"):
        dualenc.load_pretrained(tmp_path)


def test_tower_refusals_and_unknown_or_missing_pooler_tensors(coca, loaded, tmp_path):
    config, params, _ = loaded
    with pytest.raises(dualenc.ConfigError, match="'embed_cls' = True with causal False"):
        dataclasses.replace(config.text, causal=False)
    with pytest.raises(dualenc.ConfigError, match="'norm_after_pool' = False"):
        dataclasses.replace(config.vision, norm_after_pool=False)
    with pytest.raises(dualenc.InputError, match="position_ids"):
        dualenc.get_text_features(params, config, np.ones((1, LENGTH), np.int32),
                                  position_ids=np.arange(LENGTH, dtype=np.int32))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG}))
    tensors = {k: v.contiguous() for k, v in coca["model"].state_dict().items()}
    for change, named in (({"visual.attn_pool.ln_v.weight": torch.ones(WIDTH)}, r"visual\.attn_pool\.ln_v\.weight"),
                          ({"visual.attn_pool.ln_k.bias": None}, r"attentional_pool\.key_norm\.bias")):
        changed = {k: v for k, v in {**tensors, **change}.items() if v is not None}
        save_file(changed, str(tmp_path / "open_clip_model.safetensors"))
        with pytest.raises(dualenc.CheckpointError, match=named), pytest.warns(dualenc.UnusedWeightsWarning):
            dualenc.load_pretrained(tmp_path)
