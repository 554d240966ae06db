"""Each param declared once (dualenc.params): init, key tables, decay mask, LiT groups and sharding derived from
the towers' specs, and the one strict comparison."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import TINY

import dualenc
from dualenc import layers, model, params as declare, towers, train

VISION = {
    "vit": dualenc.ViTConfig(**TINY, image_size=30, patch_size=10),
    "vit_no_qkv_bias": dualenc.ViTConfig(**TINY, image_size=30, patch_size=10, qkv_bias=False),
    "clip_vision": dualenc.CLIPVisionConfig(**TINY, image_size=30, patch_size=10),
    "siglip_vision": dualenc.SiglipVisionConfig(**TINY, image_size=30, patch_size=10),
    "siglip2_vision": dualenc.Siglip2VisionConfig(**TINY, patch_size=4, num_patches=16),
}
TEXT = {
    "bert": dualenc.BertConfig(**TINY, vocab_size=99, max_position_embeddings=40),
    "roberta": dualenc.RobertaConfig(**TINY, vocab_size=99, max_position_embeddings=40),
    "clip_text": dualenc.CLIPTextConfig(**TINY, vocab_size=99, max_position_embeddings=40),
    "siglip_text": dualenc.SiglipTextConfig(**TINY, vocab_size=99, max_position_embeddings=40),
}
MODELS = {
    "vit+bert": dualenc.DualEncoderConfig(vision=VISION["vit"], text=TEXT["bert"], projection_dim=16),
    "vit+roberta": dualenc.DualEncoderConfig(vision=VISION["vit_no_qkv_bias"], text=TEXT["roberta"],
                                             projection_dim=16),
    "clip": dualenc.DualEncoderConfig(vision=VISION["clip_vision"], text=TEXT["clip_text"], projection_dim=16,
                                      model_type="clip"),
    "siglip": dualenc.DualEncoderConfig(vision=VISION["siglip_vision"], text=TEXT["siglip_text"], projection_dim=32,
                                        model_type="siglip", logit_bias_init_value=-10.0),
    "siglip2": dualenc.DualEncoderConfig(
        vision=VISION["siglip2_vision"], text=dualenc.Siglip2TextConfig(**TINY, vocab_size=99,
                                                                        max_position_embeddings=40),
        projection_dim=32, model_type="siglip2", logit_bias_init_value=-10.0),
}


def keyed(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def seed_decay_mask(params):
    """The decay rule before the params were declared: kernels and embedding tables, by the leaf's name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "word", "position", "token_type"), params)


def seed_partition(params, locked, unlocked_layers):
    """LiT's split before the params were declared: a locked tower's "embeddings" and "pre_norm" stay frozen
    with its bottom layers; its top layers and the rest train."""
    trainable, frozen = {}, {}
    for name, value in params.items():
        if name not in locked:
            trainable[name] = value
        elif unlocked_layers == 0:
            frozen[name] = value
        else:
            enc = value["encoder"]
            cut = layers.num_layers(enc) - unlocked_layers
            take = (lambda a, b: tuple(enc[a:b])) if isinstance(enc, tuple) else \
                (lambda a, b: jax.tree_util.tree_map(lambda x: x[a:b], enc))
            frozen[name] = {**{k: v for k, v in value.items() if k in ("embeddings", "pre_norm")},
                            "encoder": take(0, cut)}
            trainable[name] = {**{k: v for k, v in value.items() if k not in ("embeddings", "pre_norm", "encoder")},
                               "encoder": take(cut, None)}
    return trainable, frozen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decay_mask_and_lit_partition_are_the_seeds_on_every_family(name):
    config = MODELS[name]
    for stacked in (False, True):
        params = dualenc.init(jax.random.key(0), config, stacked=stacked)
        assert keyed(train.decay_mask(params)) == keyed(seed_decay_mask(params))
        for locked in ((), ("vision",), ("text",), ("vision", "text")):
            for k in (0, 1, 2) if locked else (0,):
                ours = train.partition(params, locked, k)
                seed = seed_partition(params, locked, k)
                for a, b in zip(ours, seed):
                    assert set(keyed(a)) == set(keyed(b)), (locked, k)
                    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                     jax.tree_util.tree_leaves(b)))
        merged = train.state.merge_params(*train.partition(params, ("text",), 1), split=False)
        assert keyed(merged).keys() == keyed(params).keys()


def test_every_param_is_declared_once_with_consistent_views():
    for config in MODELS.values():
        specs = model.specs(config)
        names = [p.name for p in specs]
        assert len(names) == len(set(names))
        assert declare.shapes(specs) == model.expected_shapes(config)
        stacked = dualenc.init(jax.random.key(0), config, stacked=True)
        assert {k: v.shape for k, v in keyed(stacked).items()} == \
            {k: v.shape for k, v in keyed(declare.shape_tree(specs)).items()}
        catalogue = train.state.declared()
        for path, leaf in jax.tree_util.tree_leaves_with_path(dualenc.init(jax.random.key(0), config)):
            p, axes = catalogue.find(path, np.ndim(leaf))
            assert p is not None and len(axes) == np.ndim(leaf), path
        for side in ("vision", "text"):
            tower = getattr(config, side)
            module = towers.family(tower).module
            # the key table is the specs' transformers names: every param has one, none twice
            table = module.table(tower)
            assert sorted(e.path for e in table) == sorted(p.path for p in module.specs(tower))
            assert tower.num_params() == declare.count(module.specs(tower))


def test_init_cuts_each_layer_from_the_one_chunked_draw(monkeypatch):
    """declare.init gives layers.init_params' numbers for the same key (the same draw, in the specs' order),
    stacked or cut per layer straight from the draw; the lax.map path too."""
    monkeypatch.setattr(declare, "NORMAL_CHUNK", 1000)
    specs = model.specs(MODELS["vit+roberta"])
    key = jax.random.key(3)
    reference = layers.init_params(key, lambda normal: declare.build(normal, specs))
    stacked = declare.init(key, specs)
    per_layer = declare.init(key, specs, stacked=False)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(reference),
                                                    jax.tree_util.tree_leaves(stacked)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(model.unstack_layers(reference)),
                                                    jax.tree_util.tree_leaves(per_layer)))
    word = stacked["text"]["embeddings"]["word"]
    assert not np.any(word[1]) and np.all(stacked["text"]["encoder"]["mlp_norm"]["scale"] == 1)


def test_check_tree_is_one_strict_comparison():
    with pytest.raises(dualenc.InputError, match=r"^here: missing b; unexpected c; wrong shape a \(3,\) "
                                                  r"\(expected \(2,\)\)$"):
        declare.check_tree({"a": (2,), "b": (1,)}, {"a": (3,), "c": ()}, "here")
    with pytest.raises(dualenc.CheckpointError, match=r"missing 25 tensor\(s\): .* and 5 more"):
        declare.check_tree({f"t{i:02d}": (1,) for i in range(25)}, {}, "f", noun="tensor",
                           error=dualenc.CheckpointError)
    declare.check_tree({"a": (2,)}, {"a": (2,)}, "fine")
    config = MODELS["siglip"]
    params = dualenc.init(jax.random.key(0), config)
    del params["text"]["head"]["bias"]
    with pytest.raises(dualenc.InputError, match="params do not match the config: missing text/head/bias"):
        dualenc.apply(params, config, input_ids=np.ones((1, 4), np.int32),
                      pixel_values=np.zeros((1, 3, 30, 30), np.float32))


SHARDING_CHILD = textwrap.dedent("""
    import jax, numpy as np
    import dualenc
    from dualenc import train
    from dualenc.train.sharding import FSDP
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    size = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, intermediate_size=2048)
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(**size, image_size=32, patch_size=16),
        text=dualenc.BertConfig(**size, vocab_size=120, max_position_embeddings=16), projection_dim=64)
    params = dualenc.init(jax.random.key(0), config)
    mesh = train.data_mesh()
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    for layer_loop in (True, False):
        state = train.init_state(params, optimizer, locked=("vision",), unlocked_layers=1, layer_loop=layer_loop)
        spec = lambda tree: tree.sharding.spec
        placed = train.shard_state(state, mesh, True)
        layer = (lambda enc: enc[0]) if layer_loop else (lambda enc: enc)
        lead = () if layer_loop else (None,)  # the stacked layers' axis is never split
        for part in (placed.trainable, placed.opt_state.mu):
            fc1 = layer(part["text"]["encoder"])["mlp"]["fc1"]  # 512 x 2048 float32: 4 MiB, on the floor
            assert spec(fc1["kernel"]) == P(*lead, None, "data"), spec(fc1["kernel"])
            assert spec(fc1["bias"]) == P()  # 8 KiB: under the floor
            norm = layer(part["text"]["encoder"])["mlp_norm"]
            assert spec(norm["scale"]) == P() and spec(norm["bias"]) == P()
            query = layer(part["text"]["encoder"])["attention"]["query"]["kernel"]  # 1 MiB
            assert spec(query) == P()
        assert spec(placed.rng) == P() and spec(placed.step) == P()
        assert spec(placed.frozen["vision"]["embeddings"]["patch"]["kernel"]) == P()
        # without a floor: every float leaf the mesh divides is split, by its logical axes; LayerNorm vectors
        # (axis "norm") and the RNG key (not floating point) are not
        loose = train.state_sharding(state, mesh, FSDP(min_shard_mb=0))
        enc = layer(loose.trainable["text"]["encoder"])
        assert enc["mlp"]["fc1"]["bias"].spec == P(*lead, "data") and enc["mlp_norm"]["scale"].spec == P()
        assert enc["attention"]["query"]["kernel"].spec == P(*lead, "data", None)
        assert loose.rng.spec == P() and loose.trainable["logit_scale"].spec == P()
        word = loose.trainable["text"]["embeddings"]["word"]  # (120, 512): a table, split along its rows only
        assert word.spec == P("data", None)
    print("ok")
""")


def test_fsdp_splits_big_kernels_by_logical_axis_and_keeps_norms_and_keys_replicated():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDING_CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_fsdp_rules_refuse_what_they_cannot_mean():
    with pytest.raises(dualenc.ConfigError, match="min_shard_mb must be a non-negative number"):
        train.sharding.FSDP(min_shard_mb=-1)
    with pytest.raises(dualenc.ConfigError, match="fsdp must be true, false or"):
        train.sharding.rules("yes")


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_big_vision_names_come_from_the_specs(name):
    """Every param of a SigLIP model declares its big_vision name(s), each name once (the loader reads through
    them; tests/test_big_vision.py loads the files)."""
    specs = model.specs(MODELS[name])
    assert all(p.bv for p in specs), [p.name for p in specs if not p.bv]
    names = [(p.path[0], n) for p in specs for n in p.bv]
    assert len(names) == len(set(names))
    in_proj = next(p for p in specs if p.path[-2:] == ("in_proj", "kernel"))
    assert [n.rsplit("/", 2)[1] for n in in_proj.bv] == ["query", "key", "value"]
