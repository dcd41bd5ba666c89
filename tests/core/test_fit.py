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
    assert L2_GRID == (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # README, train.l2: "chosen by cross-validation from 1e-4 … 1"


def test_adamw_stats_count_every_sample_every_epoch():
    """9 samples in batches of 4: 3 steps an epoch (the last batch holds one sample), every evaluation logged."""
    x, y = _blobs(n_per_class=(3, 3, 3))
    vx, vy = _blobs(n_per_class=(2, 2, 2), seed=1)
    _, stats = train_head(x, y, vx, vy, _opts(epochs=4, batch_size=4, eval_every=5, patience=100), num_labels=3)
    assert (stats["steps"], stats["epochs_run"], stats["stopped_early"]) == (12, 4.0, False)
    assert (stats["n_train"], stats["n_val"]) == (9, 6)
    assert [h["step"] for h in stats["history"]] == [5, 10, 12]  # every eval_every steps, and after the last
    assert stats["samples_per_s"] * stats["seconds"] == pytest.approx(12 * 4, rel=0.25)  # seconds: rounded to ms


def test_a_run_whose_validation_loss_is_never_finite_reports_no_best():
    x, y = _blobs()
    vx, vy = _blobs(n_per_class=(2, 2, 2), seed=1)
    vx[0, 0] = float("nan")
    _, stats = train_head(x, y, vx, vy, _opts(epochs=2), num_labels=3)
    assert stats["best_loss"] == float("inf") and stats["best_acc"] == 0.0 and stats["best_step"] == 0


def test_the_label_count_is_inferred_from_the_labels_when_not_given():
    x, y = _blobs()
    vx, vy = _blobs(n_per_class=(2, 2, 2), seed=1)
    head, _ = train_head(x, y, vx, vy, TrainSection(solver="lbfgs"), l2=0.1)
    assert head[1].weight.shape == (3, x.shape[1])


def test_lbfgs_stats_report_the_regularised_training_loss_and_its_work():
    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    head, stats = train_head(x, y, vx, vy, TrainSection(solver="lbfgs"), num_labels=3, l2=0.1)
    w, b = head[1].weight.detach().double(), head[1].bias.detach().double()
    xs = ((x - head[0].mean) / head[0].std).double()
    objective = torch.nn.functional.cross_entropy(xs @ w.T + b, y) + 0.05 * (w * w).sum()
    assert stats["train_loss"] == pytest.approx(float(objective), rel=1e-5)
    assert stats["epochs_run"] >= stats["steps"] >= 1 and not stats["stopped_early"]  # evaluations, iterations
    assert stats["n_train"] == 60 and stats["n_val"] == 18


def test_an_auto_l2_inside_train_head_uses_the_configured_folds():
    from vlrouter.core.fit import choose_l2

    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    _, stats = train_head(x, y, vx, vy, TrainSection(solver="lbfgs", cv_folds=2, seed=3), num_labels=3)
    assert stats["l2"] == choose_l2(x, y, num_labels=3, folds=2, seed=3)[0]


def test_stratified_folds_are_disjoint_cover_everything_and_spread_each_class_evenly():
    from vlrouter.core.fit import stratified_folds

    y = [0] * 7 + [1] * 5 + [2] * 3
    folds = stratified_folds(y, 3, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(15))
    for c, n in ((0, 7), (1, 5), (2, 3)):
        per_fold = [sum(1 for i in f if y[i] == c) for f in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1
    assert stratified_folds(y, 3, seed=0) == folds and stratified_folds(y, 3, seed=1) != folds


def test_out_of_fold_logits_come_from_the_model_that_did_not_see_the_sample():
    from vlrouter.core.fit import cv_score, fit_logistic, stratified_folds
    from vlrouter.core.head import standardize_stats

    x, y = _blobs(n_per_class=(12, 6, 4), spread=3.0)
    folds = stratified_folds(y, 2, seed=0)
    acc, nll, oof = cv_score(x, y, folds, num_labels=3, l2=0.1)
    held = torch.tensor(folds[0])
    seen = torch.tensor(folds[1])
    mean, std = standardize_stats(x[seen])
    w, b, _ = fit_logistic((x[seen] - mean) / std, y[seen], num_labels=3, l2=0.1)
    torch.testing.assert_close(oof[held], ((x[held] - mean) / std) @ w.T + b)
    assert acc == pytest.approx(float((oof.argmax(1) == y).double().mean()))
    assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(oof.double(), y)))


def test_the_best_l2_is_the_most_accurate_then_the_best_calibrated_then_the_strongest():
    from vlrouter.core.fit import best_l2

    assert best_l2([{"l2": 0.1, "cv_acc": 0.8, "cv_nll": 0.2}, {"l2": 1.0, "cv_acc": 0.9, "cv_nll": 0.5}]) == 1.0
    assert best_l2([{"l2": 0.1, "cv_acc": 0.9, "cv_nll": 0.2}, {"l2": 1.0, "cv_acc": 0.9, "cv_nll": 0.5}]) == 0.1
    assert best_l2([{"l2": 0.1, "cv_acc": 0.9, "cv_nll": 0.2}, {"l2": 1.0, "cv_acc": 0.9, "cv_nll": 0.2}]) == 1.0


def test_the_learning_rate_halves_when_the_validation_loss_plateaus():
    x, y = _blobs(spread=6.0)  # overlapping: val loss soon stops improving
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=5, spread=6.0)
    _, stats = train_head(x, y, vx, vy, _opts(epochs=500, patience=8, eval_every=1, lr=0.05), num_labels=3)
    lrs = [h["lr"] for h in stats["history"]]
    # stopping needs 8 evaluations without improvement; the plateau scheduler halves after 4 + 1 of them
    assert stats["stopped_early"] and lrs[0] == 0.05
    assert min(lrs) < 0.05 and all(any(lr == pytest.approx(0.05 * 0.5 ** j) for j in range(10)) for lr in lrs)
    assert lrs == sorted(lrs, reverse=True)


def test_lbfgs_returns_an_inference_ready_head_and_reports_its_progress_and_speed(monkeypatch):
    import types

    import vlrouter.core.fit as fit_mod
    from vlrouter.core.progress import RecordingProgress

    clock = iter([100.0, 100.25])  # the solver's start and end: a quarter of a second
    monkeypatch.setattr(fit_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    prog = RecordingProgress()
    head, stats = train_head(x, y, vx, vy, TrainSection(solver="lbfgs"), prog, num_labels=3, l2=0.1)
    assert not head.training  # like the adamw head: ready for head(x) without a mode switch
    assert prog.tasks == [("training head (lbfgs)", 1, 1)]  # the bar ends full
    assert stats["seconds"] == 0.25
    assert stats["samples_per_s"] == pytest.approx(stats["epochs_run"] * 60 / 0.25, abs=0.1)


def test_one_thread_restores_the_callers_thread_count_even_after_an_error():
    from vlrouter.core.fit import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a caller (the engine, a notebook) that uses several threads
    try:
        x, y = _blobs(n_per_class=(4, 4, 4))
        train_head(x, y, x, y, TrainSection(solver="lbfgs"), num_labels=3, l2=0.1)
        assert torch.get_num_threads() == 3  # training did not leave torch on one thread
        with pytest.raises(RuntimeError, match="boom"), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_lbfgs_reports_the_validation_loss_and_accuracy_of_the_head_it_returns():
    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    head, stats = train_head(x, y, vx, vy, TrainSection(solver="lbfgs"), num_labels=3, l2=0.1)
    m = evaluate(head, vx, vy, class_names=["a", "b", "c"])
    assert 0.3 < m["accuracy"] < 1.0  # overlapping blobs: some right, some wrong, so the number is telling
    assert stats["best_acc"] == pytest.approx(m["accuracy"]) and stats["best_loss"] == pytest.approx(m["nll"])


def test_lbfgs_runs_at_most_train_epochs_iterations_and_at_least_one():
    x, y = _blobs(spread=4.0)
    losses = []
    for epochs in (1, 3, 5):
        _, stats = train_head(x, y, x, y, TrainSection(solver="lbfgs", epochs=epochs), num_labels=3, l2=1e-4)
        assert 1 <= stats["steps"] <= epochs
        losses.append(stats["train_loss"])
    import math

    assert losses[0] < math.log(3) - 0.05  # even train.epochs: 1 fits the head (not the all-zero start)
    assert losses[0] > losses[1] > losses[2]  # far from converged: each extra iteration allowed is used


@pytest.mark.parametrize("folds,counts,used", [
    (None, (6, 6, 6), 5),  # the default: train.cv_folds' default, 5
    (2, (6, 6, 6), 2),  # train.cv_folds as configured
    (5, (10, 3, 10), 3),  # never more folds than the smallest class has samples
    (5, (10, 1, 10), 2),  # but always at least two
])
def test_choose_l2_cross_validates_over_the_configured_folds_capped_by_the_smallest_class(folds, counts, used):
    from vlrouter.core.fit import L2_GRID, choose_l2, cv_score, stratified_folds

    x, y = _blobs(n_per_class=counts, dim=4, spread=4.0)
    given = {} if folds is None else {"folds": folds, "seed": 1}  # the defaults: 5 folds, seed 0 (TrainSection's)
    _, scores = choose_l2(x, y, num_labels=3, **given)
    split = stratified_folds(y, used, seed=given.get("seed", 0))
    assert len(split) == used
    for s, value in [(scores[0], L2_GRID[0]), (scores[-1], L2_GRID[-1])]:
        acc, nll, _ = cv_score(x, y, split, num_labels=3, l2=value)
        assert (s["cv_acc"], s["cv_nll"]) == (round(acc, 4), round(nll, 4)), value


def test_a_one_step_run_is_still_evaluated_after_its_step_and_keeps_that_head():
    x, y = _blobs(n_per_class=(3, 3, 3))
    vx, vy = _blobs(n_per_class=(2, 2, 2), seed=1)
    head, stats = train_head(x, y, vx, vy, _opts(epochs=1, batch_size=64, eval_every=5, lr=0.5), num_labels=3)
    assert stats["steps"] == 1 and [h["step"] for h in stats["history"]] == [1]  # one batch, evaluated after it
    assert stats["best_step"] == 1 and stats["best_loss"] == pytest.approx(stats["history"][0]["val_loss"])
    assert evaluate(head, vx, vy, class_names=["a", "b", "c"])["nll"] == pytest.approx(stats["best_loss"], rel=1e-5)


def test_adamw_reports_its_progress_as_steps_of_every_epoch():
    from vlrouter.core.progress import RecordingProgress

    x, y = _blobs(n_per_class=(3, 3, 3))  # 9 samples in batches of 4: 3 steps an epoch
    prog = RecordingProgress()
    train_head(x, y, x, y, _opts(epochs=4, batch_size=4, eval_every=5, patience=100), prog, num_labels=3)
    assert prog.tasks == [("training head", 12, 12)]  # the bar's total is epochs x steps, and it ends full


def test_lbfgs_reports_as_its_work_the_passes_it_made_over_the_training_split(monkeypatch):
    """stats["epochs_run"] (lbfgs): loss-and-gradient evaluations, each one pass over every training sample."""
    from torch import nn

    from vlrouter.core.fit import fit_logistic

    x, y = _blobs(spread=4.0)
    passes = []
    real = nn.functional.cross_entropy
    monkeypatch.setattr(nn.functional, "cross_entropy", lambda z, *a, **kw: passes.append(len(z)) or real(z, *a, **kw))
    _, _, stats = fit_logistic(x, y, num_labels=3, l2=0.1, max_iter=4)
    assert passes and set(passes) == {60}
    assert stats["evaluations"] == len(passes) - 1  # the last call scores the result: not an optimisation step
    assert 1 <= stats["iterations"] <= 4


def test_adamw_scores_the_mlp_without_dropout_so_the_best_loss_is_the_returned_heads():
    x, y = _blobs(spread=4.0)
    vx, vy = _blobs(n_per_class=(6, 6, 6), seed=3, spread=4.0)
    head, stats = train_head(x, y, vx, vy, _opts(head="mlp", head_hidden=32, epochs=3), num_labels=3)
    m = evaluate(head, vx, vy, class_names=["a", "b", "c"])  # the returned head, in eval mode (dropout off)
    assert stats["best_loss"] == pytest.approx(m["nll"], rel=1e-5) and stats["best_acc"] == pytest.approx(m["accuracy"])


def test_tensorboard_logging_leaves_no_writer_thread_behind(tmp_path):
    import threading

    x, y = _blobs(n_per_class=(3, 3, 3))
    before = set(threading.enumerate())
    train_head(x, y, x, y, _opts(epochs=1), num_labels=3, log_dir=tmp_path / "tb")
    assert set(threading.enumerate()) - before == set()  # a loop of retrains must not pile up writer threads
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_adamw_sees_every_training_sample_exactly_once_an_epoch_in_batches_of_batch_size(monkeypatch):
    import vlrouter.core.fit as fit_mod

    seen = []
    real = fit_mod.build_head

    def recording(shape):
        head = real(shape)
        head[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
        return head

    monkeypatch.setattr(fit_mod, "build_head", recording)
    x, y = _blobs(n_per_class=(3, 3, 3))
    train_head(x, y, x, y, _opts(epochs=2, batch_size=4, eval_every=100, patience=100), num_labels=3)
    assert [len(b) for b in seen] == [4, 4, 1, 4, 4, 1]  # 9 samples: two full batches and the rest, each epoch
    for epoch in (seen[:3], seen[3:]):
        rows = torch.cat(epoch)
        assert len({tuple(r.tolist()) for r in rows}) == 9  # all nine (standardized) samples, none twice


def test_each_adamw_step_follows_the_gradient_of_its_own_batch_only(monkeypatch):
    """Gradients do not pile up across steps: the gradient each step applies is its batch loss's, at its weights."""
    import vlrouter.core.fit as fit_mod
    from vlrouter.core.head import standardize_stats

    steps = []  # [weight, bias, batch input, the gradient that step applied]
    real = fit_mod.build_head

    def recording(shape):
        head = real(shape)
        lin = head[1]
        lin.register_forward_pre_hook(lambda m, args: steps.append(
            [m.weight.detach().clone(), m.bias.detach().clone(), args[0].detach().clone()]) if m.training else None)
        lin.weight.register_post_accumulate_grad_hook(lambda p: steps[-1].append(p.grad.clone()))
        return head

    monkeypatch.setattr(fit_mod, "build_head", recording)
    x, y = _blobs(n_per_class=(4, 4, 4))
    train_head(x, y, x, y, _opts(epochs=3, batch_size=5, eval_every=100, patience=100, lr=0.1), num_labels=3)
    assert len(steps) == 9  # 12 samples in batches of 5: 3 steps an epoch
    mean, std = standardize_stats(x)
    standardized = (x - mean) / std
    for w, b, batch, applied in steps:
        labels = y[torch.cdist(batch, standardized).argmin(1)]  # which samples this batch held
        w = w.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(batch @ w.T + b, labels).backward()
        torch.testing.assert_close(applied, w.grad, rtol=1e-4, atol=1e-6)


def test_with_patience_1_the_learning_rate_halves_after_two_evaluations_without_a_relative_gain():
    """train.patience 1 stops at the first evaluation that is not lower; the plateau scheduler's patience is
    patience // 2 but at least 1, and it wants a 1e-4 relative gain: at a tiny learning rate the loss keeps
    falling (no early stop) too slowly for the scheduler, which halves the rate every second evaluation."""
    x, y = _blobs(n_per_class=(4, 4, 4))
    _, stats = train_head(x, y, x, y, _opts(epochs=8, batch_size=64, lr=1e-6, patience=1, eval_every=1),
                          num_labels=3)
    losses = [h["val_loss"] for h in stats["history"]]
    assert not stats["stopped_early"] and losses == sorted(losses, reverse=True)
    assert [h["lr"] for h in stats["history"]] == pytest.approx([1e-6] * 3 + [5e-7] * 2 + [2.5e-7] * 2 + [1.25e-7])


def test_patience_counts_evaluations_from_the_start_even_when_none_is_finite():
    x, y = _blobs(n_per_class=(3, 3, 3))
    vx, vy = _blobs(n_per_class=(2, 2, 2), seed=1)
    vx[0, 0] = float("nan")  # every validation loss is nan: no evaluation is ever an improvement
    _, stats = train_head(x, y, vx, vy, _opts(epochs=50, batch_size=64, patience=3, eval_every=1), num_labels=3)
    assert stats["stopped_early"] and stats["steps"] == 3 and len(stats["history"]) == 3


def test_an_evaluation_that_only_matches_the_best_loss_counts_toward_patience():
    x, y = _blobs(n_per_class=(3, 3, 3))
    # a learning rate too small to move the float32 loss: every evaluation ties the first
    _, stats = train_head(x, y, x, y, _opts(epochs=20, batch_size=64, lr=1e-12, patience=2, eval_every=1),
                          num_labels=3)
    losses = [h["val_loss"] for h in stats["history"]]
    assert losses == [losses[0]] * 3 and stats["stopped_early"] and (stats["best_step"], stats["steps"]) == (1, 3)
