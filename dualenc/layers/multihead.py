"""Multi-head attention: the additive mask bias, the implementations chosen by name (as transformers'
`attn_implementation`), the default for each backend, and the attention layer that runs them."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from dualenc.errors import InputError
from dualenc.layers.primitives import Params, Rows, dense, dropout, pick_rows

if TYPE_CHECKING:
    from dualenc.layers.transformer import EncoderSpec


def attention_bias(mask: jax.Array | None, causal_length: int | None = None) -> jax.Array | None:
    """Additive float32 attention bias: 0 where a query may attend, torch's finfo.min where not.

    Args:
      mask: (B, L) 0/1 key mask, or None.
      causal_length: L, to also forbid each query the keys after it (one bias for both rules, so a key masked
        twice is still finfo.min and never -inf).

    Returns:
      (B, 1, 1, L) for a key mask alone; (B or 1, 1, L, L) when causal; None for neither.
    """
    if causal_length is None:
        if mask is None:
            return None
        return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    allowed = jnp.tril(jnp.ones((causal_length, causal_length), jnp.bool_))[None, None]
    if mask is not None:
        allowed = allowed & (mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute softmax(q k / sqrt(head size) + bias) v over all heads."""

    summary: str
    # (q (B, Q, H, K), k, v (B, L, H, K), mask (B or 1, 1, Q or 1, L) bool or None) -> (B, Q, H, K); None for
    # the einsum path written out in `attention`, the only one that returns probabilities or drops them.
    fused: Callable | None = None
    backends: tuple[str, ...] = ()  # the jax.default_backend() names it runs on; () for every backend
    dtypes: tuple[str, ...] = ()  # the compute dtypes it takes; () for every dtype


def _dot_product(implementation: str | None, q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation("einsum matmuls and a float32 softmax, heads ahead of the sequence axis; every backend"),
    "jax": Implementation("jax.nn.dot_product_attention with jax's own choice of kernel (XLA's in jax 0.10); every "
                          "backend", functools.partial(_dot_product, None)),
    "cudnn": Implementation("jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's fused kernel; NVIDIA "
                            "GPUs, bfloat16/float16, a head size that is a multiple of 8 up to 128 (256 from Hopper)",
                            functools.partial(_dot_product, "cudnn"), backends=("gpu",),
                            dtypes=("bfloat16", "float16")),
}


def implementation(attention: str) -> Implementation:
    """IMPLEMENTATIONS[attention]; InputError listing the names for any other value."""
    impl = IMPLEMENTATIONS.get(attention) if isinstance(attention, str) else None
    if impl is None:
        raise InputError(f"attention must be one of {', '.join(map(repr, IMPLEMENTATIONS))} (or None: the "
                         f"backend's default), got {attention!r}")
    return impl


def default_attention(backend: str) -> str:
    """The implementation attention=None stands for on a backend (a jax.default_backend() name): "jax" on GPUs
    (what dualenc has always run there), "xla" on every other backend.

    cuDNN's kernel is never the default: it takes bfloat16/float16 only, limits the head size, and under grad
    with a mask needs even sequence lengths (CLIP's text is 77 tokens); name it where it fits.
    """
    return "jax" if backend == "gpu" else "xla"


def resolve_attention(attention: str | None, dtype=None, backend: str | None = None) -> str:
    """The implementation to run: `attention` checked, or for None the default of `backend` (default: jax's
    default backend).

    Raises InputError for a name not in IMPLEMENTATIONS (listing them), or for one that cannot run on this
    backend or in this compute dtype (float32 when dtype is None).
    """
    backend = backend or jax.default_backend()
    if attention is None:
        return default_attention(backend)
    impl = implementation(attention)
    if impl.backends and backend not in impl.backends:
        here = ", ".join(repr(n) for n, i in IMPLEMENTATIONS.items() if not i.backends or backend in i.backends)
        raise InputError(f"attention={attention!r} runs on {' or '.join(impl.backends)} only, and this is the "
                         f"{backend} backend: use one of {here}")
    dtype_name = jnp.dtype(jnp.float32 if dtype is None else dtype).name
    if impl.dtypes and dtype_name not in impl.dtypes:
        raise InputError(f"attention={attention!r} needs dtype {' or '.join(impl.dtypes)}, got {dtype_name}: pass "
                         f"dtype=jnp.{impl.dtypes[0]}, or another attention")
    return attention


def attention(p: Params, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, dtype,
              key: jax.Array | None, need_probs: bool = False, first_only: Rows = False,
              queries: jax.Array | None = None, attention: str = "xla") -> tuple[jax.Array, jax.Array | None]:
    """Multi-head self-attention. x: (B, L, D); bias: (B or 1, 1, 1 or L, L) or None. With first_only, only
    one position per row queries (the first, or those of a (B,) array; keys and values still span the
    sequence): out is (B, 1, D). queries (B, Q, D), when given, attend over x instead (cross-attention, as a
    pooling head's probe does); the heads split the query projection's output width, which may differ from x's
    (torch's kdim / vdim: open_clip's attentional pooler). attention: a name in IMPLEMENTATIONS (see resolve_attention); a layer that
    needs the probabilities (need_probs, or attention dropout with a key) runs "xla", the one that has them.

    Returns (out (B, Q, D), probs (B, H, Q, L) when need_probs or dropout needs them, else None). Heads are
    moved ahead of the sequence axis so both attention matmuls are plain batched matmuls (on CPU this layout
    runs the attention core several times faster than contracting with heads in the middle). Without
    probabilities to return, the softmax is normalised after the value matmul, on (L, K) instead of (L, L).
    """
    impl = implementation(attention)
    b, l, _ = x.shape
    h = spec.num_heads
    d = p["query"]["kernel"].shape[-1]  # the attention's width
    head_dim = d // h
    if queries is None:
        queries = x if first_only is False else pick_rows(x, first_only)
    n_q = queries.shape[1]
    if first_only is not False and bias is not None and bias.shape[2] > 1:  # a bias row per query (causal)
        bias = pick_rows(jnp.broadcast_to(bias, (b,) + bias.shape[1:]), first_only, axis=2)
    dropping = key is not None and spec.attention_dropout > 0.0
    if impl.fused is not None and not (need_probs or dropping):
        q = dense(p["query"], queries, dtype).reshape(b, n_q, h, head_dim)
        k, v = (dense(p[n], x, dtype).reshape(b, l, h, head_dim) for n in ("key", "value"))
        out = impl.fused(q, k, v, None if bias is None else bias == 0).reshape(b, n_q, d)
        return dense(p["out"], out, dtype), None

    def heads(name, y):  # (B, L, D) -> (B, H, L, K)
        return dense(p[name], y, dtype).reshape(b, y.shape[1], h, head_dim).transpose(0, 2, 1, 3)

    q_BHLK = heads("query", queries) * jnp.asarray(head_dim ** -0.5, dtype)  # exact for power-of-two head sizes
    k_BHLK, v_BHLK = heads("key", x), heads("value", x)
    scores = jnp.einsum("bhqk,bhsk->bhqs", q_BHLK, k_BHLK, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    if need_probs or dropping:
        probs = jax.nn.softmax(scores, axis=-1)
        pick = None if first_only is False else functools.partial(pick_rows, rows=first_only, axis=2)
        weights = dropout(probs, spec.attention_dropout, key, (b, h, l, l), pick)
        out = jnp.einsum("bhqs,bhsk->bhqk", weights.astype(dtype), v_BHLK,
                         preferred_element_type=jnp.float32).astype(dtype)
    else:
        probs = None
        unnormalised = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("bhqs,bhsk->bhqk", unnormalised.astype(dtype), v_BHLK, preferred_element_type=jnp.float32)
        out = (out / jnp.sum(unnormalised, axis=-1, keepdims=True)).astype(dtype)
    out = out.transpose(0, 2, 1, 3).reshape(b, n_q, d)
    return dense(p["out"], out, dtype), probs
