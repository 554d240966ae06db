"""The few primitives every tower is built from: dense, layer norm, attention, MLP, dropout, the encoder stack.

Params are plain dicts. Kernels are (in, out). Matmuls run in the compute `dtype`; LayerNorm statistics and
softmax run in float32. The encoder's per-layer params carry a leading depth axis and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from dualenc.fields import ACTIVATION_NAMES
from dualenc.errors import InputError

Params = dict[str, Any]
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def _gelu(x):
    # The erf form, as torch's exact gelu; jax.nn.gelu(approximate=False) goes through erfc and runs 2x slower.
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_10": lambda x: jnp.clip(_gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "hardswish": jax.nn.hard_swish,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


# ------------------------------------------------------------------------------------------------ init helpers

Normal = Callable[[tuple, float], jax.Array]  # normal(shape, std): std * N(0, 1) numbers of that shape

NORMAL_CHUNK = 1 << 21  # numbers per threefry call in init_params (2M ran fastest of 1M-8M here)


def init_params(key: jax.Array, build: Callable[[Normal], Params]) -> Params:
    """Runs build(normal) with every normal(shape, std) it asks for cut from one draw of standard normals.

    build is traced twice: once abstractly to learn the shapes, then for real. The numbers come from a
    lax.map over fixed-size threefry chunks, so the program holds one random-number kernel whatever the
    model's size: compiling init is then quick and running it beats one jax.random.normal per leaf.
    """
    wanted = []

    def record(shape, std):
        wanted.append(tuple(shape))
        return jnp.zeros(shape, jnp.float32)

    jax.eval_shape(lambda: build(record))
    sizes = [math.prod(shape) for shape in wanted]
    total = sum(sizes)
    if total <= NORMAL_CHUNK:
        flat = jax.random.normal(key, (total,), jnp.float32)
    else:
        keys = jax.random.split(key, -(-total // NORMAL_CHUNK))
        flat = jax.lax.map(lambda k: jax.random.normal(k, (NORMAL_CHUNK,), jnp.float32), keys).reshape(-1)
    offsets = iter(zip(wanted, itertools.accumulate(sizes[:-1], initial=0), sizes))

    def replay(shape, std):
        expected, start, size = next(offsets)
        assert expected == tuple(shape), (expected, shape)  # build must ask in the same order both times
        return std * flat[start:start + size].reshape(shape)

    return build(replay)


def tower_init(build: Callable[[Normal, Any], Params]) -> Callable[..., Params]:
    """The jitted init(key, config, *, stacked=False) -> params of a tower whose params build(normal, config)
    declares (its encoder stacked)."""
    @functools.partial(jax.jit, static_argnames=("stacked",))
    def init(key: jax.Array, config, *, stacked: bool = False) -> Params:
        """Random params for the tower, initialised as transformers does; the encoder a tuple of per-layer
        dicts, or with stacked=True one dict with a leading depth axis."""
        params = init_params(key, lambda normal: build(normal, config))
        return params if stacked else {**params, "encoder": unstack_layers(params["encoder"])}

    return init


def dense_init(normal: Normal, d_in: int, d_out: int, std: float, bias: bool = True, depth: tuple = ()) -> Params:
    p = {"kernel": normal((*depth, d_in, d_out), std)}
    if bias:
        p["bias"] = jnp.zeros((*depth, d_out), jnp.float32)
    return p


def layer_norm_init(dim: int, depth: tuple = ()) -> Params:
    return {"scale": jnp.ones((*depth, dim), jnp.float32), "bias": jnp.zeros((*depth, dim), jnp.float32)}


# ------------------------------------------------------------------------------------------------ primitives

def lead(v: jax.Array, ndim: int) -> jax.Array:
    """Adds leading unit axes so v broadcasts against an ndim array explicitly (no rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def dense(p: Params, x: jax.Array, dtype) -> jax.Array:
    """x @ kernel + bias: inputs in the compute dtype, accumulated and biased in float32, returned in dtype.

    Asking for a float32 result also picks the fast path: on CPUs with AMX, XLA runs bfloat16 dots with a
    float32 result about 6x faster than the same dots with a bfloat16 result.
    """
    accumulate = jnp.float32 if jax.default_backend() == "cpu" else None  # GPUs accumulate in f32 anyway
    y = jnp.einsum("...i,io->...o", x.astype(dtype), p["kernel"].astype(dtype), preferred_element_type=accumulate)
    if "bias" in p:
        y = y + lead(p["bias"].astype(y.dtype), y.ndim)
    return y.astype(dtype)


def layer_norm(p: Params, x: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm with float32 statistics (biased variance, as torch)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + eps) * lead(p["scale"], x.ndim) + lead(p["bias"], x.ndim)
    return y.astype(dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, shape: tuple | None = None,
            pick: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Inverted dropout; a no-op when key is None (inference) or rate is 0.

    shape, pick: draw the mask for this larger shape and keep pick(mask) of it, so x (e.g. the pooled token of
    a layer's output) is dropped exactly as it would be inside the whole.
    """
    if key is None or rate == 0.0:
        return x
    keep = bernoulli(key, 1.0 - rate, x.shape if shape is None else shape)
    if pick is not None:
        keep = pick(keep)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


Rows = Union[bool, jax.Array]  # which query positions a layer computes: all (False), the first (True), or (B,)


def pick_rows(x: jax.Array, rows: Rows, axis: int = 1) -> jax.Array:
    """One position per batch row along `axis`, the axis kept with size 1: position 0 when rows is True, else
    rows[b] for batch row b (x's leading axis is the batch)."""
    if rows is True:
        return lax.slice_in_dim(x, 0, 1, axis=axis)
    index = jnp.reshape(rows.astype(jnp.int32), (-1,) + (1,) * (x.ndim - 1))
    index = jnp.broadcast_to(index, x.shape[:axis] + (1,) + x.shape[axis + 1:])
    return jnp.take_along_axis(x, index, axis=axis)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def bernoulli(key: jax.Array, p: float, shape: tuple) -> jax.Array:
    """jax.random.bernoulli(key, p, shape): the same draws, made faster on CPU for threefry keys.

    On CPU jax lowers threefry as a loop of its five key injections, to compile quicker; each is a pass over
    memory and a program step of its own, which made dropout cost BERT-base's training step 80 ms. Here
    the rounds are unrolled into elementwise ops that XLA fuses into one pass: the same bits (jax's
    partitionable counter layout), 13x faster. Other keys, and jax's other layout, go to jax.random.
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    if (impl != "threefry2x32" or not jax.config.jax_threefry_partitionable or key.shape != (() if typed else (2,))
            or math.prod(shape) >= 1 << 32):
        return jax.random.bernoulli(key, p, shape)
    k1, k2 = jax.random.key_data(key) if typed else key
    injections = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    counts = sum(lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(math.prod(shape[axis + 1:]))
                 for axis in range(len(shape)))  # the flat index: the low word of jax's 64-bit counter
    x0, x1 = jnp.full(shape, injections[0], jnp.uint32), counts + injections[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + injections[(i + 1) % 3]
        x1 = x1 + injections[(i + 2) % 3] + jnp.uint32(i + 1)
    uniform = lax.bitcast_convert_type(((x0 ^ x1) >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return uniform < jnp.float32(p)


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


# ------------------------------------------------------------------------------------------------ encoder

@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What a transformer encoder layer needs to know; built by each tower from its config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    activation: str
    eps: float
    prenorm: bool  # ViT/CLIP: x + f(norm(x)); BERT/RoBERTa: norm(x + f(x))
    qkv_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_stds: tuple[float, float, float, float] = (0.02, 0.02, 0.02, 0.02)  # q/k/v, out, fc1, fc2


def encoder_init(normal: Normal, spec: EncoderSpec) -> Params:
    """Per-layer params stacked on a leading depth axis."""
    d, i, depth = spec.hidden_size, spec.intermediate_size, (spec.num_layers,)
    qkv_std, out_std, fc1_std, fc2_std = spec.init_stds
    return {
        "attention": {
            "query": dense_init(normal, d, d, qkv_std, spec.qkv_bias, depth),
            "key": dense_init(normal, d, d, qkv_std, spec.qkv_bias, depth),
            "value": dense_init(normal, d, d, qkv_std, spec.qkv_bias, depth),
            "out": dense_init(normal, d, d, out_std, True, depth),
        },
        "attention_norm": layer_norm_init(d, depth),
        "mlp": {"fc1": dense_init(normal, d, i, fc1_std, True, depth),
                "fc2": dense_init(normal, i, d, fc2_std, True, depth)},
        "mlp_norm": layer_norm_init(d, depth),
    }


def attention(p: Params, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, dtype,
              key: jax.Array | None, need_probs: bool = False, first_only: Rows = False,
              queries: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Multi-head self-attention. x: (B, L, D); bias: (B or 1, 1, 1 or L, L) or None. With first_only, only
    one position per row queries (the first, or those of a (B,) array; keys and values still span the
    sequence): out is (B, 1, D). queries (B, Q, D), when given, attend over x instead (cross-attention, as a
    pooling head's probe does).

    Returns (out (B, Q, D), probs (B, H, Q, L) when need_probs or dropout needs them, else None). Heads are
    moved ahead of the sequence axis so both attention matmuls are plain batched matmuls (on CPU this layout
    runs the attention core several times faster than contracting with heads in the middle). Without
    probabilities to return, the softmax is normalised after the value matmul, on (L, K) instead of (L, L).
    """
    b, l, d = x.shape
    h = spec.num_heads
    head_dim = d // h
    if queries is None:
        queries = x if first_only is False else pick_rows(x, first_only)
    n_q = queries.shape[1]
    if first_only is not False and bias is not None and bias.shape[2] > 1:  # a bias row per query (causal)
        bias = pick_rows(jnp.broadcast_to(bias, (b,) + bias.shape[1:]), first_only, axis=2)
    dropping = key is not None and spec.attention_dropout > 0.0
    if jax.default_backend() == "gpu" and not (need_probs or dropping):
        # jax.nn.dot_product_attention picks cuDNN's fused attention where it applies (bf16/fp16), else XLA.
        q = dense(p["query"], queries, dtype).reshape(b, n_q, h, head_dim)
        k, v = (dense(p[n], x, dtype).reshape(b, l, h, head_dim) for n in ("key", "value"))
        mask = None if bias is None else bias == 0
        out = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, n_q, d)
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


def mlp(p: Params, x: jax.Array, activation: str, dtype) -> jax.Array:
    return dense(p["fc2"], ACTIVATIONS[activation](dense(p["fc1"], x, dtype)), dtype)


def block(p: Params, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, dtype,
          key: jax.Array | None, need_probs: bool = False,
          first_only: Rows = False) -> tuple[jax.Array, jax.Array | None]:
    """One encoder layer, pre- or post-norm. Returns (hidden states, attention probs or None).

    first_only computes one position's output per row only, (B, 1, D): the first (True) or those of a (B,)
    array; all a pooler needs from the last layer.
    """
    keys = (None,) * 3 if key is None else tuple(jax.random.fold_in(key, i) for i in range(3))
    norm = lambda name, y: layer_norm(p[name], y, spec.eps, dtype)  # noqa: E731
    residual = x if first_only is False else pick_rows(x, first_only)
    full = x.shape
    pick = None if first_only is False else functools.partial(pick_rows, rows=first_only)
    drop = lambda y, k: dropout(y, spec.hidden_dropout, k, full, pick)  # noqa: E731  (masks as in the full layer)
    if spec.prenorm:
        a, probs = attention(p["attention"], norm("attention_norm", x), bias, spec, dtype, keys[0], need_probs,
                             first_only)
        x = residual + drop(a, keys[1])
        m = mlp(p["mlp"], norm("mlp_norm", x), spec.activation, dtype)
        x = x + drop(m, keys[2])
    else:
        a, probs = attention(p["attention"], x, bias, spec, dtype, keys[0], need_probs, first_only)
        x = norm("attention_norm", residual + drop(a, keys[1]))
        m = mlp(p["mlp"], x, spec.activation, dtype)
        x = norm("mlp_norm", x + drop(m, keys[2]))
    return x, probs


def xavier_stds(hidden: int, intermediate: int) -> tuple[float, float, float, float]:
    """Glorot-scaled stds of an encoder's q/k/v, out, fc1 and fc2 kernels (SigLIP's xavier init, as normals)."""
    square, wide = (1.0 / hidden) ** 0.5, (2.0 / (hidden + intermediate)) ** 0.5
    return (square, square, wide, wide)


def clip_init_stds(hidden: int, depth: int, factor: float) -> tuple[float, float, float, float]:
    """transformers' CLIP init of an encoder's q/k/v, out, fc1 and fc2 kernels (scaled by width and depth)."""
    qkv = hidden ** -0.5 * (2 * depth) ** -0.5 * factor
    return (qkv, hidden ** -0.5 * factor, (2 * hidden) ** -0.5 * factor, qkv)


class Split(NamedTuple):
    """Encoder params in two parts: `frozen` bottom layers (no gradient) and trainable `top` layers."""

    frozen: Params | tuple
    top: Params | tuple


def stack_layers(layer_list) -> Params:
    """Per-layer params (a sequence of dicts) -> one dict with a leading depth axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layer_list)


def unstack_layers(stacked: Params) -> tuple[Params, ...]:
    """The inverse of stack_layers: a tuple of per-layer dicts."""
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(depth))


def num_layers(p) -> int:
    if isinstance(p, Split):
        return num_layers(p.frozen) + num_layers(p.top)
    if isinstance(p, (tuple, list)):
        return len(p)
    return jax.tree_util.tree_leaves(p)[0].shape[0]


def encoder(p: Params | tuple | Split, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, *, dtype,
            key: jax.Array | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
            remat_policy: str | None = None, first_only: Rows = False):
    """Runs the encoder layers.

    p is either the stacked params (a dict, leading depth axis), run with lax.scan so compile time does not
    grow with depth; or a tuple of per-layer dicts, run as a Python loop: a longer compile, but each layer's
    weights (and, under grad, their gradients) are buffers of their own instead of slices of stacked ones,
    which is faster on CPU (see README, performance); or a Split, whose frozen bottom runs under
    stop_gradient so the backward pass covers only the top layers.

    With first_only (no hidden states or attentions asked for) the last hidden state is one position per row
    only, (B, 1, D): the first (True), or those of a (B,) int array (an end-of-text token); all a pooler
    reads. The last layer then computes just that position, about 5/6 of one layer's work less (stacked
    params: when evaluated; see _scan_first_only).

    Returns (last hidden state, per-layer outputs (depth, B, L, D) or None, attention probs
    (depth, B, H, L, L) or None).
    """
    pooled = first_only is not False
    if pooled and (output_hidden_states or output_attentions):
        raise InputError("pooled_only leaves out the last layer's other positions: it cannot be combined with "
                         "output_hidden_states or output_attentions")

    def step(h, xs, first):  # first (static): this layer computes the pooled positions only
        layer_p, layer_key = xs
        h, probs = block(layer_p, h, bias, spec, dtype, layer_key, output_attentions,
                         first_only if first else False)
        return h, (h if output_hidden_states else None, probs if output_attentions else None)

    if remat_policy is not None:
        step = jax.checkpoint(step, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=False,
                              static_argnums=(2,))
    body = lambda h, xs: step(h, xs, False)  # noqa: E731

    def run(params, h, keys, first):
        if isinstance(params, (tuple, list)):
            states, probs = [], []
            for i, layer_p in enumerate(params):
                last = first and i == len(params) - 1
                h, (state, prob) = step(h, (layer_p, None if keys is None else keys[i]), last)
                states.append(state)
                probs.append(prob)
            stack = lambda xs: None if xs[0] is None else jnp.stack(xs)  # noqa: E731
            return h, (stack(states), stack(probs)) if params else (None, None)
        if first:
            return _scan_first_only(body, step, params, h, keys, first_only), (None, None)
        return lax.scan(body, h, (params, keys))

    keys = None if key is None else jax.random.split(key, spec.num_layers)
    if not isinstance(p, Split):
        x, (states, probs) = run(p, x, keys, pooled)
        return x, states, probs
    n_frozen = num_layers(p.frozen)
    bottom_keys, top_keys = (None, None) if keys is None else (keys[:n_frozen], keys[n_frozen:])
    x, (states_b, probs_b) = run(lax.stop_gradient(p.frozen), lax.stop_gradient(x), bottom_keys, False)
    x, (states_t, probs_t) = run(p.top, lax.stop_gradient(x), top_keys, pooled)
    join = lambda a, b: None if a is None else jnp.concatenate([a, b])  # noqa: E731
    return x, join(states_b, states_t), join(probs_b, probs_t)


def _scan_first_only(body, step, params: Params, h: jax.Array, keys, rows: Rows) -> jax.Array:
    """Stacked layers under lax.scan, returning the pooled position (`rows`) of the last layer's output,
    (B, 1, D).

    Evaluated, the layers but the last run in a loop that indexes the stacks, and the last one computes that
    position only. Differentiated (forward or reverse mode), the rule is that of scanning every layer in full
    and slicing, which has the faster backward: indexing the stacks makes it add a whole stack of gradients
    per layer (30% slower for BERT-base here), a cond in the scan body made it 12% slower, and slicing the
    stacks' [:-1] copies them.
    """
    depth = jax.tree_util.tree_leaves(params)[0].shape[0]

    def full(params, h):
        return pick_rows(lax.scan(body, h, (params, keys))[0], rows)

    @jax.custom_jvp
    def run(params, h):
        def pick(i):  # layer i's params and dropout key
            return jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), (params, keys))

        h = lax.fori_loop(0, depth - 1, lambda i, h: body(h, pick(i))[0], h)
        return step(h, pick(depth - 1), True)[0]

    run.defjvp(lambda primals, tangents: jax.jvp(full, primals, tangents))
    return run(params, h)


class TowerOutput(NamedTuple):
    """What transformers' tower models return; hidden_states/attentions are per-layer tuples when requested."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


def tower_output(last: jax.Array, pooled: jax.Array, embeddings: jax.Array, states: jax.Array | None,
                 probs: jax.Array | None) -> TowerOutput:
    """Packs encoder results as transformers does: hidden_states = (encoder input, each layer's output)."""
    hidden = None if states is None else (embeddings,) + tuple(states[i] for i in range(states.shape[0]))
    attentions = None if probs is None else tuple(probs[i] for i in range(probs.shape[0]))
    return TowerOutput(last, pooled, hidden, attentions)
