"""The train step: LiT locking and cache, options, data parallel over a mesh and over processes, resume."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY

import dualenc
from dualenc import data, demo, train
from dualenc.train import loop as trainer
from dualenc.train.sharding import FSDP

CONFIG = dualenc.DualEncoderConfig(
    vision=dualenc.ViTConfig(**TINY, image_size=16, patch_size=8),
    text=dualenc.BertConfig(**TINY, vocab_size=50, max_position_embeddings=16), projection_dim=16)


def synthetic_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return dict(input_ids=rng.integers(1, 50, (n, 6)).astype(np.int32), attention_mask=np.ones((n, 6), np.int32),
                pixel_values=rng.standard_normal((n, 3, 16, 16)).astype(np.float32))


def host_train_step(diverge_at=None, batches=None):
    """A stand-in for train.make_train_step, on the host, for tests of fit's control flow (a real step takes
    seconds to compile): the step count advances, metrics are constants but records_replaced, summed over the
    batch as the real step sums it; from step `diverge_at` on, the loss and the trainable params are NaN.
    `batches` collects the batches it is given."""
    def make(*_, **__):
        def step(state, batch):
            if batches is not None:
                batches.append(batch)
            count = int(state.step) + 1
            scale = np.float32(np.nan if diverge_at is not None and count >= diverge_at else 1.0)
            trainable = jax.tree_util.tree_map(lambda x: np.asarray(x) * scale, state.trainable)
            metrics = {"loss": np.float32(2.0) * scale, "grad_norm": np.float32(0.5), "logit_scale": np.float32(1),
                       "accuracy_t2i": np.float32(0), "accuracy_i2t": np.float32(0),
                       "records_replaced": np.asarray(batch["records_replaced"]).sum(axis=0)}
            return state._replace(step=np.int32(count), trainable=trainable), metrics
        return step
    return make


def run(config, params, steps=3, batch=None, **kw):
    batch = batch if batch is not None else synthetic_batch()
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    loop = {"layer_loop": kw.pop("layer_loop", False)}  # scanned layers compile faster; both layouts tested
    lock = {k: kw.pop(k) for k in ("locked", "unlocked_layers") if k in kw}
    state = train.init_state(params, optimizer, **lock, **loop)
    step = train.make_train_step(config, optimizer, **lock, **kw)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def close(a, b, atol=1e-5):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: bool(np.allclose(x, y, atol=atol, rtol=0)), a, b)))


@pytest.fixture(scope="module")
def params():
    return dualenc.init(jax.random.key(0), CONFIG)


@pytest.fixture(scope="module")
def baseline(params):
    """Three plain steps, for the variants to compare with."""
    return run(CONFIG, params, steps=3)


def test_step_trains_and_reports_metrics(params):
    state, history = run(CONFIG, params, steps=8)
    assert history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) == {"loss", "logit_scale", "accuracy_t2i", "accuracy_i2t", "grad_norm"}
    assert history[0]["logit_scale"] == pytest.approx(np.exp(2.6592), rel=1e-3)
    assert int(state.step) == 8
    assert not close(train.full_params(state), params)


@pytest.mark.parametrize("clip_norm", [1.0, 1e3])  # clipping on, and a bound the gradients stay under
def test_clipped_adamw_matches_the_optax_chain(params, clip_norm):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, end_value=0.0)
    ours = train.clipped_adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, mask=train.decay_mask,
                               clip_norm=clip_norm)
    reference = optax.chain(optax.clip_by_global_norm(clip_norm),
                            optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                                        mask=train.decay_mask))
    rng = np.random.default_rng(0)
    p_ours = p_ref = params
    s_ours, s_ref = ours.init(params), reference.init(params)
    update_ours, update_ref = jax.jit(ours.update), jax.jit(reference.update)
    clipped = 0
    for _ in range(4):
        grads = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1, params)
        clipped += float(optax.tree.norm(grads)) > clip_norm
        u_ours, s_ours = update_ours(grads, s_ours, p_ours)
        u_ref, s_ref = update_ref(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    assert clipped == (4 if clip_norm == 1.0 else 0)
    for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_ref)):
        if clip_norm == 1.0:  # the clipping scale is rounded once, not twice as optax does
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        else:  # otherwise the same operations in the same order: the same bits
            np.testing.assert_array_equal(a, b)
    unmasked = train.clipped_adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, clip_norm=clip_norm)
    u_all, _ = unmasked.update(grads, s_ours, p_ours)  # decays biases too: the mask matters
    u_masked, _ = ours.update(grads, s_ours, p_ours)
    assert not np.allclose(u_all["text"]["pooler"]["bias"], u_masked["text"]["pooler"]["bias"])
    assert int(s_ours.count) == 4
    chain_mu = s_ref[1][0].mu
    for a, b in zip(jax.tree_util.tree_leaves(s_ours.mu), jax.tree_util.tree_leaves(chain_mu)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    with pytest.raises(dualenc.InputError, match="params"):
        ours.update(grads, s_ours)


def test_checkpoints_of_the_optax_chain_resume_into_clipped_adamw(params, tmp_path):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 1, 10, end_value=0.0)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                                                                    weight_decay=0.1, mask=train.decay_mask))
    ours = train.clipped_adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, mask=train.decay_mask,
                               clip_norm=1.0)
    states = {name: train.init_state(params, opt, locked=("vision",), layer_loop=False)
              for name, opt in (("chain", chain), ("ours", ours))}
    steps = {name: train.make_train_step(CONFIG, opt, locked=("vision",))
             for name, opt in (("chain", chain), ("ours", ours))}
    batch = synthetic_batch()
    for _ in range(2):  # as written before default_optimizer changed
        states["chain"], _ = steps["chain"](states["chain"], batch)
    saved = trainer.save_state(str(tmp_path), states["chain"], {"data_position": [0, 2]}, format="safetensors")
    meta = trainer.checkpoint_meta(saved)
    del meta["checksums"]  # as written then, before checksums were recorded
    dualenc.files.write_json_atomic(f"{saved}/{trainer.META_FILE}", meta)
    restored, meta = trainer.restore_state(saved, states["ours"])
    assert int(restored.opt_state.count) == 2 and meta["step"] == 2
    assert close(restored.opt_state.nu, states["chain"].opt_state[1][0].nu, atol=0)
    after_chain, _ = steps["chain"](states["chain"], batch)
    after_ours, _ = steps["ours"](restored, batch)
    assert close(after_ours.trainable, after_chain.trainable, atol=1e-6)  # the run goes on as it would have
    with pytest.raises(dualenc.CheckpointError, match="does not match"):  # other layouts are still refused
        trainer.restore_state(saved, train.init_state(params, ours, layer_loop=False))


def test_locked_tower_gets_no_optimizer_state_and_no_backward(params):
    state, _ = run(CONFIG, params, locked=("vision",))
    assert close(train.full_params(state)["vision"], params["vision"], atol=0)
    assert "vision" not in state.trainable
    opt_leaves = len(jax.tree_util.tree_leaves(state.opt_state))
    full_leaves = len(jax.tree_util.tree_leaves(run(CONFIG, params, steps=1)[0].opt_state))
    assert opt_leaves < full_leaves
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    programs = {}
    for loop in (True, False):
        for locked in ((), ("vision",)):
            st = train.init_state(params, optimizer, locked=locked, layer_loop=loop)
            step = train.make_train_step(CONFIG, optimizer, locked=locked)
            programs[loop, locked] = str(jax.make_jaxpr(lambda s, b: step(s, b)[1]["loss"])(st, synthetic_batch()))
    # scanned layers: each tower's encoder scan runs forward and backward (4 scans); locked: no vision backward
    # (its forward-only loop holds the last layer a second time, first-token-only, so dots are not counted)
    assert programs[False, ()].count("scan[") == 4 and programs[False, ("vision",)].count("scan[") == 3
    assert programs[True, ("vision",)].count("dot_general") < 0.8 * programs[True, ()].count("dot_general")
    assert programs[True, ()].count("scan[") == 0


def test_layer_loop_and_scan_train_alike(params, baseline):
    looped, _ = run(CONFIG, params, layer_loop=True)
    assert close(train.full_params(looped), train.full_params(baseline[0]), atol=1e-6)
    assert isinstance(looped.trainable["text"]["encoder"], tuple)


def test_lit_cache_equals_running_the_locked_tower(params):
    batch = synthetic_batch()
    features = train.tower_features(params, CONFIG, "vision", {"pixel_values": batch["pixel_values"]},
                                    batch_size=3)
    cached_batch = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": features}
    state_a, hist_a = run(CONFIG, params, steps=4, batch=batch, locked=("vision",))
    state_b, hist_b = run(CONFIG, params, steps=4, batch=cached_batch, locked=("vision",), cached=True)
    assert close(state_a.trainable, state_b.trainable)
    assert abs(hist_a[-1]["loss"] - hist_b[-1]["loss"]) <= 1e-5


def test_top_layers_of_a_locked_tower_can_train(params):
    state, _ = run(CONFIG, params, locked=("text",), unlocked_layers=1)
    full = train.full_params(state)
    enc, before = full["text"]["encoder"], params["text"]["encoder"]
    np.testing.assert_array_equal(enc[0]["mlp"]["fc1"]["kernel"], before[0]["mlp"]["fc1"]["kernel"])
    assert not np.allclose(enc[1]["mlp"]["fc1"]["kernel"], before[1]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(full["text"]["embeddings"]["word"], params["text"]["embeddings"]["word"])
    assert not np.allclose(full["text"]["pooler"]["kernel"], params["text"]["pooler"]["kernel"])
    with pytest.raises(ValueError, match="unlocked_layers=3 exceeds"):
        run(CONFIG, params, locked=("text",), unlocked_layers=3)


def test_options_remat_bf16_siglip_and_clamp(params, baseline):
    base, base_history = baseline
    remat, _ = run(CONFIG, params, remat_policy="nothing_saveable")
    assert close(base.trainable, remat.trainable, atol=1e-6)
    chunked, _ = run(CONFIG, params, chunk_size=4)
    assert close(base.trainable, chunked.trainable, atol=1e-5)
    _, low = run(CONFIG, params, dtype=jax.numpy.bfloat16)
    assert np.isfinite(low[-1]["loss"]) and abs(low[0]["loss"] - base_history[0]["loss"]) < 0.1
    siglip = dataclasses.replace(CONFIG, logit_scale_init_value=float(np.log(10)), logit_bias_init_value=-10.0)
    state, hist = run(siglip, dualenc.init(jax.random.key(0), siglip), steps=6, loss="siglip")
    assert hist[-1]["loss"] < hist[0]["loss"] and float(state.trainable["logit_bias"]) != -10.0
    with pytest.raises(ValueError, match="logit_bias_init_value"):
        run(CONFIG, params, loss="siglip")
    hot = dict(params, logit_scale=np.float32(4.7))
    state, hist = run(CONFIG, hot, steps=1)
    assert float(state.trainable["logit_scale"]) <= np.log(100) + 1e-6


def test_mesh_data_parallel_and_fsdp_equal_one_device(params, baseline):
    batch = synthetic_batch()
    single, _ = baseline
    data = train.data_mesh()
    assert data.size == 4
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    replaced = np.arange(8 * 4, dtype=np.int32).reshape(8, 4) % 3  # each row's count by reason, as fit passes it
    # no size floor: the tiny model's tables are split too; on 2 x 2, BERT's heads split over "model" as well
    # per-layer params (which compile twice as long as scanned ones) once, with FSDP, where their layout matters
    for mesh, fsdp, loop in ((data, False, False), (data, FSDP(min_shard_mb=0), True),
                             (train.sharding.model_mesh(2, 2), FSDP(min_shard_mb=0), False)):
        state = train.shard_state(train.init_state(params, optimizer, layer_loop=loop), mesh, fsdp)
        step = train.make_train_step(CONFIG, optimizer, mesh=mesh, fsdp=fsdp)
        for _ in range(3):
            state, metrics = step(state, train.shard_batch({**batch, "records_replaced": replaced}, mesh))
        np.testing.assert_array_equal(metrics["records_replaced"], replaced.sum(axis=0))  # over every device's rows
        assert close(train.full_params(state), train.full_params(single))
        word = state.trainable["text"]["embeddings"]["word"]
        assert (len(word.sharding.device_set) == 4) and (word.sharding.spec != () or not fsdp)
        if "model" in mesh.axis_names:  # stacked (layers, embed, qkv): heads over "model", FSDP on "embed"
            query = state.trainable["text"]["encoder"]["attention"]["query"]["kernel"]
            assert query.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model")


def test_loss_falls_and_zero_shot_rises_on_digits(tmp_path):
    train_set, test_set = data.load_digits("train", image_size=16), data.load_digits("test", image_size=16)
    held_out = "a drawing of the number {}"
    data.write_vocab(tmp_path, train_set.captions + [held_out])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(tmp_path, max_length=16))
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                 image_size=16, patch_size=4),
        text=dualenc.BertConfig(vocab_size=processor.tokenizer.vocab_size, hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=16,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), projection_dim=64)
    params = dualenc.init(jax.random.key(0), config)

    def accuracy(p):
        classifier = dualenc.zero_shot_classifier(p, config, processor, data.DIGIT_WORDS, [held_out])
        top, _ = dualenc.zero_shot_predict(dualenc.encode_images(p, config, processor, test_set.images,
                                                                 batch_size=120), classifier, params=p)
        return float(np.mean(top[:, 0] == test_set.labels))

    losses, in_batch = [], []

    def log(step, metrics):
        losses.append(float(metrics["loss"]))
        in_batch.append((float(metrics["accuracy_i2t"]) + float(metrics["accuracy_t2i"])) / 2)

    before = accuracy(params)
    params, _ = trainer.fit(config, params, train_set, processor,
                            trainer.TrainConfig(steps=600, batch_size=64, learning_rate=1e-3, max_length=16),
                            callback=log)
    after = accuracy(params)
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.8
    assert after >= 0.3 and after > before + 0.15, (before, after)
    # Captions name only the class: in-batch accuracy stays under its ceiling and the loss over its floor (the
    # figures demo.png draws and explains), however well held-out images are classified.
    limits = demo.in_batch_limits(train_set.labels, 64)
    assert np.mean(in_batch[-100:]) < limits["accuracy"] + 0.02 and np.mean(losses[-100:]) > limits["loss"] - 0.05


def test_a_batch_larger_than_the_data_says_what_to_do(params):
    """fit() on fewer distinct images than the batch: the error says how many there are and what to lower."""
    from dualenc.data.pipeline import GlobalOrder

    pairs = data.PairDataset([np.zeros((16, 16, 3), np.uint8)] * 3, ["a", "b", "c"], np.arange(3))
    with pytest.raises(dualenc.DataError, match=r"^batch_size 8 is more than the 3 distinct images of the dataset, "
                                                r"and a batch holds each at most once: lower batch_size to 3 or less$"):
        data.Batches(pairs, None, 8)
    with pytest.raises(dualenc.DataError, match=r"^batch_size 8 is more than the 3 records \(distinct images\) of "
                                                r"the data.*lower batch_size to 3 or less$"):
        trainer.fit(CONFIG, params, pairs, None, trainer.TrainConfig(steps=2, batch_size=8, max_length=16))
    with pytest.raises(dualenc.DataError, match="batch_size must be at least 1, got 0"):
        GlobalOrder(3, 0)


def test_a_diverged_run_stops_unsaved_and_a_resume_checks_the_model_and_the_data(params, tmp_path, monkeypatch):
    """Issue 22 (points 7, 8). A step whose loss is NaN (and its params, as a diverging run's) stops fit at that
    step, naming it and the last checkpoint; nothing of that step or later is saved. A resume then checks the
    starting model and the data by their fingerprints: other weights of the same shapes, or other captions over
    the same images, are refused, naming what differs. (A stand-in train step: fit's control flow is under test.)"""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), np.uint8) for _ in range(8)]
    words = [f"word{i}" for i in range(8)]
    pairs = data.PairDataset(images, [f"a {w}" for w in words], np.arange(8))
    data.write_vocab(tmp_path / "vocab", pairs.captions)
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(tmp_path / "vocab", max_length=8))
    run = trainer.TrainConfig(steps=6, batch_size=4, max_length=8, checkpoint_every=2, locked=("vision",))
    monkeypatch.setattr(train, "make_train_step", host_train_step(diverge_at=4))
    directory = str(tmp_path / "checkpoints")
    last = f"{directory}/step_00000002"
    with pytest.raises(trainer.NonFiniteLoss, match=rf"^training diverged at step 4 \(loss nan, gradient norm 0.5\): "
                                                    rf"stopped there, saving nothing from that step on; the last "
                                                    rf"checkpoint, written before it, is {last} "):
        trainer.fit(CONFIG, params, pairs, processor, run, checkpoint_dir=directory)
    assert trainer.checkpoints(directory) == [(2, last)]
    recorded = trainer.checkpoint_meta(last)["settings"]
    assert {k: recorded[k] for k in ("model_sha256", "data_sha256")} == trainer.fingerprints(params, pairs)
    other = dualenc.init(jax.random.key(1), CONFIG)
    with pytest.raises(dualenc.CheckpointError, match=r"step_00000002 was written by a run with other settings: "
                                                      r"model_sha256 \w{12}\.\.\. there, \w{12}\.\.\. here \(not the "
                                                      r"model the run started from\)$"):
        trainer.fit(CONFIG, other, pairs, processor, run, checkpoint_dir=directory)
    recaptioned = data.PairDataset(images, [f"a {w}" for w in reversed(words)], np.arange(8))
    with pytest.raises(dualenc.CheckpointError, match=r"data_sha256 \w{12}\.\.\. there, \w{12}\.\.\. here \(not the "
                                                      r"training data\)$"):
        trainer.fit(CONFIG, params, recaptioned, processor, run, checkpoint_dir=directory)
