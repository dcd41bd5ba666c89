"""What a trained head is: the best evaluation's weights, standardized with the training statistics, and
the same head again after save + load.

Written against behaviour any correct trainer has (gradient descent with early stopping or a closed-form
solver): the head returned reproduces the validation loss and accuracy the trainer reports; its
standardization statistics are the training features' (never the validation ones); a saved and reloaded
head gives the same logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import blobs
from vlrouter.core.fit import train_head
from vlrouter.core.head import HeadShape, head_logits
from vlrouter.core.metrics import evaluate
from vlrouter.core.registry import TrainSection
from vlrouter.core.store import RouterMeta, load_router, save_router

NAMES = ["calendar", "claim-window", "provider-select"]


def _features():
    """Overlapping classes whose features sit far from zero and unit scale (like LLM hidden states), so the
    standardization matters; the validation split drifts a little from the training split."""
    x, y = blobs(n_per_class=(40, 40, 40), dim=16, seed=3, spread=5.0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm] * 7.0 + 40.0, y[perm]
    tx, ty, vx, vy = x[:90], y[:90], x[90:], y[90:]
    vx = vx + torch.linspace(-3.0, 3.0, vx.shape[1])  # drift: val statistics differ from train statistics
    return tx, ty, vx, vy


def _train(**kw):
    tx, ty, vx, vy = _features()
    opts = TrainSection(**{"epochs": 200, "batch_size": 8, "lr": 0.05, "patience": 3, "eval_every": 1, "seed": 0,
                           **kw})
    head, stats = train_head(tx, ty, vx, vy, opts, num_labels=3, class_names=NAMES)
    return head, stats, (tx, ty, vx, vy)


@pytest.fixture(scope="module")
def trained():
    return _train()


def test_returned_head_reproduces_the_reported_best_validation_loss_and_accuracy(trained):
    head, stats, (_, _, vx, vy) = trained
    m = evaluate(head, vx, vy, class_names=NAMES)
    assert m["nll"] == pytest.approx(stats["best_loss"], rel=1e-5, abs=1e-6)
    assert m["accuracy"] == pytest.approx(stats["best_acc"], abs=1e-9)


def test_standardization_uses_the_training_statistics(trained):
    head, _, (tx, _, vx, _) = trained
    stored = [t for t in head.state_dict().values() if t.shape == (tx.shape[1],)]

    def holds(ref):
        return any(torch.allclose(t, ref, rtol=1e-5, atol=1e-4) for t in stored)

    assert holds(tx.mean(0)) and holds(tx.std(0)), "the head's state must hold the training mean and std"
    assert not holds(vx.mean(0)) and not holds(vx.std(0))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_saved_and_reloaded_head_gives_the_same_logits_and_best_evaluation(tmp_path, kind):
    head, stats, (_, _, vx, vy) = _train(head=kind, head_hidden=32) if kind == "mlp" else _train()
    shape = HeadShape(kind=kind, in_dim=vx.shape[1], hidden=32 if kind == "mlp" else 0, num_labels=3)
    meta = RouterMeta(adapters=NAMES, base_model="Qwen/Qwen3-VL-8B-Instruct", pooling="mean", layer=-1,
                      hidden_size=vx.shape[1], head=shape, best_loss=stats["best_loss"], best_acc=stats["best_acc"])
    save_router(tmp_path / "router", head, meta)
    loaded, loaded_meta = load_router(tmp_path / "router")
    torch.testing.assert_close(head_logits(loaded, vx), head_logits(head, vx), rtol=1e-6, atol=1e-6)
    m = evaluate(loaded, vx, vy, class_names=NAMES)
    assert m["nll"] == pytest.approx(loaded_meta.best_loss, rel=1e-5, abs=1e-6)
    assert m["accuracy"] == pytest.approx(loaded_meta.best_acc, abs=1e-9)


def test_training_does_not_depend_on_the_features_scale_or_offset():
    """Standardization at work: hidden states with huge activations train the same router as small ones."""
    head, stats, (tx, ty, vx, vy) = _train()
    opts = TrainSection(epochs=200, batch_size=8, lr=0.05, patience=3, eval_every=1, seed=0)
    big, big_stats = train_head(tx * 1000.0 - 300.0, ty, vx * 1000.0 - 300.0, vy, opts, num_labels=3)
    assert big_stats["best_loss"] == pytest.approx(stats["best_loss"], rel=1e-3)
    assert big_stats["best_acc"] == pytest.approx(stats["best_acc"], abs=1e-9)
    assert torch.equal(head_logits(big, vx * 1000.0 - 300.0).argmax(1), head_logits(head, vx).argmax(1))


def test_a_head_shape_no_router_can_have_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="in_dim"):
        HeadShape(in_dim=0, num_labels=2)  # a head over zero features
    with pytest.raises(ValidationError, match="an mlp head needs hidden >= 1"):
        HeadShape(kind="mlp", in_dim=4, num_labels=2)  # router.json saying mlp without a hidden size
    linear = HeadShape(in_dim=1, num_labels=2)
    assert linear.kind == "linear" and linear.model_dump()["hidden"] == 0  # what router.json records


def test_standardization_statistics_of_a_single_sample_are_per_feature():
    from vlrouter.core.head import standardize_stats

    x = torch.tensor([[3.0, -1.0, 5.0, 0.5]])
    mean, std = standardize_stats(x)
    assert mean.tolist() == [3.0, -1.0, 5.0, 0.5]
    assert std.tolist() == [1.0, 1.0, 1.0, 1.0]  # one value per feature: no spread to divide by, so 1
    mean, std = standardize_stats(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert mean.tolist() == [2.0, 0.0] and std.tolist() == pytest.approx([2 ** 0.5, 1e-6])


def test_a_head_of_exactly_100_million_parameters_is_allowed_and_one_more_is_refused():
    from pydantic import ValidationError

    from vlrouter.core.head import head_param_shapes

    def params(shape: HeadShape) -> int:
        return sum(torch.Size(s).numel() for s in head_param_shapes(shape).values())

    at_limit = HeadShape(in_dim=84_245, num_labels=1185)  # 2 x 84,245 standardizer + 1185 x 84,246 linear
    assert params(at_limit) == 100_000_000
    assert params(HeadShape(kind="mlp", in_dim=101_828, hidden=980, num_labels=4)) == 100_000_000
    with pytest.raises(ValidationError, match="a head of 100,000,001 parameters is over the limit of 100,000,000"):
        HeadShape(kind="mlp", in_dim=130_686, hidden=763, num_labels=32)


@pytest.mark.parametrize("field,limit", [("in_dim", 131_072), ("hidden", 65_536), ("num_labels", 10_000)])
def test_each_head_dimension_is_allowed_up_to_its_limit_and_refused_one_over(field, limit):
    from pydantic import ValidationError

    small = {"kind": "mlp", "in_dim": 1, "hidden": 1, "num_labels": 1}
    assert getattr(HeadShape(**{**small, field: limit}), field) == limit
    with pytest.raises(ValidationError, match=field):
        HeadShape(**{**small, field: limit + 1})
    with pytest.raises(ValidationError, match=field):
        HeadShape(**{**small, field: 0 if field != "hidden" else -1})  # never less than one feature, label, unit


def test_head_logits_are_the_eval_mode_output_whatever_mode_the_head_was_in():
    from vlrouter.core.head import build_head

    torch.manual_seed(0)
    head = build_head(HeadShape(kind="mlp", in_dim=8, hidden=64, num_labels=3))  # dropout 0.1 when training
    x = torch.randn(16, 8)
    head.train()
    first = head_logits(head, x)
    assert not head.training and not first.requires_grad
    head.train()
    assert torch.equal(head_logits(head, x), first)  # no dropout: the same logits every time
