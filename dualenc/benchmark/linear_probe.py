"""CLIP_benchmark's linear probe in JAX: few-shot selection, a linear classifier trained with AdamW on frozen
features, its weight-decay sweep on a validation split, and its metrics.

It follows LAION's CLIP_benchmark 1.6.2 (clip_benchmark.metrics.linear_probe) step for step, in float32:
torch.nn.Linear's init, torch.optim.AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay), the mean cross-entropy,
a cosine learning rate set before each step (no warmup), `epochs` passes over the rows in a shuffled order in
batches of `batch_size` (the last one smaller). With `randomness="torch"` the init and every epoch's order are
drawn as its `train()` draws them from torch's generator, so the numbers are its numbers; with "numpy" (the
default, no torch needed) they come from numpy Generators seeded by `seed`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualenc.benchmark.metrics import mean_per_class_recall, top_k, topk_accuracy
from dualenc.errors import InputError

# Its sweep: 97 weight decays; the 7 of logspace(-6, 2, 7) first (found among the 97 by float equality, as it
# does: all 7 are), then spans of 8, 4, 2, 1 around the best.
WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
FIRST = [i for i, wd in enumerate(WEIGHT_DECAYS) if wd in np.logspace(-6, 2, num=7).tolist()]
SPANS = (8, 4, 2, 1)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
RANDOMNESS = ("numpy", "torch")


class Draws(NamedTuple):
    """The random numbers of one fit: the initial kernel (d, C) and bias (C,), and each epoch's row order
    (epochs, n). CLIP_benchmark reseeds before every fit, so every fit on the same rows draws the same."""
    kernel: np.ndarray
    bias: np.ndarray
    orders: np.ndarray


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("randomness='torch' draws with PyTorch's generator, and torch is not installed: "
                          "pip install torch, or pass randomness='numpy'") from e
    return torch


def draw(randomness: str, seed: int, n_rows: int, dim: int, n_classes: int, epochs: int) -> Draws:
    """One fit's draws. "torch": exactly CLIP_benchmark's train(): torch.manual_seed(seed), torch.nn.Linear(dim,
    n_classes), then per epoch what iterating its shuffled DataLoader draws (the iterator's base seed, the
    RandomSampler's seed, randperm with a Generator seeded by it); torch's global RNG is left as it was.
    "numpy": a Generator seeded by [seed, 1] draws the kernel and bias uniform in +-1/sqrt(dim) (Linear's
    bounds), then one permutation per epoch."""
    if randomness not in RANDOMNESS:
        raise InputError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    if randomness == "torch":
        torch = _torch()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = torch.nn.Linear(dim, n_classes)
            orders = []
            for _ in range(epochs):
                torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's _base_seed
                generator = torch.Generator()
                generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
                orders.append(torch.randperm(n_rows, generator=generator).numpy())
            return Draws(layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy(),
                         np.stack(orders))
    rng = np.random.default_rng([seed, 1])
    bound = 1 / math.sqrt(dim)
    kernel = rng.uniform(-bound, bound, (dim, n_classes)).astype(np.float32)
    bias = rng.uniform(-bound, bound, (n_classes,)).astype(np.float32)
    return Draws(kernel, bias, np.stack([rng.permutation(n_rows) for _ in range(epochs)]))


def _loss(params, x_BD, y_B, w_B):
    kernel, bias = params
    z_BC = jnp.dot(x_BD, kernel, precision=jax.lax.Precision.HIGHEST) + bias[None, :]
    ce_B = jax.nn.logsumexp(z_BC, axis=1) - jnp.take_along_axis(z_BC, y_B[:, None], axis=1)[:, 0]
    return jnp.sum(w_B * ce_B) / jnp.sum(w_B)  # padding rows weigh 0: the mean over the batch's real rows


@jax.jit
def _train(x_ND, y_N, kernel, bias, rows_SB, weights_SB, decay_S, step_size_S, correction_S):
    """Every step of one fit in one scan; one compile per (rows, dim, classes, steps, batch) shape."""
    def step(carry, inputs):
        params, m, v = carry
        rows, weights, decay, step_size, correction = inputs
        grads = jax.grad(_loss)(params, x_ND[rows], y_N[rows], weights)
        # torch's single-tensor AdamW, operation for operation: p *= 1 - lr*wd; m.lerp_(g, 1 - b1);
        # v.mul_(b2).addcmul_(g, g, 1 - b2); p.addcdiv_(m, sqrt(v)/sqrt(1 - b2^t) + eps, -lr/(1 - b1^t))
        params = [p * decay for p in params]
        m = [a + (1 - BETA1) * (g - a) for a, g in zip(m, grads)]
        v = [a * BETA2 + ((1 - BETA2) * g) * g for a, g in zip(v, grads)]
        params = [p + (-step_size * a) / (jnp.sqrt(b) / correction + EPS) for p, a, b in zip(params, m, v)]
        return (params, m, v), None

    zeros = [jnp.zeros_like(kernel), jnp.zeros_like(bias)]
    (params, _, _), _ = jax.lax.scan(step, ([kernel, bias], zeros, zeros),
                                     (rows_SB, weights_SB, decay_S, step_size_S, correction_S))
    return params


def _schedule(total: int, lr: float, weight_decay: float):
    """Per step: 1 - lr_t*wd, lr_t/(1 - b1^t), sqrt(1 - b2^t), computed in float64 as torch does, then float32;
    lr_t is its cosine_lr(optimizer, lr, 0., total) at step t - 1."""
    lrs = [0.5 * (1 + np.cos(np.pi * s / float(total))) * lr for s in range(total)]
    t = [float(s + 1) for s in range(total)]
    return (np.array([1 - a * weight_decay for a in lrs], np.float32),
            np.array([a / (1 - BETA1 ** s) for a, s in zip(lrs, t)], np.float32),
            np.array([(1 - BETA2 ** s) ** 0.5 for s in t], np.float32))


def fit_linear(features, labels, n_classes: int, weight_decay: float, *, lr: float, epochs: int, batch_size: int,
               draws: Draws) -> tuple[np.ndarray, np.ndarray]:
    """Trains one linear classifier as CLIP_benchmark's train() does; returns its kernel (d, C) and bias (C,).

    Args:
      features: (n, d) float32; labels: (n,) integers in [0, n_classes).
      draws: the init and each epoch's order, from `draw` (orders (epochs, n)).
    """
    x = _features(features, "features")
    n, dim = x.shape
    y = _label_array(labels, n, "labels")
    if y.max() >= n_classes:
        raise InputError(f"labels must lie in [0, n_classes={n_classes}), got {y.max()}")
    batch_size = _integer(batch_size, "batch_size", 1)
    if draws.kernel.shape != (dim, n_classes) or draws.bias.shape != (n_classes,) or \
            draws.orders.shape != (epochs, n):
        raise InputError(f"draws hold a kernel {draws.kernel.shape}, bias {draws.bias.shape} and orders "
                         f"{draws.orders.shape}; this fit needs {(dim, n_classes)}, {(n_classes,)}, {(epochs, n)}")
    per_epoch = -(-n // batch_size)
    total = epochs * per_epoch
    padded = per_epoch * batch_size
    rows = np.zeros((epochs, padded), np.int32)
    rows[:, :n] = draws.orders
    weights = np.zeros((epochs, padded), np.float32)
    weights[:, :n] = 1
    kernel, bias = _train(x, y.astype(np.int32), draws.kernel, draws.bias, rows.reshape(total, batch_size),
                          weights.reshape(total, batch_size), *_schedule(total, lr, weight_decay))
    return np.asarray(kernel), np.asarray(bias)


def _features(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not len(x) or not np.issubdtype(x.dtype, np.floating) or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise InputError(f"{name} must be {want} floats with n >= 1, got {x.shape} {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{name} holds NaN or infinite values")
    return x


def _label_array(y, n: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{name} must be ({n},) integers, got {y.shape} {y.dtype}")
    if y.min() < 0:
        raise InputError(f"{name} must be non-negative class indices, got {y.min()}")
    return y.astype(np.int64)


def _normalize(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize: x / max(||x||, 1e-12) per row."""
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), np.float32(1e-12))


def _logits(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x @ kernel + bias, ranked as torch's topk/argmax rank it: NaN above +inf above every number (a fit whose
    decay factor 1 - lr*wd is below -1 diverges to NaN). In float64, NaN -> +inf and +inf -> 1e300 keep that
    order; ties, all-NaN rows included, go to the lower class as torch's argmax does (its CPU topk picks an
    implementation-defined one)."""
    logits = (x @ kernel + bias[None, :]).astype(np.float64)
    logits[logits == np.inf] = 1e300
    logits[np.isnan(logits)] = np.inf
    return logits


def _integer(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _fewshot(perm: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The rows CLIP_benchmark keeps, in its order: walking `perm`, all rows (k = -1) or each class's first k."""
    if k < 0:
        return perm
    taken = {}
    keep = []
    for p in perm:
        c = int(labels[p])
        if taken.get(c, 0) < k:
            taken[c] = taken.get(c, 0) + 1
            keep.append(p)
    short = sorted(c for c, count in taken.items() if count != k)
    if short:
        raise InputError(f"fewshot_k={k}: insufficient data, classes {short[:10]} have fewer than {k} train rows "
                         "(CLIP_benchmark prints 'insufficient data for this eval' and returns None)")
    return np.array(keep, np.int64)


def linear_probe(train_features, train_labels, test_features, test_labels, val_features=None, val_labels=None, *,
                 fewshot_k: int = -1, lr: float = 0.1, epochs: int = 10, batch_size: int = 64, seed: int = 0,
                 randomness: str = "numpy", order=None, normalized: bool = True) -> dict:
    """CLIP_benchmark's linear-probe evaluation (its `linear_probe.evaluate`) on precomputed features.

    The train rows are walked in a permuted order (`order`, else drawn), keeping all of them (fewshot_k = -1)
    or each class's first fewshot_k (a class with fewer raises InputError). With a validation split the weight
    decay is chosen as its sweep chooses it (the 7 points of logspace(-6, 2, 7), then spans 8, 4, 2, 1 around
    the best of logspace(-6, 2, 97); the first of equal validation accuracies is kept, and when all are 0 the
    index 0, as its find_peak does; a weight decay is fitted once and its accuracy reused where its sweep
    fits it again, which changes nothing as every fit draws the same), then the final classifier is fitted on
    train + validation (fewshot_k = -1) or on the few-shot rows alone; without one the weight decay is 0.
    The classes are 0..max(train_labels); test rows of other classes count as wrong.

    Args:
      train_features: (n, d) floats; train_labels: (n,) integers >= 0. test_*, val_* alike (val optional).
      fewshot_k: -1 for all train rows, else the rows kept per class.
      lr, epochs, batch_size: AdamW's peak learning rate, passes over the rows, rows per step.
      seed: seeds each fit's draws (see `draw`) and the drawn order.
      randomness: "numpy" or "torch" (CLIP_benchmark's own draws, with torch installed).
      order: a permutation of range(n) to walk instead of drawing one. CLIP_benchmark draws it with
        torch.randperm(n) from torch's global generator wherever its run left it; drawn here it is
        numpy's Generator([seed, 0]).permutation(n), or torch.randperm(n) just after torch.manual_seed(seed).
      normalized: L2-normalise every feature row first (its Featurizer's F.normalize), as its default does.

    Returns:
      {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay", "epochs", "seed", "fewshot_k",
      "normalized"}, its keys. lp_acc5 is NaN unless the largest test label is >= 5: its test looks at the test
      labels, not at the number of classes (kept as it is). The prediction is the highest logit (ties to the
      lower class); mean per-class recall averages over the classes present in the test labels. A fit with
      1 - lr*wd < -1 diverges to NaN, as its does (its sweep reaches wd 100: at lr 0.1 its top points diverge);
      NaN logits rank above all others, ties to the lower class (torch's argmax; its CPU topk's pick among
      NaNs is implementation-defined).
    """
    if randomness not in RANDOMNESS:
        raise InputError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    if isinstance(fewshot_k, bool) or not isinstance(fewshot_k, (int, np.integer)) or not (
            fewshot_k == -1 or fewshot_k >= 1):
        raise InputError(f"fewshot_k must be -1 (all rows) or a positive integer, got {fewshot_k!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not 0 < lr < math.inf:
        raise InputError(f"lr must be a positive number, got {lr!r}")
    epochs = _integer(epochs, "epochs", 1)
    batch_size = _integer(batch_size, "batch_size", 1)
    seed = _integer(seed, "seed", 0)
    if seed >= 1 << 63:
        raise InputError(f"seed must be below 2**63, got {seed}")
    if not isinstance(normalized, bool):
        raise InputError(f"normalized must be True or False, got {normalized!r}")
    x_train = _features(train_features, "train_features")
    dim = x_train.shape[1]
    y_train = _label_array(train_labels, len(x_train), "train_labels")
    x_test = _features(test_features, "test_features", dim)
    y_test = _label_array(test_labels, len(x_test), "test_labels")
    if (val_features is None) != (val_labels is None):
        raise InputError("val_features and val_labels come together: pass both or neither")
    n_classes = int(y_train.max()) + 1
    with_val = val_features is not None
    if with_val:
        x_val = _features(val_features, "val_features", dim)
        y_val = _label_array(val_labels, len(x_val), "val_labels")
        if y_val.max() >= n_classes:
            raise InputError(f"val_labels must lie in [0, {n_classes}) (the train labels' classes), got "
                             f"{y_val.max()}")
    if normalized:
        x_train, x_test = _normalize(x_train), _normalize(x_test)
        x_val = _normalize(x_val) if with_val else None
    n = len(x_train)
    if order is None:
        if randomness == "torch":
            torch = _torch()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                perm = torch.randperm(n).numpy()
        else:
            perm = np.random.default_rng([seed, 0]).permutation(n)
    else:
        perm = np.asarray(order)
        if perm.shape != (n,) or not np.issubdtype(perm.dtype, np.integer) or \
                not np.array_equal(np.sort(perm), np.arange(n)):
            raise InputError(f"order must be a permutation of range({n}) (the train rows), got {perm.shape} "
                             f"{perm.dtype}")
    keep = _fewshot(perm.astype(np.int64), y_train, fewshot_k)
    x_fit, y_fit = x_train[keep], y_train[keep]

    draws = {}

    def fit(x, y, weight_decay):
        if len(x) not in draws:
            draws[len(x)] = draw(randomness, seed, len(x), dim, n_classes, epochs)
        return fit_linear(x, y, n_classes, weight_decay, lr=lr, epochs=epochs, batch_size=batch_size,
                          draws=draws[len(x)])

    if with_val:
        fitted, accuracy = {}, {}

        def peak(candidates):
            best, best_acc = 0, 0.0  # its find_peak: strict <, from index 0 and accuracy 0
            for i in candidates:
                if i not in accuracy:
                    fitted[i] = fit(x_fit, y_fit, WEIGHT_DECAYS[i])
                    kernel, bias = fitted[i]
                    accuracy[i] = topk_accuracy(_logits(x_val, kernel, bias), y_val, (1,))[0]
                if best_acc < accuracy[i]:
                    best, best_acc = i, accuracy[i]
            return best

        best = peak(FIRST)
        for span in SPANS:
            best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        weight_decay = WEIGHT_DECAYS[best]
        if fewshot_k < 0:
            kernel, bias = fit(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), weight_decay)
        else:
            kernel, bias = fitted[best] if best in fitted else fit(x_fit, y_fit, weight_decay)
    else:
        weight_decay = 0.0
        kernel, bias = fit(x_fit, y_fit, weight_decay)

    logits = _logits(x_test, kernel, bias)
    if y_test.max() >= 5:
        acc1, acc5 = topk_accuracy(logits, y_test, (1, 5))
    else:
        acc1, acc5 = topk_accuracy(logits, y_test, (1,))[0], float("nan")
    recall = mean_per_class_recall(y_test, top_k(logits, 1)[:, 0])
    return {"lp_acc1": acc1, "lp_acc5": acc5, "lp_mean_per_class_recall": recall, "weight_decay": weight_decay,
            "epochs": epochs, "seed": seed, "fewshot_k": int(fewshot_k), "normalized": normalized}
