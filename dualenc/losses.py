"""Contrastive losses: CLIP's symmetric softmax and SigLIP's sigmoid, gathered across devices and chunked.

With `axis_name` (inside pmap or shard_map) each device holds n of the N pairs: it gathers the other side's
embeddings and computes only its own n x N block of logits. The value returned is the global mean loss on
every device, and the gradient with respect to the local embeddings is exactly the full-batch one (the
gather's transpose brings back the other devices' contributions). Parameter gradients then follow JAX's
rules: under pmap each device gets its share and a psum over the axis gives the full-batch gradient; under
shard_map with replication checking, replicated params receive the summed gradient directly. With `chunk_size`, rows are processed in
chunks under remat, so no more than chunk_size x N logits exist at once, in the forward or the backward.

The ring forms (siglip_loss_ring, clip_loss_ring) give the same values and gradients without gathering: one
side's blocks go round the devices, so each holds its n rows against one n-row block at a time.
sharded_loss wraps either form in shard_map for a jitted step over a mesh.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

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


def _chunked(n: int, chunk_size: int | None) -> bool:
    """Whether n local rows go in chunks of chunk_size (which must then divide n)."""
    if chunk_size is None or chunk_size >= n:
        return False
    if n % chunk_size:
        raise InputError(f"chunk_size {chunk_size} must divide the local batch {n}")
    return True


def _row_chunks(fn, rows: jax.Array, offset, chunk_size: int | None) -> jax.Array:
    """Sum over rows of fn(row_block, global_row_ids), one chunk at a time under remat."""
    n = rows.shape[0]
    ids = offset + jnp.arange(n)
    if not _chunked(n, chunk_size):
        return fn(rows, ids)
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


# The ring forms: each device keeps its own rows and passes the other side's block to the next device, one hop a
# step (lax.ppermute), so no device holds more than its n local rows against one n-row block. The forward and
# the backward are both rings (a custom VJP): autodiff of the forward loop would keep every block it saw for
# the backward, N rows again. The backward's block carries its gradient with it and brings it home in one more
# hop. Values and gradients are those of the gathered forms above, with the same pmap/shard_map contract.


def _hop(x, axis_name):
    """Passes x to the next device on the axis (device j -> j + 1, the last to the first)."""
    size = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(j, (j + 1) % size) for j in range(size)])


def _ring_size(axis_name) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _ring_loop(step, carry, axis_name):
    """carry after axis size - 1 calls of step (each starting with a hop), in one loop."""
    size = _ring_size(axis_name)
    return carry if size == 1 else lax.fori_loop(1, size, lambda _, c: step(c), carry)


def _over_rows(fn, carry, rows, chunk_size: int | None):
    """fn(carry, row_block) -> (carry, out_block) over blocks of chunk_size rows (rows: a tuple of (n, ...))."""
    n = rows[0].shape[0]
    if not _chunked(n, chunk_size):
        return fn(carry, rows)
    blocks = tuple(x.reshape(n // chunk_size, chunk_size, *x.shape[1:]) for x in rows)
    carry, outs = lax.scan(fn, carry, blocks)
    return carry, jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), outs)


def _ring_inputs(axis_name, embeds, params):
    """float32 embeddings and params; under shard_map's replication checking the replicated params are cast to
    varying here, so the custom VJP sees one type and the cast's transpose (a psum) sums their gradients."""
    embeds = tuple(jnp.asarray(x, jnp.float32) for x in embeds)
    params = tuple(jnp.asarray(x, jnp.float32) for x in params)
    if axis_name is not None and _varying(embeds[0], axis_name):
        params = tuple(x if _varying(x, axis_name) else lax.pcast(x, axis_name, to="varying") for x in params)
    return embeds, params


def _sigmoid_block(rows, row_ids, block, logit_scale, logit_bias, own):
    """-sum of log sigmoid(+-logit) of rows against one block; positives where own and row id == column."""
    logits = jnp.exp(logit_scale) * rows @ block.T + logit_bias
    labels = jnp.where(own & (row_ids[:, None] == jnp.arange(block.shape[0])[None, :]), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_ring(images, texts, logit_scale, logit_bias, axis_name, chunk_size):
    return _sigmoid_ring_fwd(images, texts, logit_scale, logit_bias, axis_name, chunk_size)[0]


def _sigmoid_ring_fwd(images, texts, logit_scale, logit_bias, axis_name, chunk_size):
    ids = jnp.arange(images.shape[0])

    def block(total, held, own):
        def fn(total, rows):
            return total + _sigmoid_block(*rows, held, logit_scale, logit_bias, own), None
        return _over_rows(fn, total, (images, ids), chunk_size)[0]

    def step(carry):
        held, total = carry
        held = _hop(held, axis_name)
        return held, block(total, held, False)

    _, total = _ring_loop(step, (texts, block(jnp.zeros_like(logit_scale), texts, True)), axis_name)
    return total, (images, texts, logit_scale, logit_bias)


def _sigmoid_ring_bwd(axis_name, chunk_size, residuals, g):
    images, texts, logit_scale, logit_bias = residuals
    ids = jnp.arange(images.shape[0])

    def block(d_images, held, d_held, d_scale, d_bias, own):
        def fn(carry, rows):
            d_held, d_scale, d_bias = carry
            _, vjp = jax.vjp(lambda r, b, s, c: _sigmoid_block(r, rows[1], b, s, c, own),
                             rows[0], held, logit_scale, logit_bias)
            d_rows, d_b, d_s, d_c = vjp(g)
            return (d_held + d_b, d_scale + d_s, d_bias + d_c), d_rows
        (d_held, d_scale, d_bias), d_rows = _over_rows(fn, (d_held, d_scale, d_bias), (images, ids), chunk_size)
        return d_images + d_rows, d_held, d_scale, d_bias

    def step(carry):
        held, d_images, d_held, d_scale, d_bias = carry
        held, d_held = _hop(held, axis_name), _hop(d_held, axis_name)
        return held, *block(d_images, held, d_held, d_scale, d_bias, False)

    zero = jnp.zeros_like(logit_scale)
    grads = block(jnp.zeros_like(images), texts, jnp.zeros_like(texts), zero, zero, True)
    _, d_images, d_texts, d_scale, d_bias = _ring_loop(step, (texts, *grads), axis_name)
    if axis_name is not None:
        d_texts = _hop(d_texts, axis_name)  # the held block's gradient goes home: after size - 1 hops, one more
    return d_images, d_texts, d_scale, d_bias


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def siglip_loss_ring(text_embeds, image_embeds, logit_scale, logit_bias, *, axis_name,
                     chunk_size: int | None = None):
    """siglip_loss without gathering: each device's images meet every device's texts block by block, the text
    blocks passed round the ring (axis size - 1 hops).

    Args:
      text_embeds, image_embeds: (n, d) this device's pairs, row i of each a matching pair.
      logit_scale, logit_bias: the log-scale and bias params (logits = exp(logit_scale) * i @ t.T + logit_bias).
      axis_name: the pmap/shard_map axis the global batch is spread over (None: one device).
      chunk_size: take this many of the local rows at a time against a block (must divide n).

    Returns:
      The global mean loss, equal in value and gradients to siglip_loss(..., axis_name=axis_name).
    """
    _check(text_embeds, image_embeds)
    (t, i), (scale, bias) = _ring_inputs(axis_name, (text_embeds, image_embeds), (logit_scale, logit_bias))
    total = t.shape[0] * _ring_size(axis_name)
    return _share(_sigmoid_ring(i, t, scale, bias, axis_name, chunk_size), total, axis_name)


def _scaled(rows, block, logit_scale):
    return jnp.exp(logit_scale) * rows @ block.T


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_ring(texts, images, logit_scale, axis_name, chunk_size):
    return _softmax_ring_fwd(texts, images, logit_scale, axis_name, chunk_size)[0]


def _softmax_ring_fwd(texts, images, logit_scale, axis_name, chunk_size):
    """Texts stay; image blocks travel with their running log-sum-exp over the texts they have met (the
    image->text rows), while each text keeps its own over the blocks (the text->image rows)."""
    ids = jnp.arange(texts.shape[0])

    def block(held, held_lse, positives, own):
        def fn(carry, rows):
            held_lse, positives = carry
            logits = _scaled(rows[0], held, logit_scale)  # (rows, block)
            held_lse = jnp.logaddexp(held_lse, jax.nn.logsumexp(logits, axis=0))
            if own:
                positives = positives + jnp.sum(jnp.take_along_axis(logits, rows[1][:, None], axis=1))
            return (held_lse, positives), jax.nn.logsumexp(logits, axis=1)
        return _over_rows(fn, (held_lse, positives), (texts, ids), chunk_size)

    def step(carry):
        held, held_lse, text_lse, positives = carry
        held, held_lse = _hop(held, axis_name), _hop(held_lse, axis_name)
        (held_lse, positives), block_lse = block(held, held_lse, positives, False)
        return held, held_lse, jnp.logaddexp(text_lse, block_lse), positives

    (image_lse, positives), text_lse = block(images, jnp.full_like(images[:, 0], -jnp.inf),
                                             jnp.zeros_like(logit_scale), True)
    _, image_lse, text_lse, positives = _ring_loop(step, (images, image_lse, text_lse, positives), axis_name)
    if axis_name is not None:
        image_lse = _hop(image_lse, axis_name)  # home, as the gradient in the backward
    value = (jnp.sum(text_lse) + jnp.sum(image_lse)) / 2 - positives
    return value, (texts, images, logit_scale, text_lse, image_lse)


def _softmax_ring_bwd(axis_name, chunk_size, residuals, g):
    texts, images, logit_scale, text_lse, image_lse = residuals
    ids = jnp.arange(texts.shape[0])

    def block(d_texts, held, held_lse, d_held, d_scale, own):
        def fn(carry, rows):
            d_held, d_scale = carry
            row_texts, row_ids, row_lse = rows
            logits, vjp = jax.vjp(_scaled, row_texts, held, logit_scale)
            # softmax over each text's row and over each image's column, less the positives
            d_logits = g / 2 * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - held_lse[None, :]))
            if own:
                d_logits = d_logits - jnp.where(row_ids[:, None] == jnp.arange(held.shape[0])[None, :], g, 0.0)
            d_rows, d_h, d_s = vjp(d_logits)
            return (d_held + d_h, d_scale + d_s), d_rows
        (d_held, d_scale), d_rows = _over_rows(fn, (d_held, d_scale), (texts, ids, text_lse), chunk_size)
        return d_texts + d_rows, d_held, d_scale

    def step(carry):
        held, held_lse, d_texts, d_held, d_scale = carry
        held, held_lse, d_held = (_hop(x, axis_name) for x in (held, held_lse, d_held))
        return held, held_lse, *block(d_texts, held, held_lse, d_held, d_scale, False)

    grads = block(jnp.zeros_like(texts), images, image_lse, jnp.zeros_like(images), jnp.zeros_like(logit_scale), True)
    _, _, d_texts, d_images, d_scale = _ring_loop(step, (images, image_lse, *grads), axis_name)
    if axis_name is not None:
        d_images = _hop(d_images, axis_name)
    return d_texts, d_images, d_scale


_softmax_ring.defvjp(_softmax_ring_fwd, _softmax_ring_bwd)


def clip_loss_ring(text_embeds, image_embeds, logit_scale, *, axis_name, chunk_size: int | None = None):
    """clip_loss without gathering: texts stay, image blocks go round the ring (axis size - 1 hops) carrying
    their running log-sum-exp over the texts met, and each text keeps its own over the blocks.

    Same arguments as siglip_loss_ring without the bias; equal in value and gradients to
    clip_loss(..., axis_name=axis_name).
    """
    _check(text_embeds, image_embeds)
    (t, i), (scale,) = _ring_inputs(axis_name, (text_embeds, image_embeds), (logit_scale,))
    total = t.shape[0] * _ring_size(axis_name)
    return _share(_softmax_ring(t, i, scale, axis_name, chunk_size), total, axis_name)


def sharded_loss(kind: str, mesh, *, form: str = "ring", axis: str = "data", chunk_size: int | None = None):
    """The global-batch loss over a mesh, for a jitted step holding globally sharded embeddings.

    Args:
      kind: "clip" or "siglip".
      mesh: a jax.sharding.Mesh with `axis` among its axes; its other axes (e.g. "model") see the embeddings
        replicated.
      form: "ring" (siglip_loss_ring / clip_loss_ring) or "gather" (siglip_loss / clip_loss with axis_name).
      axis: the mesh axis the batch rows are sharded over.
      chunk_size: passed to the loss (must divide the per-device batch).

    Returns:
      fn(text_embeds, image_embeds, logit_scale, logit_bias=None) -> the scalar global mean loss, replicated and
      differentiable: the embeddings (N, d) are taken as sharded P(axis) by rows, the scale and bias replicated.
      logit_bias is required for "siglip" and refused for "clip".
    """
    if kind not in ("clip", "siglip"):
        raise InputError(f"kind must be 'clip' or 'siglip', got {kind!r}")
    if form not in ("ring", "gather"):
        raise InputError(f"form must be 'ring' or 'gather', got {form!r}")
    if axis not in mesh.axis_names:
        raise InputError(f"axis {axis!r} is not one of the mesh's axes {tuple(mesh.axis_names)}")
    if kind == "clip":
        loss = clip_loss_ring if form == "ring" else clip_loss
    else:
        loss = siglip_loss_ring if form == "ring" else siglip_loss
    devices = mesh.shape[axis]

    def local(*args):
        return loss(*args, axis_name=axis, chunk_size=chunk_size)

    def fn(text_embeds, image_embeds, logit_scale, logit_bias=None):
        if (logit_bias is None) != (kind == "clip"):
            raise InputError(f"logit_bias is {'refused' if kind == 'clip' else 'required'} for kind {kind!r}")
        _check(text_embeds, image_embeds)
        if text_embeds.shape[0] % devices:
            raise InputError(f"the global batch {text_embeds.shape[0]} must divide into the {devices} devices of "
                             f"mesh axis {axis!r}")
        args = (text_embeds, image_embeds, logit_scale) + (() if logit_bias is None else (logit_bias,))
        specs = (P(axis), P(axis)) + (P(),) * (len(args) - 2)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return fn


def _ring_best(rows, others, axis_name):
    """For each of rows, the global index of its best match among every device's `others` (the first one of
    the highest score, as argmax over the gathered rows), passing `others` round the ring."""
    n, size = others.shape[0], _ring_size(axis_name)
    me = 0 if axis_name is None else lax.axis_index(axis_name)

    def best_in(held, hops):  # after `hops` hops this device holds the block of device me - hops
        scores = rows @ held.T
        return jnp.max(scores, axis=1), jnp.argmax(scores, axis=1) + ((me - hops) % size) * n

    def step(hops, carry):
        held, score, index = carry
        held = _hop(held, axis_name)
        s, i = best_in(held, hops)
        better = (s > score) | ((s == score) & (i < index))
        return held, jnp.where(better, s, score), jnp.where(better, i, index)

    score, index = best_in(others, 0)
    if size > 1:
        _, score, index = lax.fori_loop(1, size, step, (others, score, index))
    return index


def in_batch_accuracy_ring(text_embeds, image_embeds, *, axis_name) -> tuple[jax.Array, jax.Array]:
    """in_batch_accuracy without gathering: each device holds its own rows against one block of the other
    side at a time (inside shard_map or pmap over axis_name)."""
    t, i = text_embeds.astype(jnp.float32), image_embeds.astype(jnp.float32)
    ids = (0 if axis_name is None else lax.axis_index(axis_name)) * t.shape[0] + jnp.arange(t.shape[0])
    t2i = jnp.mean(_ring_best(t, i, axis_name) == ids)
    i2t = jnp.mean(_ring_best(i, t, axis_name) == ids)
    if axis_name is not None:
        t2i, i2t = lax.pmean(t2i, axis_name), lax.pmean(i2t, axis_name)
    return t2i, i2t


def sharded_accuracy(mesh, *, axis: str = "data"):
    """fn(text_embeds, image_embeds) -> (accuracy_t2i, accuracy_i2t) of globally sharded (N, d) embeddings
    (rows over mesh axis `axis`), computed as a ring (in_batch_accuracy_ring): no device holds n x N scores."""
    if axis not in mesh.axis_names:
        raise InputError(f"axis {axis!r} is not one of the mesh's axes {tuple(mesh.axis_names)}")

    def fn(text_embeds, image_embeds):
        _check(text_embeds, image_embeds)
        return jax.shard_map(lambda t, i: in_batch_accuracy_ring(t, i, axis_name=axis), mesh=mesh,
                             in_specs=(P(axis), P(axis)), out_specs=(P(), P()))(text_embeds, image_embeds)

    return fn
