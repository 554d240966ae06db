"""open_clip's ModifiedResNet image tower (OpenAI's RN50 family): parity with open_clip's own model (eval and train
mode, BatchNorm statistics included), its preprocessing and tokenizer, save/load, the train step, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import max_diff
from PIL import Image
from safetensors.torch import save_file

import dualenc
from dualenc import cli, model, towers
from dualenc.towers.resnet import ModifiedResNetConfig

CONTEXT, SIZE = 12, 64
CFG = {"embed_dim": 16, "quick_gelu": True,
       "vision_cfg": {"image_size": SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 128, "patch_size": None},
       "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


def randomized(module, seed=0):
    """Random weights, BatchNorm scales near 1, and running statistics far from torch's 0 / 1 init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = any(k in name for k in (".bn", "downsample.1", "ln_"))
            base = 1.0 if norm and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
        module.logit_scale.fill_(2.1)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(open_clip's model in eval mode, its eval preprocess, its tokenizer, the folder it is saved in)."""
    import open_clip

    ref = randomized(open_clip.CLIP(CFG["embed_dim"], CFG["vision_cfg"], CFG["text_cfg"], quick_gelu=True)).eval()
    path = tmp_path_factory.mktemp("rn") / "model"
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    return ref, preprocess, open_clip.get_tokenizer("local-dir:" + str(path)), path


@pytest.fixture(scope="module")
def loaded(reference):
    return dualenc.load_pretrained(reference[3])


def inputs(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, CONTEXT), np.int64)
    for row in range(batch):
        n = CONTEXT - 3 * row
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = 49406, rng.integers(1, 49000, n - 2), 49407
    return ids, rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)


def test_loads_as_open_clip_computes_it(reference, loaded):
    ref = reference[0]
    config, params = loaded
    assert isinstance(config.vision, ModifiedResNetConfig) and config.model_type == "vision-text-dual-encoder"
    assert config.vision.heads == 4 and config.vision.output_dim == config.projection_dim == 16
    assert towers.family(config.vision).state == ("batch_stats",)
    np.testing.assert_array_equal(params["vision"]["batch_stats"]["layer2"]["0"]["downsample"]["bn"]["var"],
                                  ref.state_dict()["visual.layer2.0.downsample.1.running_var"].numpy())
    ids, images = inputs()
    with torch.no_grad():
        image_features = ref.encode_image(torch.tensor(images))
        text_features = ref.encode_text(torch.tensor(ids))
        logits_per_image, _ = ref.get_logits(torch.tensor(images), torch.tensor(ids))
        stages = ref.visual.forward_intermediates(torch.tensor(images))["image_intermediates"]
    out = jax.jit(dualenc.apply, static_argnames="output_hidden_states")(
        params, config, input_ids=ids, pixel_values=images, output_hidden_states=True)
    for side, want in (("vision", image_features), ("text", text_features)):
        tower = out.vision_outputs if side == "vision" else out.text_outputs
        assert max_diff(model.project(params, side, tower.pooler_output), want) < 1e-5
    assert max_diff(out.logits_per_image, logits_per_image) < 1e-5
    assert len(out.vision_outputs.hidden_states) == 5 and out.vision_outputs.state is None
    for ours, theirs in zip(out.vision_outputs.hidden_states, stages):
        assert max_diff(ours, theirs) < 1e-5


def test_the_train_step_normalises_with_batch_statistics_and_carries_them(reference, loaded):
    """One train step: the loss is open_clip's in train mode (BatchNorm on the batch's statistics), the running
    statistics move as torch's do (momentum 0.1, unbiased variance), and the tower's weights learn."""
    import copy

    from dualenc import train

    config, params = loaded
    ids, images = inputs(batch=2, seed=2)
    torch_model = copy.deepcopy(reference[0]).train()
    with torch.no_grad():
        image, text, scale = torch_model(torch.tensor(images), torch.tensor(ids))[:3]
        logits = scale * image @ text.T
        labels = torch.arange(2)
        cross_entropy = torch.nn.functional.cross_entropy
        want = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones(ids.shape, jnp.int32),
             "pixel_values": jnp.asarray(images)}
    optimizer = optax.sgd(1e-2)  # (few ops per param: this tower has many, and each costs compile time)
    state = train.init_state(params, optimizer, locked=("text",))
    new, metrics = train.make_train_step(config, optimizer, locked=("text",), donate=False)(state, batch)
    assert abs(float(metrics["loss"]) - float(want)) < 1e-5
    before, after = params["vision"], new.trainable["vision"]
    stats = torch_model.visual.state_dict()
    for entry in towers.family(config.vision).table(config.vision):
        if entry.path[0] == "batch_stats":
            value = after
            for key in entry.path:
                value = value[key]
            assert max_diff(value, stats[entry.hf]) < 1e-5, entry.hf
    assert not np.allclose(after["batch_stats"]["bn1"]["mean"], before["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(after["layer3"]["0"]["conv2"]["kernel"], before["layer3"]["0"]["conv2"]["kernel"])
    assert not np.allclose(after["attnpool"]["query"]["kernel"], before["attnpool"]["query"]["kernel"])
    with pytest.raises(dualenc.ConfigError, match="running statistics"):
        train.make_train_step(config, optimizer, accum_steps=2)
    with pytest.raises(dualenc.ConfigError, match="unlocked_layers=1: the vision tower has no stack"):
        train.init_state(params, optimizer, locked=("vision",), unlocked_layers=1)  # LiT's top-k has no layers here
    none = train.tower_features(params, config, "vision", {"pixel_values": np.zeros((0, 3, SIZE, SIZE), np.float32)})
    assert none.shape == (0, params["visual_projection"]["kernel"].shape[0])  # the pooled width, from shapes alone


def test_saves_and_loads_back_equal_and_runs_the_cli(reference, loaded, tmp_path, capsys):
    """save_pretrained writes dualenc's VisionTextDualEncoder layout (no transformers class holds a ResNet): its
    config.json names the tower "modified_resnet", and load_pretrained reads it back equal; zero-shot runs
    on it with the processor saved beside it."""
    config, params = loaded
    processor = dualenc.Processor.from_pretrained(reference[3])
    dualenc.save_pretrained(tmp_path / "saved", config, params, processor=processor)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["vision_config"]["model_type"] == "modified_resnet" and written["vision_config"]["layers"] == [1] * 4
    again, back = dualenc.load_pretrained(tmp_path / "saved")
    assert again == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 40, 220)]):
        Image.fromarray(np.full((40, 50, 3), colour, np.uint8)).save(images / f"{i}.png")
    capsys.readouterr()
    assert cli.main(["zero-shot", "--model", str(tmp_path / "saved"), "--labels", "red,blue", "--json",
                     str(images / "0.png")]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 1 and abs(sum(results[0]["probabilities"]) - 1) < 1e-4


def test_pixels_and_token_ids_are_open_clips(reference):
    from sklearn.datasets import load_sample_images

    _, preprocess, tokenizer, path = reference
    processor = dualenc.Processor.from_pretrained(path)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    texts = ["a photo of a cat", "Ünïcode, punctuation... and  spaces"]
    out = processor(text=texts, images=photos, max_length=CONTEXT)
    assert max_diff(out["pixel_values"], np.stack([preprocess(p).numpy() for p in photos])) < 1e-5
    theirs = tokenizer(texts).numpy()
    ours = np.asarray(out["input_ids"])
    np.testing.assert_array_equal(ours, theirs[:, :ours.shape[1]])
    assert not theirs[:, ours.shape[1]:].any()


@pytest.mark.parametrize("change,field", [
    ({"image_size": 48}, "image_size"),
    ({"image_size": [64, 64]}, "image_size"),
    ({"layers": [1, 1, 1]}, "layers"),
    ({"layers": [1, 0, 1, 1]}, "layers"),
    ({"head_width": 0}, "head_width"),
    ({"width": 16.5}, "width"),
    ({"timm_model_name": "resnet50"}, "timm_model_name"),
    ({"made_up": 1}, "made_up"),
])
def test_unimplemented_resnet_configs_name_the_field(change, field, tmp_path):
    cfg = {**CFG, "vision_cfg": {**CFG["vision_cfg"], **change}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(dualenc.ConfigError, match=f"field '{field}'"):
        dualenc.load_pretrained(tmp_path)


def test_damaged_weights_are_named(reference, tmp_path):
    from safetensors.numpy import load_file, save_file as save_numpy

    path = reference[3]
    tensors = load_file(str(path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text((path / "open_clip_config.json").read_text())
    for name, change in (("visual.layer1.0.bn2.running_var", "drop"), ("visual.attnpool.c_proj.weight", "shape")):
        damaged = dict(tensors)
        if change == "drop":
            del damaged[name]
        else:
            damaged[name] = damaged[name][:, :-1]
        save_numpy(damaged, str(tmp_path / "open_clip_model.safetensors"))
        with pytest.raises(dualenc.CheckpointError, match=name.split(".", 1)[1].replace(".", r"\.")):
            dualenc.load_pretrained(tmp_path)
