"""Head training refuses inputs it cannot learn from, naming the split and the fix (any trainer)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import blobs
from vlrouter.core.errors import TrainingError
from vlrouter.core.fit import train_head
from vlrouter.core.registry import TrainSection

OPTS = TrainSection(epochs=2, batch_size=8, lr=0.01, patience=2, eval_every=5, seed=0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_split_is_named(split):
    x, y = blobs()
    empty = (torch.zeros(0, x.shape[1]), torch.zeros(0, dtype=torch.long))
    args = (*empty, x, y) if split == "train" else (x, y, *empty)
    with pytest.raises(TrainingError, match=f"no {'training' if split == 'train' else 'validation'} features"):
        train_head(*args, OPTS, num_labels=3)


def test_a_label_without_training_samples_is_named():
    x, y = blobs(n_per_class=(10, 10, 10))
    keep = y != 1
    with pytest.raises(TrainingError, match="no training samples for b"):
        train_head(x[keep], y[keep], x, y, OPTS, num_labels=3, class_names=["a", "b", "c"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_label_equal_to_the_label_count_is_refused(split):
    x, y = blobs(n_per_class=(10, 10, 10))
    bad = y.clone()
    bad[0] = 3  # num_labels=3: valid labels are 0, 1, 2
    args = (x, bad, x, y) if split == "train" else (x, y, x, bad)
    for solver in ("adamw", "lbfgs"):
        with pytest.raises(TrainingError, match=r"labels must lie in 0\.\.2"):
            train_head(*args, OPTS.model_copy(update={"solver": solver}), num_labels=3, l2=0.1)


@pytest.mark.parametrize("case", ["train-rows", "val-rows", "feature-width"])
def test_features_and_labels_that_disagree_in_shape_are_refused_with_the_fix(case):
    x, y = blobs(n_per_class=(4, 4, 4))
    vx, vy = x.clone(), y.clone()
    if case == "train-rows":
        y = y[:-1]
    elif case == "val-rows":
        vx = vx[:-2]
    else:
        vx = vx[:, :-1]
    for solver in ("adamw", "lbfgs"):
        with pytest.raises(TrainingError, match=r"features: feature/label shapes disagree: train .*"
                                                r"\(fix: rebuild the routing dataset with `router build-dataset`\)"):
            train_head(x, y, vx, vy, OPTS.model_copy(update={"solver": solver}), num_labels=3, l2=0.1)


def test_features_that_are_not_a_matrix_are_refused_as_missing():
    x, y = blobs(n_per_class=(4, 4))
    with pytest.raises(TrainingError, match="train split: no training features"):
        train_head(x[:, 0], y, x, y, OPTS, num_labels=2)
    with pytest.raises(TrainingError, match="val split: no validation features"):
        train_head(x, y, x[:, 0], y, OPTS, num_labels=2)


def test_a_single_label_is_refused_naming_the_fix():
    x, y = blobs(n_per_class=(6,))
    with pytest.raises(TrainingError, match=r"labels: a router needs at least two labels \(fix: register another"):
        train_head(x, y, x, y, OPTS)  # the label count, inferred from the labels: 1


def test_lbfgs_refuses_the_mlp_head_and_names_the_solver_that_trains_it():
    x, y = blobs(n_per_class=(4, 4))
    with pytest.raises(TrainingError, match=r"train.solver: lbfgs fits the linear head only "
                                            r"\(fix: use train.solver: adamw with train.head: mlp\)"):
        train_head(x, y, x, y, OPTS.model_copy(update={"solver": "lbfgs", "head": "mlp"}), num_labels=2, l2=0.1)


def test_solver_auto_is_lbfgs_unless_the_head_or_a_minibatch_setting_asks_for_adamw():
    from vlrouter.core.fit import resolve_solver

    assert resolve_solver("mlp", "lbfgs", set())[0] == "lbfgs"  # an explicit choice stands (train_head refuses it)
    assert resolve_solver("linear", "adamw", set()) == ("adamw", "train.solver: adamw")
    assert resolve_solver("mlp", "auto", set())[0] == "adamw"
    assert resolve_solver("linear", "auto", {"seed", "epochs"})[0] == "lbfgs"
    solver, why = resolve_solver("linear", "auto", {"eval_every", "batch_size", "seed"})
    assert solver == "adamw" and why.startswith("--batch-size, --eval-every given")  # in MINIBATCH_SETTINGS' order
