"""Contrastive training: train state, the jitted step, LiT locking and embedding cache, mesh sharding.

The step is a pure function (state, batch) -> (state, metrics). A locked tower's params live in
`state.frozen`: they get no optimizer state and no backward pass. With `cached=True` the locked tower is not
run at all: the batch carries its pooled outputs, computed once with `tower_features`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualenc import bert, layers, losses, model, vit
from dualenc.config import DualEncoderConfig
from dualenc.errors import ConfigError, InputError

TOWERS = ("vision", "text")
# Per tower: params after the encoder, trainable together with unlocked top layers.
_POST_ENCODER = {"vision": ("post_norm", "pooler"), "text": ("pooler",)}
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    trainable: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array  # uint32 key data, so the state is plain arrays


def _check_locking(locked: Sequence[str], unlocked_layers: int):
    locked = tuple(locked)
    if any(t not in TOWERS for t in locked) or len(set(locked)) != len(locked):
        raise ConfigError(f"locked must name towers among {TOWERS}, got {locked!r}")
    if isinstance(unlocked_layers, bool) or not isinstance(unlocked_layers, int) or unlocked_layers < 0:
        raise ConfigError(f"unlocked_layers must be a non-negative integer, got {unlocked_layers!r}")
    if unlocked_layers and not locked:
        raise ConfigError("unlocked_layers needs a locked tower")
    return locked


def _take_layers(encoder, start: int, stop: int | None):
    if isinstance(encoder, (tuple, list)):
        return tuple(encoder[start:stop])
    return jax.tree_util.tree_map(lambda x: x[start:stop], encoder)


def partition(params: dict, locked: Sequence[str] = (), unlocked_layers: int = 0) -> tuple[dict, dict]:
    """Splits params into (trainable, frozen). A locked tower is frozen except, with unlocked_layers=k, its
    top k encoder layers and what follows them (final norm, pooler). Projections and logit scale/bias train.
    Works on either layer layout (stacked, or per-layer tuples)."""
    locked = _check_locking(locked, unlocked_layers)
    trainable, frozen = {}, {}
    for name, value in params.items():
        if name not in locked:
            trainable[name] = value
        elif unlocked_layers == 0:
            frozen[name] = value
        else:
            depth = layers.num_layers(value["encoder"])
            if unlocked_layers > depth:
                raise ConfigError(f"unlocked_layers={unlocked_layers} exceeds the {depth} layers of the "
                                  f"{name} tower")
            cut = depth - unlocked_layers
            frozen[name] = {k: v for k, v in value.items() if k not in _POST_ENCODER[name]}
            frozen[name]["encoder"] = _take_layers(value["encoder"], 0, cut)
            trainable[name] = {k: v for k, v in value.items() if k in _POST_ENCODER[name]}
            trainable[name]["encoder"] = _take_layers(value["encoder"], cut, None)
    return trainable, frozen


def _merge(trainable: dict, frozen: dict, split: bool) -> dict:
    out = {}
    for name in sorted(set(trainable) | set(frozen)):
        if name in trainable and name in frozen:  # a partly unlocked tower
            tower = {**frozen[name], **{k: v for k, v in trainable[name].items() if k != "encoder"}}
            bottom, top = frozen[name]["encoder"], trainable[name]["encoder"]
            if split:
                tower["encoder"] = layers.Split(bottom, top)
            elif isinstance(bottom, (tuple, list)):
                tower["encoder"] = tuple(bottom) + tuple(top)
            else:
                tower["encoder"] = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), bottom, top)
            out[name] = tower
        else:
            out[name] = trainable[name] if name in trainable else frozen[name]
    return out


def full_params(state: TrainState) -> dict:
    """The whole params tree of a train state, in the stacked layout (for save_pretrained, evaluation)."""
    return model.stack_layers(_merge(state.trainable, state.frozen, split=False))


def decay_mask(params: dict) -> dict:
    """Weight decay on kernels and embedding tables only (not biases, norms, cls, logit scale/bias)."""
    def decays(path, _):
        last = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return last in ("kernel", "word", "position", "token_type")
    return jax.tree_util.tree_map_with_path(decays, params)


def default_optimizer(learning_rate: float = 5e-4, *, total_steps: int, warmup_steps: int | None = None,
                      weight_decay: float = 0.1, clip_norm: float = 1.0, b2: float = 0.98):
    """AdamW with linear warmup and cosine decay to zero, after clipping the global gradient norm."""
    import optax

    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    warmup = max(1, total_steps // 20) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, total_steps),
                                                  max(total_steps, warmup + 1), end_value=0.0)
    return clipped_adamw(schedule, b1=0.9, b2=b2, eps=1e-6, weight_decay=weight_decay, mask=decay_mask,
                         clip_norm=clip_norm)


class ClippedAdamWState(NamedTuple):
    count: jax.Array  # int32 scalar: updates taken
    mu: Any  # first moments, shaped as the params
    nu: Any  # second moments


def clipped_adamw(learning_rate: float | Callable, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 1e-4, mask: Any = None, clip_norm: float | None = None):
    """The update of optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, b1, b2, eps,
    weight_decay=weight_decay, mask=mask)) as an optax GradientTransformation, written as one expression per
    leaf.

    optax's chain hands whole trees from one transform to the next, and XLA then writes some of them out
    (the clipped gradients, for one): on CPU its update of BERT-base's 110M params took 234 ms a step, this
    one 132 ms (memory traffic, nothing else). The results are optax's to the bit when the gradients are not
    clipped, and within an ulp of them per clipped gradient. learning_rate: a float or a schedule of the step count;
    mask: a tree of bools (or a function of the params giving one) choosing the leaves that decay.
    """
    import optax

    def init(params):
        return ClippedAdamWState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params),
                                 jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        if params is None:
            raise InputError("clipped_adamw needs the params (weight decay): call update(grads, state, params)")
        count = optax.safe_increment(state.count)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decays = mask(params) if callable(mask) else mask
        decays = jax.tree_util.tree_map(lambda _: True, params) if decays is None else decays
        scale = None  # optax divides by the norm, then multiplies by clip_norm: 1 ulp from this, but XLA
        if clip_norm is not None:  # writes a divided gradient out (a divide is not repeated in each fusion)
            norm = optax.tree.norm(grads)
            scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
        correct1, correct2 = 1.0 - b1 ** count, 1.0 - b2 ** count

        def leaf(g, mu, nu, p, decay):  # otherwise each step as optax writes it: unclipped, the same bits
            if scale is not None:
                g = g * scale.astype(g.dtype)
            mu = (1.0 - b1) * g + b1 * mu
            nu = (1.0 - b2) * (g ** 2) + b2 * nu
            u = (mu / correct1.astype(mu.dtype)) / (jnp.sqrt(nu / correct2.astype(nu.dtype)) + eps)
            if decay and weight_decay:
                u = u + weight_decay * p
            return u * -rate, mu, nu

        treedef = jax.tree_util.tree_structure(params)
        columns = [treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu, params, decays)]
        out = [leaf(*args) for args in zip(*columns)]
        updates, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return updates, ClippedAdamWState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def init_state(params: dict, optimizer, *, locked: Sequence[str] = (), unlocked_layers: int = 0,
               seed: int = 0, layer_loop: bool = True) -> TrainState:
    """A train state: the optimizer state covers the trainable params only.

    layer_loop keeps each encoder layer's params (and gradients) as buffers of their own, run as a Python
    loop instead of lax.scan: on CPU a BERT-base backward runs about 25% faster, for a longer compile.
    """
    if layer_loop:
        params = model.unstack_layers(params)
    trainable, frozen = partition(params, locked, unlocked_layers)
    trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), trainable)  # the step donates these
    return TrainState(jnp.zeros((), jnp.int32), trainable, jax.tree_util.tree_map(jnp.asarray, frozen),
                      optimizer.init(trainable), jax.random.key_data(jax.random.key(seed)))


def _embeds(params, config: DualEncoderConfig, batch, key, *, locked, cached, remat_policy, dtype):
    keys = dict(zip(TOWERS, jax.random.split(key)))
    drop = {t: None if t in locked else keys[t] for t in TOWERS}  # locked towers run deterministically
    if "vision" in cached:
        image_pooled = batch["image_features"]
    else:
        image_pooled = vit.apply(params["vision"], config.vision, batch["pixel_values"], dropout_key=drop["vision"],
                                 remat_policy=remat_policy, dtype=dtype, pooled_only=True).pooler_output
    if "text" in cached:
        text_pooled = batch["text_features"]
    else:
        text_pooled = bert.apply(params["text"], config.text, batch["input_ids"], batch.get("attention_mask"),
                                 batch.get("token_type_ids"), dropout_key=drop["text"], remat_policy=remat_policy,
                                 dtype=dtype, pooled_only=True).pooler_output
    return (model.normalize(model.project(params["visual_projection"], image_pooled, dtype)),
            model.normalize(model.project(params["text_projection"], text_pooled, dtype)))


def make_train_step(config: DualEncoderConfig, optimizer, *, loss: str = "clip", locked: Sequence[str] = (),
                    unlocked_layers: int = 0, cached: bool = False, remat_policy: str | None = None, dtype=None,
                    chunk_size: int | None = None, donate: bool = True, mesh: Mesh | None = None,
                    fsdp: bool = False) -> Callable:
    """A pure train step (state, batch) -> (state, metrics), jit-compiled on first call.

    Args:
      optimizer: an optax GradientTransformation (see default_optimizer); used with init_state's partition.
      loss: "clip" (softmax) or "siglip" (sigmoid; the config needs logit_bias_init_value).
      locked: towers to lock, e.g. ("vision",) for LiT; unlocked_layers keeps their top k layers trainable.
      cached: the batch carries the locked tower's pooled outputs ("image_features" / "text_features") instead
        of its inputs, so the locked tower is not run (see tower_features).
      remat_policy: a jax.checkpoint_policies name, to rematerialise encoder layers in the backward pass.
      dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); params and optimizer state stay float32.
      chunk_size: compute the loss in row chunks of this size.
      donate: donate the input state's buffers to the output state.
      mesh: data-parallel over the mesh's "data" axis: place state with shard_state and batches with
        shard_batch; the loss then spans the global batch. fsdp: also shard params and optimizer state.

    The batch holds input_ids, attention_mask (and token_type_ids), and pixel_values, each with the global
    batch on axis 0. Metrics: loss, logit_scale (exp), accuracy_t2i, accuracy_i2t, grad_norm.
    """
    import optax

    locked = _check_locking(locked, unlocked_layers)
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

    def core(step_count, trainable, opt_state, rng, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step_count)

        def loss_fn(trainable):
            params = _merge(trainable, frozen, split=True)
            images, texts = _embeds(params, config, batch, key, locked=locked, cached=cached_towers,
                                    remat_policy=remat_policy, dtype=dtype)
            if loss == "clip":
                value = losses.clip_loss(texts, images, params["logit_scale"], chunk_size=chunk_size)
            else:
                value = losses.siglip_loss(texts, images, params["logit_scale"], params["logit_bias"],
                                           chunk_size=chunk_size)
            return value, (images, texts)

        (value, (images, texts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        trainable["logit_scale"] = jnp.clip(trainable["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        t2i, i2t = losses.in_batch_accuracy(texts, images)
        metrics = {"loss": value, "logit_scale": jnp.exp(trainable["logit_scale"]), "accuracy_t2i": t2i,
                   "accuracy_i2t": i2t, "grad_norm": optax.tree.norm(grads)}
        return step_count + 1, trainable, opt_state, metrics

    # The step count, trainable params and optimizer state are donated; frozen params (often the caller's own
    # arrays) and the batch are not.
    donate_argnums = (0, 1, 2) if donate else ()
    compiled = {}

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if mesh is None:
            fn = compiled.get(None) or compiled.setdefault(None, jax.jit(core, donate_argnums=donate_argnums))
        else:
            treedef = jax.tree_util.tree_structure(state)
            if treedef not in compiled:
                s = state_sharding(state, mesh, fsdp)
                data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
                compiled[treedef] = jax.jit(
                    core, donate_argnums=donate_argnums,
                    in_shardings=(s.step, s.trainable, s.opt_state, s.rng, s.frozen, data),
                    out_shardings=(s.step, s.trainable, s.opt_state, replicated))
            fn = compiled[treedef]
        count, trainable, opt_state, metrics = fn(state.step, state.trainable, state.opt_state, state.rng,
                                                  state.frozen, batch)
        return TrainState(count, trainable, state.frozen, opt_state, state.rng), metrics

    return step


# ------------------------------------------------------------------------------------------------ sharding

def _leaf_spec(shape, size: int, fsdp: bool) -> P:
    """FSDP: shard a leaf's largest axis that the mesh divides; otherwise (and without fsdp) replicate."""
    if fsdp and shape:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % size == 0 and shape[axis] >= size:
                spec = [None] * len(shape)
                spec[axis] = "data"
                return P(*spec)
    return P()


def state_sharding(state: TrainState, mesh: Mesh, fsdp: bool = False):
    """The NamedSharding of every state leaf: replicated, or FSDP-sharded over "data"."""
    size = mesh.shape["data"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _leaf_spec(np.shape(x), size, fsdp)), state)


def shard_state(state: TrainState, mesh: Mesh, fsdp: bool = False) -> TrainState:
    return jax.device_put(state, state_sharding(state, mesh, fsdp))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's rows of the global batch on the mesh, split over "data" (also multi-host)."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def data_mesh(devices=None) -> Mesh:
    """A one-axis ("data") mesh over all devices of all processes."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


# ------------------------------------------------------------------------------------------------ LiT cache

def tower_features(params: dict, config: DualEncoderConfig, tower: str, inputs: dict, *, batch_size: int = 64,
                   dtype=None) -> np.ndarray:
    """Pooled outputs of one tower for a whole dataset, computed once (LiT's cache of the locked tower).

    Args:
      inputs: for "vision", {"pixel_values": (N, C, H, W)}; for "text", {"input_ids": (N, L), ...}.

    Returns:
      float32 (N, hidden_size), in fixed-size batches so the tower compiles once.
    """
    if tower not in TOWERS:
        raise InputError(f"tower must be one of {TOWERS}, got {tower!r}")
    fn = jax.jit(lambda p, x: (
        vit.apply(p, config.vision, x["pixel_values"], dtype=dtype, pooled_only=True) if tower == "vision"
        else bert.apply(p, config.text, x["input_ids"], x.get("attention_mask"), x.get("token_type_ids"),
                        dtype=dtype, pooled_only=True)).pooler_output)
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: np.asarray(v[start:start + batch_size]) for k, v in inputs.items()}
        rows = len(next(iter(chunk.values())))
        if rows < batch_size:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - rows, axis=0)]) for k, v in chunk.items()}
        out.append(np.asarray(fn(params[tower], chunk), np.float32)[:rows])
    return np.concatenate(out) if out else np.zeros((0, getattr(config, tower).hidden_size), np.float32)
