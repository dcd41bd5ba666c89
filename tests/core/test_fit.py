"""Head training: convergence, determinism, early stopping, class weights."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import blobs as _blobs
from vlrouter.core.fit import train_head
from vlrouter.core.metrics import evaluate
from vlrouter.core.registry import TrainSection


def _opts(**kw) -> TrainSection:
    """The seed's minibatch solver (AdamW, early stopping) with small settings."""
    base = {"epochs": 30, "batch_size": 8, "lr": 0.01, "patience": 5, "eval_every": 5, "seed": 0, "solver": "adamw"}
    return TrainSection(**{**base, **kw})


def test_head_learns_separable_features_and_reports_best_eval():
    x, y = _blobs()
    vx, vy = _blobs(seed=0, n_per_class=(5, 5, 5))
    head, stats = train_head(x, y, vx, vy, _opts(), num_labels=3)
    assert stats["best_acc"] == 1.0 and stats["best_loss"] < 0.3
    assert not head.training
    assert evaluate(head, vx, vy, class_names=["a", "b", "c"])["accuracy"] == 1.0


def test_same_data_and_seed_give_identical_weights():
    x, y = _blobs()
    vx, vy = _blobs(n_per_class=(4, 4, 4), seed=1)
    for kind in ("linear", "mlp"):  # the MLP has dropout: seeded too
        opts = _opts(head=kind, head_hidden=32)
        a, _ = train_head(x, y, vx, vy, opts, num_labels=3)
        torch.manual_seed(1234)  # the global RNG state must not matter
        b, _ = train_head(x, y, vx, vy, opts, num_labels=3)
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(ta, tb), name
        c, _ = train_head(x, y, vx, vy, opts.model_copy(update={"seed": 1}), num_labels=3)
        assert not torch.equal(a[-1].weight, c[-1].weight)  # the seed matters


def test_early_stopping_counts_patience_in_evaluations(tmp_path):
    x, y = _blobs(spread=6.0)  # overlapping: val loss soon stops improving
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=5, spread=6.0)
    head, stats = train_head(x, y, vx, vy, _opts(epochs=500, patience=2, eval_every=1, lr=0.05), num_labels=3,
                             log_dir=tmp_path / "tb")
    assert stats["stopped_early"]
    assert stats["steps"] - stats["best_step"] == 2  # two evaluations without improvement, one per step
    assert stats["steps"] < 500 * 8
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard logs


def test_imbalanced_classes_get_inverse_frequency_weights():
    x, y = _blobs(n_per_class=(30, 10, 5))
    vx, vy = _blobs(n_per_class=(3, 3, 3), seed=2)
    _, stats = train_head(x, y, vx, vy, _opts(epochs=2), num_labels=3)
    w = stats["class_weights"]
    assert w[0] < w[1] < w[2] and w[2] == pytest.approx(45 / (3 * 5), rel=1e-3)
    _, balanced = train_head(*_blobs(), vx, vy, _opts(epochs=2), num_labels=3)
    assert balanced["class_weights"] is None


def test_lbfgs_head_converges_to_the_regularised_optimum_and_is_deterministic():
    from vlrouter.core.fit import L2_GRID, choose_l2

    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    opts = TrainSection(solver="lbfgs", seed=0)
    a, stats = train_head(x, y, vx, vy, opts, num_labels=3, l2=0.01)
    b, _ = train_head(x, y, vx, vy, opts, num_labels=3, l2=0.01)
    assert stats["solver"] == "lbfgs" and stats["l2"] == 0.01
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    # at the optimum the gradient of the regularised loss vanishes: no direction lowers it
    w = a[1].weight.detach().clone().double().requires_grad_(True)
    bias = a[1].bias.detach().clone().double().requires_grad_(True)
    xs = ((x - a[0].mean) / a[0].std).double()
    loss = torch.nn.functional.cross_entropy(xs @ w.T + bias, y) + 0.005 * (w * w).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(bias.grad.abs().max()) < 1e-4
    assert torch.equal(a[0].mean, x.mean(0))  # standardized with the TRAINING features' statistics
    # l2 auto, nobody chose it: cross-validation on the training features picks it from the grid
    chosen, scores = choose_l2(x, y, num_labels=3, folds=opts.cv_folds, seed=0)
    _, auto = train_head(x, y, vx, vy, opts, num_labels=3)
    assert auto["l2"] == chosen and chosen in L2_GRID and [s["l2"] for s in scores] == list(L2_GRID)
