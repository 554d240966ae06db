"""Sharding over a mesh (dualenc.train.sharding): FSDP without XLA's involuntary rematerialisation and with
FSDP's collectives, tensor parallelism over a "model" axis, and layer-wise learning-rate decay (optimizer.py)."""

import contextlib
import os
import sys
import tempfile

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import dualenc
from dualenc import model, train
from dualenc.train import optimizer as optim, sharding
from dualenc.train.sharding import FSDP, SHARDED_AXES

# One worker runs this module under `--dist loadgroup`: its module fixtures (compiles) are built once.
pytestmark = pytest.mark.xdist_group("sharding")

SIZE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)  # one layer does
CLIP = dualenc.DualEncoderConfig(
    vision=dualenc.CLIPVisionConfig(**SIZE, image_size=16, patch_size=8),
    text=dualenc.CLIPTextConfig(**SIZE, vocab_size=120, max_position_embeddings=16), projection_dim=16,
    model_type="clip")
ROWS = 24  # 6 rows a device on 4: XLA's choices for so small a batch are the ones that went wrong


def make_batch(config, rows=ROWS):
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    return dict(input_ids=rng.integers(1, 100, (rows, 6)).astype(np.int32), attention_mask=np.ones((rows, 6), np.int32),
                pixel_values=rng.standard_normal((rows, 3, size, size)).astype(np.float32))


def placed(config, mesh=None, fsdp=False, layer_loop=True):
    """(state, step, batch) of a fresh train state, placed on the mesh when there is one."""
    optimizer = train.default_optimizer(1e-3, total_steps=10, warmup_steps=0)
    state = train.init_state(dualenc.init(jax.random.key(0), config), optimizer, layer_loop=layer_loop)
    step = train.make_train_step(config, optimizer, mesh=mesh, fsdp=fsdp)
    batch = make_batch(config)
    if mesh is None:
        return state, step, batch
    return train.shard_state(state, mesh, fsdp), step, train.shard_batch(batch, mesh)


def two_steps(state, step, batch):
    """(losses, the leaves of the whole params after two steps, the last state)."""
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), [np.asarray(x) for x in jax.tree_util.tree_leaves(train.full_params(state))], state


def model_gradient(config, mesh, fsdp):
    """Compiles the gradient of the model alone (no train step, so no weights gathered before use) with its
    params placed by the rules and the batch split over "data"."""
    params = dualenc.init(jax.random.key(0), config)

    salt = float(os.getpid() % 997 + 1)  # this process's own program: the session's shared compilation cache
    # would hand another worker's compiled program back without compiling it, and without XLA's warnings

    def loss(params, batch):
        out = dualenc.apply(params, config, **batch)
        return jax.numpy.sum(out.text_embeds * out.image_embeds) * salt
    specs = sharding.state_sharding(params, mesh, fsdp)
    rows = jax.sharding.NamedSharding(mesh, P("data"))
    jax.jit(jax.grad(loss), in_shardings=(specs, rows), out_shardings=specs).lower(params, make_batch(config)).compile()


WARNING = "Involuntary full rematerialization"


@contextlib.contextmanager
def process_stderr(out: dict, key: str):
    """out[key]: what the process writes to its stderr (file descriptor 2: XLA logs from C++) meanwhile, with
    jax's persistent compilation cache off (a program read back is not compiled, and XLA warns as it compiles)."""
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            jax.config.update("jax_enable_compilation_cache", cache)
            f.seek(0)
            out[key] = f.read()


@pytest.fixture(scope="module")
def fsdp_run():
    """The FSDP step on 4 devices (its HLO, losses and params after two steps, XLA's warnings as it compiled),
    and XLA's warnings as it compiled the model's gradient alone under the rules and under the rules with
    attention's q/k/v split over "data" as before issue 24."""
    out = {}
    mesh = sharding.data_mesh()
    with process_stderr(out, "step"):
        state, step, batch = placed(CLIP, mesh, FSDP(min_shard_mb=0))
        out["hlo"] = step.lower(state, batch).compile().as_text()
        out["run"] = two_steps(state, step, batch)
    for name, axes in (("rules", SHARDED_AXES), ("qkv", SHARDED_AXES | {"qkv"})):
        with process_stderr(out, name):
            model_gradient(CLIP, mesh, FSDP(min_shard_mb=0, axes=axes))
    return out


@pytest.fixture(scope="module")
def clip_one_device():
    return two_steps(*placed(CLIP))


def canonical(shape) -> tuple[int, ...]:
    """A shape as a collective may carry it: its sizes sorted (any layout, transposed), 1s dropped."""
    return tuple(sorted(d for d in shape if d != 1))


def assert_same_run(got, want):
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_tensor_parallel_with_fsdp_equals_one_device_and_splits_by_logical_axis(clip_one_device):
    mesh = sharding.model_mesh(2, 2)
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (2, 2)
    got = two_steps(*placed(CLIP, mesh, FSDP(min_shard_mb=0)))
    assert_same_run(got, clip_one_device)
    state = got[2]
    for part in (state.trainable, state.opt_state.mu):  # the optimizer state follows the params
        layer = part["text"]["encoder"][0]
        spec = {name: layer[group][name]["kernel"].sharding.spec for group, names in
                (("attention", ("query", "key", "value", "out")), ("mlp", ("fc1", "fc2"))) for name in names}
        # Megatron: heads and hidden units over "model"; FSDP over "data" on the other axis
        assert spec == dict(query=P("data", "model"), key=P("data", "model"), value=P("data", "model"),
                            out=P("model", "data"), fc1=P("data", "model"), fc2=P("model", "data")), spec
        assert layer["mlp"]["fc1"]["bias"].sharding.spec == P("model")
        assert layer["attention_norm"]["scale"].sharding.spec == P()
        assert part["text"]["embeddings"]["word"].sharding.spec == P("data", None)  # a table: on its rows


def test_fsdp_step_compiles_without_involuntary_rematerialization(fsdp_run):
    done = fsdp_run
    assert WARNING not in done["step"], done["step"][-3000:]
    # the model's gradient alone (no weights gathered before use): clean under the rules, and XLA's warning
    # under the rules with q/k/v split over "data", as before (so the check can fail)
    assert WARNING not in done["rules"], done["rules"][-3000:]
    assert WARNING in done["qkv"]


def test_fsdp_collectives_gather_weights_and_reduce_gradients(fsdp_run):
    """Weights are all-gathered and gradients reduced: XLA's CPU backend writes a reduce-scatter as an all-reduce
    whose result each device slices (its SPMD partitioner emits all-reduce + dynamic-slice, which only GPU
    backends rewrite to reduce-scatter). Nothing else moves but the loss's embeddings (rows x projection) and
    scalars: no activation crosses devices (all-to-all) as it did when XLA carried the weights' split into them."""
    done = fsdp_run
    state = placed(CLIP)[0]
    specs = sharding.state_sharding(state, sharding.data_mesh(), FSDP(min_shard_mb=0)).trainable
    split = {canonical(np.shape(x)) for x, s in zip(jax.tree_util.tree_leaves(state.trainable),
                                                   jax.tree_util.tree_leaves(specs)) if "data" in s.spec}
    params = {canonical(np.shape(x)) for x in jax.tree_util.tree_leaves(state.trainable)}
    found = sharding.collectives(done["hlo"])
    gathered = {canonical(s) for op, shapes in found if op == "all-gather" for s in shapes}
    reduced = {canonical(s) for op, shapes in found if op in ("all-reduce", "reduce-scatter") for s in shapes}
    assert len(split) >= 6 and split <= gathered and split <= reduced, (split - gathered, split - reduced)
    loss = {ROWS, ROWS // 4, CLIP.projection_dim}
    others = [(op, s) for op, shapes in found for s in shapes if op != "collective-permute" and canonical(s)
              and canonical(s) not in params and not set(canonical(s)) <= loss]
    assert not others and not any(op == "all-to-all" for op, _ in found), others


def test_fsdp_step_equals_the_one_device_step(fsdp_run, clip_one_device):
    assert_same_run(fsdp_run["run"], clip_one_device)


def test_rules_refuse_what_they_cannot_mean():
    with pytest.raises(dualenc.ConfigError, match="data x model = 3 x 2 = 6 devices, but there are 4"):
        sharding.model_mesh(3, 2)
    with pytest.raises(dualenc.ConfigError, match="model must be a positive integer"):
        sharding.model_mesh(4, 0)
    with pytest.raises(dualenc.ConfigError, match="do not divide the 2 attention heads of the vision tower"):
        sharding.check_model_parallel(CLIP, sharding.model_mesh(1, 4))
    sharding.check_model_parallel(CLIP, sharding.model_mesh(2, 2))
    with pytest.raises(dualenc.ConfigError, match="needs a 'data' axis"):
        sharding.state_sharding({}, jax.sharding.Mesh(np.array(jax.devices()), ("model",)))
    # attention's q/k/v axis is never split over "data"; a table only along its rows
    fsdp = FSDP(min_shard_mb=0)
    key = lambda *names: tuple(jax.tree_util.SequenceKey(n) if isinstance(n, int) else jax.tree_util.DictKey(n)
                               for n in names)  # noqa: E731
    query = np.zeros((32, 64), np.float32)
    assert fsdp.spec(key("text", "encoder", 0, "attention", "query", "kernel"), query, 4) == P("data", None)
    assert fsdp.spec(key("text", "embeddings", "position"), np.zeros((16, 64), np.float32), 4) == P("data", None)
    assert fsdp.spec(key("vision", "embeddings", "position"), np.zeros((17, 64), np.float32), 4) == P()
    # tensor parallel: SigLIP's head packs q, k and v along in_proj's output axis: not split there
    two_by_two = {"data": 2, "model": 2}
    head = ("vision", "head", "attention")
    in_proj, out = key(*head, "in_proj", "kernel"), key(*head, "out", "kernel")
    assert sharding.leaf_spec(in_proj, np.zeros((32, 96), np.float32), two_by_two) == P()
    assert sharding.leaf_spec(out, np.zeros((32, 32), np.float32), two_by_two) == P("model", None)


# ------------------------------------------------------------------------------------------------ layer decay

DEPTHS = {"vision": 1, "text": 2}
DECAY_CONFIG = dualenc.DualEncoderConfig(
    vision=dualenc.ViTConfig(**SIZE, image_size=16, patch_size=8),
    text=dualenc.BertConfig(**{**SIZE, "num_hidden_layers": 2}, vocab_size=50, max_position_embeddings=16),
    projection_dim=16)


KEPT = ("['query']['kernel']", "['fc2']['bias']", "['word']", "['patch']['kernel']", "['pooler']['kernel']",
        "['post_norm']['scale']", "_projection']", "['logit_scale']")


def some(tree, path=""):
    """A few leaves of each group of a params tree, in its layout (the optimizer runs op by op on them)."""
    if isinstance(tree, tuple):
        return tuple(some(v, path) for v in tree)
    if not isinstance(tree, dict):
        return tree if any(k in path for k in KEPT) else None
    out = {k: some(v, f"{path}['{k}']") for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}


@pytest.fixture(scope="module")
def decay_params():
    return dualenc.init(jax.random.key(0), DECAY_CONFIG)


def expected_factor(path, leaf, decay):
    """BEiT's factor of a leaf, written out from the definition: decay ** (depth + 1 - layer_id)."""
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    side, rest = keys[0], keys[1:]
    if side not in DEPTHS or rest[0] in ("pooler", "post_norm", "head"):
        return 1.0
    depth = DEPTHS[side]
    if rest[0] == "embeddings":
        return decay ** (depth + 1)
    if isinstance(rest[1], int):  # per-layer: layer rest[1] is layer_id rest[1] + 1
        return decay ** (depth - rest[1])
    return (decay ** (depth - np.arange(depth))).reshape((-1,) + (1,) * (np.ndim(leaf) - 1))


@pytest.mark.parametrize("stacked", [False, True])
def test_layer_decay_scales_each_layers_step(decay_params, stacked):
    params = some(model.with_layout(decay_params, stacked=stacked))
    grads = jax.tree_util.tree_map(lambda x: np.random.default_rng(x.size).standard_normal(x.shape, np.float32),
                                   params)
    updates = {}
    for decay in (None, 0.5):
        optimizer = train.default_optimizer(1e-2, total_steps=4, warmup_steps=0, weight_decay=0.5,
                                            layer_decay=decay)
        updates[decay], _ = optimizer.update(grads, optimizer.init(params), params)
    checked = set()
    for (path, plain), decayed in zip(jax.tree_util.tree_leaves_with_path(updates[None]),
                                      jax.tree_util.tree_leaves(updates[0.5])):
        factor = expected_factor(path, plain, 0.5)
        np.testing.assert_allclose(decayed, np.asarray(plain) * np.float32(factor), rtol=1e-6, atol=0,
                                   err_msg=jax.tree_util.keystr(path))
        checked.update(np.ravel(factor).tolist())
    assert checked == {1.0, 0.5, 0.25, 0.125}  # every layer of both towers, their embeddings and heads


def test_layer_decay_of_a_partly_unlocked_tower_and_refusals(decay_params):
    trainable, _ = train.partition(model.with_layout(decay_params, stacked=True), ("text",), 1)
    scales = optim.layer_scales(trainable, 0.5, depths={"text": 3})  # as if the tower had 3 layers
    np.testing.assert_array_equal(scales["text"]["encoder"]["mlp"]["fc1"]["kernel"], [[[0.5]]])  # layer 3 of 3
    assert scales["text"]["pooler"]["kernel"] == 1.0 and scales["vision"]["embeddings"]["patch"]["kernel"] == 0.25
    assert "embeddings" not in scales["text"]  # frozen
    for bad in (0.0, 1.5, True):
        with pytest.raises(dualenc.ConfigError, match="layer_decay must be a number in"):
            train.default_optimizer(total_steps=4, layer_decay=bad)
    with pytest.raises(dualenc.ConfigError, match="depths must map towers"):
        optim.layer_scales(trainable, 0.5, depths={"text": 0})


def test_without_layer_decay_the_step_is_optaxs_to_the_bit(decay_params):
    params = some(model.with_layout(decay_params, stacked=True))
    grads = jax.tree_util.tree_map(lambda x: np.full(x.shape, 1e-3, np.float32), params)
    ours = train.default_optimizer(1e-2, total_steps=4, warmup_steps=0, clip_norm=None)
    theirs = optax.adamw(train.learning_rate_schedule(1e-2, total_steps=4, warmup_steps=0), b1=0.9, b2=0.98,
                         eps=1e-6, weight_decay=0.1, mask=optim.decay_mask)
    a, b = ours.init(params), theirs.init(params)
    for _ in range(2):
        (mine, a), (reference, b) = ours.update(grads, a, params), theirs.update(grads, b, params)
    for x, y in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(reference), strict=True):
        np.testing.assert_array_equal(x, y)
