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
