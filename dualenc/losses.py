"""Contrastive losses: CLIP's symmetric softmax and SigLIP's sigmoid, gathered across devices and chunked.

With `axis_name` (inside pmap or shard_map) each device holds n of the N pairs: it gathers the other side's
embeddings and computes only its own n x N block of logits. The value returned is the global mean loss on
every device, and the gradient with respect to the local embeddings is exactly the full-batch one (the
gather's transpose brings back the other devices' contributions). Parameter gradients then follow JAX's
rules: under pmap each device gets its share and a psum over the axis gives the full-batch gradient; under
shard_map with replication checking, replicated params receive the summed gradient directly. With `chunk_size`, rows are processed in
chunks under remat, so no more than chunk_size x N logits exist at once, in the forward or the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dualenc.errors import InputError


def clip_loss_from_logits(logits_per_text: jax.Array) -> jax.Array:
    """transformers' image_text_contrastive_loss: mean of the text->image and image->text cross-entropies."""
    logits = logits_per_text.astype(jnp.float32)
    labels = jnp.arange(logits.shape[0])
    text = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
    image = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    return (text + image) / 2


def siglip_loss_from_logits(logits_per_text: jax.Array) -> jax.Array:
    """SigLIP's loss: -sum over pairs of log sigmoid(+-logit), averaged over texts (bias already added)."""
    logits = logits_per_text.astype(jnp.float32)
    labels = 2 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def _check(text_embeds, image_embeds):
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise InputError(f"text_embeds {text_embeds.shape} and image_embeds {image_embeds.shape} must both be "
                         f"(n, d): one caption per image, matched by row")


def _gather(x, axis_name):
    """(n, d) local rows -> ((N, d) all rows, offset of this device's rows)."""
    if axis_name is None:
        return x, 0
    full = lax.all_gather(x, axis_name, tiled=True)
    return full, lax.axis_index(axis_name) * x.shape[0]


def _row_chunks(fn, rows: jax.Array, offset, chunk_size: int | None) -> jax.Array:
    """Sum over rows of fn(row_block, global_row_ids), one chunk at a time under remat."""
    n = rows.shape[0]
    ids = offset + jnp.arange(n)
    if chunk_size is None or chunk_size >= n:
        return fn(rows, ids)
    if n % chunk_size:
        raise InputError(f"chunk_size {chunk_size} must divide the local batch {n}")
    blocks = rows.reshape(n // chunk_size, chunk_size, -1)
    id_blocks = ids.reshape(n // chunk_size, chunk_size)
    step = jax.checkpoint(lambda block, block_ids: fn(block, block_ids), prevent_cse=False)
    return jnp.sum(lax.map(lambda xs: step(*xs), (blocks, id_blocks)))


def _varying(x, axis_name) -> bool:
    """Whether x is typed as varying over axis_name (shard_map with check_vma, where psum transposes right)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return axis_name in vma


def _share(local_sum: jax.Array, total: int, axis_name) -> jax.Array:
    """The global mean loss as value, with the gradient of this device's share only.

    Under shard_map's replication checking psum already transposes to a broadcast, so the plain psum is
    right. Under pmap (or check_vma=False) psum would transpose to another psum, scaling gradients by the
    device count; there the value is the psum but the gradient stops at the local share.
    """
    local = local_sum / total
    if axis_name is None:
        return local
    if _varying(local, axis_name):
        return lax.psum(local, axis_name)
    return local + lax.stop_gradient(lax.psum(local, axis_name) - local)


def clip_loss(text_embeds, image_embeds, logit_scale, *, axis_name=None, chunk_size: int | None = None):
    """CLIP's symmetric contrastive loss from L2-normalised embeddings.

    Args:
      text_embeds, image_embeds: (n, d) normalised; row i of each is a matching pair.
      logit_scale: the log-scale param (logits are scaled by exp(logit_scale)).
      axis_name: gather across this pmap/shard_map axis (global batch N = n x axis size).
      chunk_size: process this many rows at a time (must divide n).

    Returns:
      The scalar mean loss over the global batch, equal to clip_loss_from_logits of the full logits.
    """
    _check(text_embeds, image_embeds)
    t = text_embeds.astype(jnp.float32)
    i = image_embeds.astype(jnp.float32)
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    all_t, offset = _gather(t, axis_name)
    all_i, _ = _gather(i, axis_name)
    total = all_t.shape[0]

    def cross_entropy(others):
        def fn(rows, row_ids):
            logits = scale * rows @ others.T  # (chunk, N)
            own = jnp.take_along_axis(logits, row_ids[:, None], axis=1)[:, 0]
            return jnp.sum(jax.nn.logsumexp(logits, axis=1) - own)
        return fn

    text_sum = _row_chunks(cross_entropy(all_i), t, offset, chunk_size)
    image_sum = _row_chunks(cross_entropy(all_t), i, offset, chunk_size)
    return _share((text_sum + image_sum) / 2, total, axis_name)


def siglip_loss(text_embeds, image_embeds, logit_scale, logit_bias, *, axis_name=None,
                chunk_size: int | None = None):
    """SigLIP's pairwise sigmoid loss, logits = exp(logit_scale) * t @ i.T + logit_bias.

    Same arguments as clip_loss plus the learnable logit_bias; equal to siglip_loss_from_logits of the full
    logits.
    """
    _check(text_embeds, image_embeds)
    t = text_embeds.astype(jnp.float32)
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    all_i, offset = _gather(image_embeds.astype(jnp.float32), axis_name)
    total = all_i.shape[0]

    def fn(rows, row_ids):
        logits = scale * rows @ all_i.T + logit_bias.astype(jnp.float32)
        labels = jnp.where(row_ids[:, None] == jnp.arange(total)[None, :], 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

    return _share(_row_chunks(fn, t, offset, chunk_size), total, axis_name)


def in_batch_accuracy(text_embeds, image_embeds, *, axis_name=None) -> tuple[jax.Array, jax.Array]:
    """Fractions of texts whose best image, and of images whose best text, is their own pair (global)."""
    all_i, offset = _gather(image_embeds.astype(jnp.float32), axis_name)
    all_t, _ = _gather(text_embeds.astype(jnp.float32), axis_name)
    ids = offset + jnp.arange(text_embeds.shape[0])
    t2i = jnp.mean(jnp.argmax(text_embeds.astype(jnp.float32) @ all_i.T, axis=1) == ids)
    i2t = jnp.mean(jnp.argmax(image_embeds.astype(jnp.float32) @ all_t.T, axis=1) == ids)
    if axis_name is not None:
        t2i, i2t = lax.pmean(t2i, axis_name), lax.pmean(i2t, axis_name)
    return t2i, i2t
