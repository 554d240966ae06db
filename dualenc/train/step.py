"""The jitted contrastive train step (state, batch) -> (state, metrics), and LiT's cache of a locked tower.

A locked tower's params live in `state.frozen`: they get no optimizer state and no backward pass. With
`cached=True` the locked tower is not run at all: the batch carries its pooled outputs, computed once with
`tower_features`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc import losses, model, towers
from dualenc.config import DualEncoderConfig
from dualenc.errors import ConfigError, InputError
from dualenc.evaluate import pad_rows
from dualenc.train import accumulate
from dualenc.train import sharding
from dualenc.train.sharding import state_sharding
from dualenc.train.state import TOWERS, TrainState, check_locking, model_params

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100


def _embeds(params, config: DualEncoderConfig, batch, key, *, locked, cached, remat_policy, dtype,
            patch_dropout: float = 0.0):
    keys = dict(zip(TOWERS, jax.random.split(key)))
    drop = {t: None if t in locked else keys[t] for t in TOWERS}  # locked towers run deterministically
    pooled, state = {}, {}
    for side, cache_key in (("vision", "image_features"), ("text", "text_features")):
        if side in cached:
            pooled[side] = batch[cache_key]
            continue
        flags = {}
        if side == "vision" and patch_dropout:  # FLIP: a random subset of patches per image, also when locked
            flags = {"patch_dropout": patch_dropout, "patch_key": jax.random.fold_in(keys[side], 1)}
        out = model.run_tower(params, config, side, batch, pooled=True, dropout_key=drop[side],
                              remat_policy=remat_policy, dtype=dtype, **flags)
        pooled[side] = out.pooler_output
        if getattr(out, "state", None) is not None:  # a family with state (BatchNorm statistics), training
            state[side] = out.state
    image_pooled, text_pooled = pooled["vision"], pooled["text"]
    return (model.normalize(model.project(params, "vision", image_pooled, dtype)),
            model.normalize(model.project(params, "text", text_pooled, dtype)), state)


def _with_state(trainable: dict, state: dict) -> dict:
    """trainable params with the towers' state (a training forward's new values, {side: {name: value}}) in place
    of whatever the optimizer made of it: state is carried, not learned (see towers.Family.state)."""
    out = dict(trainable)
    for side, values in state.items():
        if side in out:
            out[side] = {**out[side], **{k: v for k, v in values.items() if k in out[side]}}
    return out


def make_train_step(config: DualEncoderConfig, optimizer, *, loss: str | None = None, locked: Sequence[str] = (),
                    unlocked_layers: int = 0, cached: bool = False, remat_policy: str | None = None, dtype=None,
                    chunk_size: int | None = None, donate: bool = True, mesh: Mesh | None = None,
                    fsdp: bool = False, accum_steps: int = 1, patch_dropout: float = 0.0, lora=None,
                    loss_form: str = "auto") -> Callable:
    """A pure train step (state, batch) -> (state, metrics), jit-compiled on first call.

    Args:
      optimizer: an optax GradientTransformation (see default_optimizer); used with init_state's partition.
      loss: "clip" (softmax; exp(logit_scale) is clamped at 100 as CLIP does) or "siglip" (sigmoid, with the
        logit bias; the config needs logit_bias_init_value; no clamp, as big_vision). None, the default: the
        model's own (config.default_loss: "siglip" for SigLIP models, else "clip").
      locked: towers to lock, e.g. ("vision",) for LiT; unlocked_layers keeps their top k layers trainable.
      cached: the batch carries the locked tower's pooled outputs ("image_features" / "text_features") instead
        of its inputs, so the locked tower is not run (see tower_features).
      remat_policy: a jax.checkpoint_policies name, to rematerialise encoder layers in the backward pass.
      dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); params and optimizer state stay float32.
      chunk_size: compute the loss in row chunks of this size.
      donate: donate the input state's buffers to the output state.
      mesh: data-parallel over the mesh's "data" axis: place state with shard_state and batches with
        shard_batch; the loss then spans the global batch. fsdp: also shard params and optimizer state.
      accum_steps: split the batch into this many micro-batches and accumulate the exact gradient of the whole
        batch's loss, one micro-batch's activations at a time (GradCache; see dualenc.train.accumulate). The
        batch size must be a multiple of accum_steps (times the devices of the mesh's "data" axis).
      patch_dropout: FLIP's patch dropout: the vision tower keeps max(1, int((1 - p) * N)) of its N patch tokens
        per image (open_clip's PatchDropout count), at random each step (never outside training).
      loss_form: with a mesh, how the loss spans the devices: "ring" passes embedding blocks round them, each
        device holding its own rows against one block at a time (losses.sharded_loss; SigLIP's chunked form,
        and a running log-sum-exp for CLIP's), "gather" gathers every embedding on every device; "auto", the
        default: "ring" on a mesh whose "data" axis has several devices, else "gather".
      lora: a dualenc.lora.LoRA: the state (init_state(..., lora=...)) trains adapters of the kernels it names,
        every other param frozen; the model runs with them merged (dualenc.lora.merge).

    The batch holds input_ids, attention_mask (and token_type_ids), and pixel_values, each with the global
    batch on axis 0. Metrics: loss, logit_scale (exp), accuracy_t2i, accuracy_i2t, grad_norm; and, when the batch
    holds records_replaced (rows, k) (the pipeline's count of unusable records each row replaced), its sum (k,).
    """
    import optax

    locked = check_locking(locked, unlocked_layers)
    loss = loss or config.default_loss
    if loss not in ("clip", "siglip"):
        raise ConfigError(f"loss must be 'clip' or 'siglip', got {loss!r}")
    if loss == "siglip" and config.logit_bias_init_value is None:
        raise ConfigError("loss='siglip' needs a learnable logit bias: set the config's logit_bias_init_value "
                          "(SigLIP uses -10 with logit_scale_init_value log 10)")
    cached_towers = tuple(locked) if cached else ()
    if cached and (len(locked) != 1 or unlocked_layers):
        raise ConfigError("cached=True needs exactly one fully locked tower (locked=('vision',) or ('text',), "
                          "unlocked_layers=0)")
    if remat_policy is not None and not hasattr(jax.checkpoint_policies, remat_policy):
        raise ConfigError(f"remat_policy {remat_policy!r} is not in jax.checkpoint_policies")
    accum_steps = accumulate.check_steps(accum_steps)
    if accum_steps > 1:
        stateful = [side for side in TOWERS if towers.family(getattr(config, side)).state and side not in locked]
        if stateful:
            raise ConfigError(f"accum_steps > 1 with the {stateful[0]} tower's running statistics (BatchNorm, "
                              f"carried as state) is not supported: each micro-batch would update them; lock "
                              f"that tower or train with accum_steps=1")
    if isinstance(patch_dropout, bool) or not isinstance(patch_dropout, (int, float)) or \
            not 0 <= patch_dropout < 1:
        raise ConfigError(f"patch_dropout must be a share in [0, 1), got {patch_dropout!r}")
    if patch_dropout and "vision" in cached_towers:
        raise ConfigError("patch_dropout with cached=True: the cached vision features are computed once, "
                          "from every patch; train without the cache to drop patches")

    if mesh is not None:
        sharding.check_model_parallel(config, mesh)
    if loss_form not in ("auto", "ring", "gather"):
        raise ConfigError(f"loss_form must be 'auto', 'ring' or 'gather', got {loss_form!r}")
    if loss_form == "ring" and mesh is None:
        raise ConfigError("loss_form='ring' passes embeddings round the devices of a mesh: give mesh=...")
    ring = loss_form == "ring" or (loss_form == "auto" and mesh is not None and mesh.shape["data"] > 1)
    if ring:  # the in-batch accuracy too: the gathered one would hold n x N scores on each device
        sharded = losses.sharded_loss(loss, mesh, form="ring", chunk_size=chunk_size)
        accuracy = losses.sharded_accuracy(mesh)
    else:
        accuracy = losses.in_batch_accuracy

    def loss_value(params, images, texts):
        if ring:
            return sharded(texts, images, params["logit_scale"], params["logit_bias"] if loss == "siglip" else None)
        if loss == "clip":
            return losses.clip_loss(texts, images, params["logit_scale"], chunk_size=chunk_size)
        return losses.siglip_loss(texts, images, params["logit_scale"], params["logit_bias"],
                                  chunk_size=chunk_size)

    def core(step_count, trainable, opt_state, rng, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step_count)
        inputs = {k: v for k, v in batch.items() if k != "records_replaced"}

        def embed(trainable, inputs, key):
            held = frozen
            if mesh is not None:  # FSDP: each weight gathered where it is used (tensor-parallel splits stay)
                trainable, held = sharding.gather(trainable, mesh), sharding.gather(frozen, mesh)
            params = model_params(trainable, held, lora)
            return _embeds(params, config, inputs, key, locked=locked, cached=cached_towers,
                           remat_policy=remat_policy, dtype=dtype, patch_dropout=patch_dropout)

        if accum_steps == 1:
            def loss_fn(trainable):
                images, texts, state = embed(trainable, inputs, key)
                value = loss_value(model_params(trainable, frozen, lora), images, texts)
                return value, (images, texts, jax.lax.stop_gradient(state))

            (value, (images, texts, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        else:
            value, grads, images, texts = accumulate.value_and_grad(
                lambda t, x, k: embed(t, x, k)[:2],
                lambda t, i, x: loss_value(model_params(t, frozen, lora), i, x),
                trainable, inputs, key, accum_steps, mesh=mesh)
            state = {}
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = _with_state(optax.apply_updates(trainable, updates), state)
        if loss == "clip" and "logit_scale" in trainable:
            trainable["logit_scale"] = jnp.clip(trainable["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        scale = (trainable if "logit_scale" in trainable else frozen)["logit_scale"]
        t2i, i2t = accuracy(jax.lax.stop_gradient(texts), jax.lax.stop_gradient(images))
        metrics = {"loss": value, "logit_scale": jnp.exp(scale), "accuracy_t2i": t2i,
                   "accuracy_i2t": i2t, "grad_norm": optax.tree.norm(grads)}
        if "records_replaced" in batch:  # each row's count: summed over the global batch, every process's rows
            metrics["records_replaced"] = jnp.sum(batch["records_replaced"], axis=0)
        return step_count + 1, trainable, opt_state, metrics

    # The step count, trainable params and optimizer state are donated; frozen params (often the caller's own
    # arrays) and the batch are not.
    donate_argnums = (0, 1, 2) if donate else ()
    compiled = {}

    def jitted(state: TrainState):
        if mesh is None:
            return compiled.get(None) or compiled.setdefault(None, jax.jit(core, donate_argnums=donate_argnums))
        treedef = jax.tree_util.tree_structure(state)
        if treedef not in compiled:
            s = state_sharding(state, mesh, fsdp)
            data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
            compiled[treedef] = jax.jit(
                core, donate_argnums=donate_argnums,
                in_shardings=(s.step, s.trainable, s.opt_state, s.rng, s.frozen, data),
                out_shardings=(s.step, s.trainable, s.opt_state, replicated))
        return compiled[treedef]

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        count, trainable, opt_state, metrics = jitted(state)(state.step, state.trainable, state.opt_state,
                                                             state.rng, state.frozen, batch)
        return TrainState(count, trainable, state.frozen, opt_state, state.rng), metrics

    def lower(state: TrainState, batch: dict):
        """The step's jax.stages.Lowered for this state and batch (arrays or jax.ShapeDtypeStructs): .compile()
        gives its memory_analysis() and its HLO (as_text()), without running it."""
        return jitted(state).lower(state.step, state.trainable, state.opt_state, state.rng, state.frozen, batch)

    step.lower = lower
    return step


@functools.partial(jax.jit, static_argnames=("tower", "dtype"))
def pooled(params, config: DualEncoderConfig, tower: str, inputs: dict, dtype=None) -> jax.Array:
    return model.run_tower({tower: params}, config, tower, inputs, pooled=True, dtype=dtype).pooler_output


def tower_features(params: dict, config: DualEncoderConfig, tower: str, inputs: dict, *, batch_size: int = 64,
                   dtype=None) -> np.ndarray:
    """Pooled outputs of one tower for a whole dataset, computed once (LiT's cache of the locked tower).

    Args:
      inputs: the tower's inputs, each (N, ...): for "vision", {"pixel_values": (N, C, H, W)}, or for a NaFlex
        tower (SigLIP 2) the NaFlexImageProcessor's {"pixel_values", "pixel_attention_mask", "spatial_shapes"};
        for "text", {"input_ids": (N, L), ...}.

    Returns:
      float32 (N, hidden_size), in fixed-size batches (the last one padded with copies of its last row) so the
      tower compiles once, also across calls.
    """
    if tower not in TOWERS:
        raise InputError(f"tower must be one of {TOWERS}, got {tower!r}")
    sizes = {k: len(v) for k, v in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"the inputs have different numbers of rows: {sizes}")
    n = next(iter(sizes.values()), 0)
    out = []
    for start in range(0, n, batch_size):
        chunk = pad_rows({k: np.asarray(v[start:start + batch_size]) for k, v in inputs.items()}, batch_size)
        rows = min(batch_size, n - start)
        out.append(np.asarray(pooled(params[tower], config, tower, chunk, dtype=dtype), np.float32)[:rows])
    if out:
        return np.concatenate(out)
    if not inputs:
        raise InputError(f"inputs holds no arrays for the {tower} tower")
    # no rows: the pooled width from the tower's shapes (one zero row of each input, traced, never run)
    one = {k: jax.ShapeDtypeStruct((1, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in inputs.items()}
    width = jax.eval_shape(lambda x: pooled(params[tower], config, tower, x, dtype=dtype), one).shape[-1]
    return np.zeros((0, width), np.float32)
