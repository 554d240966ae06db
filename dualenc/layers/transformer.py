"""The transformer encoder: its spec and params, one pre- or post-norm layer (block), and the stack of layers
run as a loop (per-layer params), under lax.scan (stacked params) or in two parts (Split), with the pooled
position's shortcut in the last layer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from dualenc.errors import InputError
from dualenc.layers import multihead
from dualenc.layers.layout import Split, num_layers
from dualenc.layers.primitives import ACTIVATIONS, Params, Rows, dense, dropout, layer_norm, pick_rows


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


def mlp(p: Params, x: jax.Array, activation: str, dtype) -> jax.Array:
    return dense(p["fc2"], ACTIVATIONS[activation](dense(p["fc1"], x, dtype)), dtype)


def block(p: Params, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, dtype,
          key: jax.Array | None, need_probs: bool = False, first_only: Rows = False,
          attention: str = "xla") -> tuple[jax.Array, jax.Array | None]:
    """One encoder layer, pre- or post-norm. Returns (hidden states, attention probs or None).

    first_only computes one position's output per row only, (B, 1, D): the first (True) or those of a (B,)
    array; all a pooler needs from the last layer. attention: the implementation's name (multihead.attention).
    """
    keys = (None,) * 3 if key is None else tuple(jax.random.fold_in(key, i) for i in range(3))
    norm = lambda name, y: layer_norm(p[name], y, spec.eps, dtype)  # noqa: E731
    residual = x if first_only is False else pick_rows(x, first_only)
    full = x.shape
    pick = None if first_only is False else functools.partial(pick_rows, rows=first_only)
    drop = lambda y, k: dropout(y, spec.hidden_dropout, k, full, pick)  # noqa: E731  (masks as in the full layer)
    if spec.prenorm:
        a, probs = multihead.attention(p["attention"], norm("attention_norm", x), bias, spec, dtype, keys[0],
                                       need_probs, first_only, attention=attention)
        x = residual + drop(a, keys[1])
        m = mlp(p["mlp"], norm("mlp_norm", x), spec.activation, dtype)
        x = x + drop(m, keys[2])
    else:
        a, probs = multihead.attention(p["attention"], x, bias, spec, dtype, keys[0], need_probs, first_only,
                                       attention=attention)
        x = norm("attention_norm", residual + drop(a, keys[1]))
        m = mlp(p["mlp"], x, spec.activation, dtype)
        x = norm("mlp_norm", x + drop(m, keys[2]))
    return x, probs


def encoder(p: Params | tuple | Split, x: jax.Array, bias: jax.Array | None, spec: EncoderSpec, *, dtype,
            key: jax.Array | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
            remat_policy: str | None = None, first_only: Rows = False, attention: str = "xla"):
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

    attention names the attention implementation every layer runs (see multihead.resolve_attention).

    Returns (last hidden state, per-layer outputs (depth, B, L, D) or None, attention probs
    (depth, B, H, L, L) or None).
    """
    multihead.implementation(attention)  # an unknown name fails here, before tracing any layer
    pooled = first_only is not False
    if pooled and (output_hidden_states or output_attentions):
        raise InputError("pooled_only leaves out the last layer's other positions: it cannot be combined with "
                         "output_hidden_states or output_attentions")

    def step(h, xs, first):  # first (static): this layer computes the pooled positions only
        layer_p, layer_key = xs
        h, probs = block(layer_p, h, bias, spec, dtype, layer_key, output_attentions,
                         first_only if first else False, attention)
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
