"""Exact gradient accumulation for contrastive losses (the GradCache method).

A contrastive loss couples every pair of the batch, so summing the gradients of K micro-batches' own losses is
not the gradient of the batch's loss: each micro-batch would see only its own negatives. GradCache splits the
computation at the embeddings instead:

1. embed each micro-batch with no backward pass (nothing but the embeddings is kept);
2. compute the loss over the whole batch from the embeddings, and its gradient with respect to every embedding
   (and the logit scale and bias);
3. embed each micro-batch again, this time back-propagating the embedding gradients of step 2 into the params,
   and sum the parameter gradients over the micro-batches.

The gradient is the full batch's (to float rounding), while at most one micro-batch's activations exist at a
time. Both passes are a `lax.scan` over the micro-batches inside the one jitted step. Dropout (and patch
dropout) draws its masks per micro-batch, from the same key in both passes, so the recomputation is exact; the
masks differ from those of one un-accumulated step on the same batch, which is therefore equal only without
dropout.

Micro-batch k holds the rows k, k + K, k + 2K, ... of the global batch: with the batch split over devices
along its rows, each device then holds an equal share of every micro-batch, and the reshapes move no data
between devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from dualenc.errors import ConfigError, InputError


def check_steps(accum_steps) -> int:
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ConfigError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    return accum_steps


def split_batch(batch: dict, steps: int, mesh=None) -> dict:
    """(B, ...) arrays -> (steps, B // steps, ...): micro-batch k holds rows k, k + steps, ... (see above)."""
    out = {}
    for name, x in batch.items():
        rows = x.shape[0]
        devices = mesh.shape["data"] if mesh is not None else 1
        if rows % (steps * devices):
            where = f" over {devices} devices" if devices > 1 else ""
            raise InputError(f"accum_steps {steps}: the batch of {rows} rows{where} does not split into {steps} "
                             f"equal micro-batches (the batch size must be a multiple of {steps * devices})")
        x = jnp.swapaxes(x.reshape((rows // steps, steps) + x.shape[1:]), 0, 1)
        if mesh is not None:
            x = lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, "data")))
        out[name] = x
    return out


def _join(x: jax.Array) -> jax.Array:
    """(steps, m, d) per micro-batch -> (m * steps, d) in the batch's own row order (split_batch's inverse)."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _split(x: jax.Array, steps: int) -> jax.Array:
    return jnp.swapaxes(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 0, 1)


def value_and_grad(embed: Callable, loss_of: Callable, trainable, batch: dict, key: jax.Array, steps: int, *,
                   mesh=None):
    """The batch's loss and its gradient with respect to `trainable`, one micro-batch's activations at a time.

    Args:
      embed: (trainable, micro_batch, key) -> (image_embeds, text_embeds), each (m, d).
      loss_of: (trainable, image_embeds, text_embeds) -> scalar loss over the whole batch (it may read the
        logit scale and bias from trainable; its gradient with respect to them is added to the towers').
      steps: the number of micro-batches K (it divides the batch).

    Returns:
      (loss, grads, image_embeds, text_embeds), the embeddings (B, d) in the batch's row order.
    """
    micro = split_batch(batch, steps, mesh)
    keys = jax.random.split(key, steps)

    def forward(_, xs):
        return None, embed(trainable, *xs)

    _, (images, texts) = lax.scan(forward, None, (micro, keys))
    images, texts = lax.stop_gradient(_join(images)), lax.stop_gradient(_join(texts))
    value, (own_grads, image_grads, text_grads) = jax.value_and_grad(loss_of, argnums=(0, 1, 2))(
        trainable, images, texts)

    def backward(total, xs):
        micro_batch, k, image_grad, text_grad = xs
        _, pull = jax.vjp(lambda t: embed(t, micro_batch, k), trainable)
        (grads,) = pull((image_grad, text_grad))
        return jax.tree_util.tree_map(jnp.add, total, grads), None

    # Summed onto the loss's own gradient (the logit scale and bias; zeros elsewhere).
    grads, _ = lax.scan(backward, own_grads, (micro, keys, _split(image_grads, steps), _split(text_grads, steps)))
    return value, grads, images, texts
