"""The linear probe against LAION's CLIP_benchmark's own linear_probe.evaluate / train / infer, run on CPU."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from clip_benchmark.metrics import linear_probe as cb
from clip_benchmark.metrics import zeroshot_classification as cb_zs
from dualenc.benchmark import linear_probe as lp
from dualenc.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:.pin_memory.:UserWarning")  # its DataLoaders on CPU

N_TRAIN, N_VAL, N_TEST, DIM, CLASSES = 60, 30, 40, 16, 7
BATCH, EPOCHS, LR = 16, 10, 0.1  # 60 rows in batches of 16: the last batch of each epoch holds 12


def _split(rng, n, means, noise):
    labels = rng.permutation(np.arange(n) % CLASSES)
    return (means[labels] + noise * rng.normal(size=(n, DIM))).astype(np.float32), labels.astype(np.int64)


def _data(noise, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, DIM))
    return [_split(rng, n, means, noise) for n in (N_TRAIN, N_VAL, N_TEST)]


@pytest.fixture(scope="module")
def data():
    return _data(noise=1.6)  # partly separable: the sweep's validation accuracies differ, its peak is inside


class _Stored(torch.nn.Module):
    """A `model` for CLIP_benchmark whose encode_image maps row indices to stored features."""

    def __init__(self, features):
        super().__init__()
        self.features = torch.from_numpy(features)

    def encode_image(self, index):
        return self.features[index]


def _cb_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's accuracy with .sum() for .sum(0, keepdim=True): numpy 2.4 refuses float() of an array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().cpu().numpy()) / len(target) for k in topk]


@pytest.fixture(scope="module")
def on_cpu():
    """CLIP_benchmark's CUDA-only code on CPU: .cuda() and .to("cuda") keep the tensor; randperm is spied on;
    every validation accuracy its sweep computes is recorded."""
    mp = pytest.MonkeyPatch()
    perms, val_accuracies = [], []
    randperm, to = torch.randperm, torch.Tensor.to

    def spy_randperm(*args, **kwargs):
        out = randperm(*args, **kwargs)
        if "generator" not in kwargs:
            perms.append(out.clone())
        return out

    def accuracy(output, target, topk=(1,)):
        out = _cb_accuracy(output, target, topk)
        if tuple(topk) == (1,):
            val_accuracies.append(out[0])
        return out

    mp.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    mp.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a and a[0] == "cuda" else to(self, *a, **k))
    mp.setattr(torch, "randperm", spy_randperm)
    mp.setattr(cb, "accuracy", accuracy)
    mp.setattr(cb_zs, "accuracy", _cb_accuracy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its steps are tiny: torch's thread pool beside XLA's made them 20x slower
    yield perms, val_accuracies
    torch.set_num_threads(threads)
    mp.undo()


def _clip_benchmark(data, tmp_path, on_cpu, with_val, fewshot_k):
    perms, val_accuracies = on_cpu
    del perms[:], val_accuracies[:]
    (xt, yt), (xv, yv), (xs, ys) = data
    model = _Stored(np.concatenate([xt, xv, xs]))

    def loader(labels, start):
        index = torch.arange(start, start + len(labels))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(index, torch.from_numpy(labels)),
                                           batch_size=BATCH, shuffle=False)

    torch.manual_seed(123)  # its perm comes from the global generator wherever a run left it
    out = cb.evaluate(model, loader(yt, 0), loader(ys, N_TRAIN + N_VAL), fewshot_k, BATCH, 0, LR, EPOCHS,
                      "m", 0, str(tmp_path / "features"), "cuda", val_dataloader=loader(yv, N_TRAIN) if with_val
                      else None, normalize=True, amp=False)
    return out, perms[0].numpy(), list(val_accuracies)


@pytest.mark.parametrize("with_val,fewshot_k", [(False, -1), (True, -1), (True, 2)])
def test_linear_probe_equals_clip_benchmark(data, tmp_path, on_cpu, with_val, fewshot_k):
    theirs, perm, val_accuracies = _clip_benchmark(data, tmp_path, on_cpu, with_val, fewshot_k)
    (xt, yt), (xv, yv), (xs, ys) = data
    val = (xv, yv) if with_val else (None, None)
    ours = lp.linear_probe(xt, yt, xs, ys, *val, fewshot_k=fewshot_k, lr=LR, epochs=EPOCHS, batch_size=BATCH,
                           seed=0, randomness="torch", order=perm)
    assert set(ours) == set(theirs)
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert ours["weight_decay"] == theirs["weight_decay"]
    assert {k: ours[k] for k in ("epochs", "seed", "fewshot_k", "normalized")} == \
        {k: theirs[k] for k in ("epochs", "seed", "fewshot_k", "normalized")}
    if with_val:
        assert len(val_accuracies) == 7 + 3 * len(lp.SPANS)  # its sweep: 19 fits
        assert len(set(val_accuracies)) >= 3, val_accuracies  # not all ties: the choice means something
        assert ours["weight_decay"] not in (lp.WEIGHT_DECAYS[0], 0)
    assert 0.3 < ours["lp_acc1"] < 1  # neither hopeless nor trivial


def test_one_fit_equals_its_train_and_infer(data, on_cpu):
    (xt, yt), _, (xs, ys) = data
    weight_decay = 0.05
    dataset = cb.FeatureDataset(torch.from_numpy(xt), torch.from_numpy(yt))
    model = cb.train(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True), DIM, CLASSES,
                     weight_decay, LR, EPOCHS, False, "cuda", 5)
    test = cb.FeatureDataset(torch.from_numpy(xs), torch.from_numpy(ys))
    logits, _ = cb.infer(model, torch.utils.data.DataLoader(test, batch_size=BATCH), False, "cuda")
    draws = lp.draw("torch", 5, N_TRAIN, DIM, CLASSES, EPOCHS)
    kernel, bias = lp.fit_linear(xt, yt, CLASSES, weight_decay, lr=LR, epochs=EPOCHS, batch_size=BATCH, draws=draws)
    np.testing.assert_allclose(xs @ kernel + bias, logits.numpy(), atol=1e-5, rtol=0)
    assert np.abs(kernel - draws.kernel).max() > 0.1  # it trained


def test_diverging_fits_diverge_as_its_do_and_rank_nan_first(data, on_cpu):
    (xt, yt), (xv, yv), (xs, ys) = data
    dataset = cb.FeatureDataset(torch.from_numpy(xt), torch.from_numpy(yt))
    theirs = cb.train(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True), DIM, CLASSES, 100.0,
                      1.0, EPOCHS, False, "cuda", 0)
    kernel, bias = lp.fit_linear(xt, yt, CLASSES, 100.0, lr=1.0, epochs=EPOCHS, batch_size=BATCH,
                                 draws=lp.draw("torch", 0, N_TRAIN, DIM, CLASSES, EPOCHS))
    assert torch.isnan(theirs.module.weight).all() and np.isnan(kernel).all() and np.isnan(bias).all()
    out = lp.linear_probe(xt, yt, xs, ys, xv, yv, lr=1.0, epochs=EPOCHS, batch_size=BATCH)  # 1 - lr*wd < -1 for wd > 2
    assert out["weight_decay"] < 2 and out["lp_acc1"] > 0.3


def test_torch_draws_are_its_dataloaders():
    state = torch.get_rng_state()
    draws = lp.draw("torch", 3, 37, DIM, 5, 4)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is left as it was
    torch.manual_seed(3)
    layer = torch.nn.Linear(DIM, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(37)), batch_size=8,
                                         shuffle=True)
    orders = [torch.cat([b for (b,) in loader]).numpy() for _ in range(4)]
    np.testing.assert_array_equal(draws.orders, np.stack(orders))
    np.testing.assert_array_equal(draws.kernel, layer.weight.detach().numpy().T)
    np.testing.assert_array_equal(draws.bias, layer.bias.detach().numpy())


def test_numpy_randomness_matches_on_an_easy_problem_and_is_deterministic():
    (xt, yt), (xv, yv), (xs, ys) = _data(noise=0.3, seed=1)
    kw = dict(lr=LR, epochs=EPOCHS, batch_size=BATCH)
    by_numpy = lp.linear_probe(xt, yt, xs, ys, xv, yv, **kw)
    by_torch = lp.linear_probe(xt, yt, xs, ys, xv, yv, randomness="torch", **kw)
    assert by_numpy["weight_decay"] == by_torch["weight_decay"]
    assert abs(by_numpy["lp_acc1"] - by_torch["lp_acc1"]) <= 0.05 and by_numpy["lp_acc1"] >= 0.9
    again = lp.linear_probe(xt, yt, xs, ys, **kw, seed=4)
    assert again == lp.linear_probe(xt, yt, xs, ys, **kw, seed=4)
    one, other = lp.draw("numpy", 4, N_TRAIN, DIM, CLASSES, 2), lp.draw("numpy", 5, N_TRAIN, DIM, CLASSES, 2)
    assert not np.array_equal(one.orders, other.orders) and not np.array_equal(one.kernel, other.kernel)
    compiled = lp._train._cache_size()
    lp.linear_probe(xt, yt, xs, ys, xv, yv, lr=LR, epochs=EPOCHS, batch_size=8)  # shapes no other test uses
    assert lp._train._cache_size() == compiled + 2  # the sweep's fits share one program, train + val another
    # its quirk: acc5 only when the largest test label is >= 5, whatever the number of classes
    low = ys < 5
    assert math.isnan(lp.linear_probe(xt, yt, xs[low], ys[low], **kw)["lp_acc5"])


def test_torch_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="randomness='numpy'"):
        lp.draw("torch", 0, 4, 2, 2, 1)


@pytest.mark.parametrize("change,match", [
    (dict(train_features=np.zeros(4, np.float32)), "train_features"),
    (dict(train_features=np.zeros((0, 3), np.float32), train_labels=np.zeros(0, int)), "train_features"),
    (dict(train_features=np.zeros((4, 3), int)), "train_features"),
    (dict(test_features=np.zeros((2, 5), np.float32)), "test_features"),
    (dict(train_features=np.full((4, 3), np.nan, np.float32)), "train_features"),
    (dict(train_labels=np.zeros(4)), "train_labels"),
    (dict(train_labels=np.array([0, 1, -1, 0])), "train_labels"),
    (dict(test_labels=np.zeros(3, int)), "test_labels"),
    (dict(val_features=np.zeros((2, 3), np.float32)), "val_labels"),
    (dict(val_features=np.zeros((2, 3), np.float32), val_labels=np.array([0, 5])), "val_labels"),
    (dict(fewshot_k=0), "fewshot_k"),
    (dict(fewshot_k=3), "insufficient data"),
    (dict(order=np.array([0, 1, 1, 3])), "order"),
    (dict(randomness="jax"), "randomness"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(seed=-1), "seed"),
    (dict(normalized="yes"), "normalized"),
])
def test_bad_input_names_the_argument(change, match):
    args = dict(train_features=np.eye(4, 3, dtype=np.float32), train_labels=np.array([0, 1, 1, 0]),
                test_features=np.ones((2, 3), np.float32), test_labels=np.array([0, 1]))
    args.update(change)
    with pytest.raises(InputError, match=match):
        lp.linear_probe(**args)


def test_fit_linear_checks_its_inputs():
    draws = lp.draw("numpy", 0, 4, 3, 2, 1)
    x, y = np.eye(4, 3, dtype=np.float32), np.array([0, 1, 1, 0])
    with pytest.raises(InputError, match="labels must lie"):
        lp.fit_linear(x, y + 1, 2, 0.0, lr=0.1, epochs=1, batch_size=2, draws=draws)
    with pytest.raises(InputError, match="draws hold"):
        lp.fit_linear(x, y, 2, 0.0, lr=0.1, epochs=2, batch_size=2, draws=draws)
    with pytest.raises(InputError, match="randomness"):
        lp.draw("jax", 0, 4, 3, 2, 1)
