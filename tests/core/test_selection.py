"""Choosing the representation and L2 strength by cross-validation on the training split."""

from __future__ import annotations

import torch

from tests.helpers import blobs
from vlrouter.core.fit import L2_GRID, cv_score, stratified_folds
from vlrouter.core.selection import VIEW_SETS, candidates, choose
from vlrouter.core.views import Representation


def _views(n_per_class=(12, 12, 12)):
    """``mean@1`` separates the classes, ``last@1`` is noise, ``mean@2`` separates them less cleanly."""
    x, y = blobs(n_per_class, dim=6, seed=0)
    g = torch.Generator().manual_seed(1)
    return {"mean@1": x, "last@1": torch.randn(len(y), 6, generator=g),
            "mean@2": x + 6 * torch.randn(len(y), 6, generator=g)}, y


def test_candidates_are_every_view_set_or_the_given_views_at_each_layer():
    assert candidates(["mean", "last"], [1, 3]) == [Representation(("mean", "last"), 1),
                                                    Representation(("mean", "last"), 3)]
    auto = candidates(None, [2])
    assert [c.views for c in auto] == list(VIEW_SETS) and {c.layer for c in auto} == {2}


def test_the_most_accurate_representation_wins_then_its_l2_is_tuned():
    views, y = _views()
    cands = [Representation(("last",), 1), Representation(("mean",), 2), Representation(("mean",), 1)]
    sel = choose(views, y, cands, num_labels=3, folds=4)
    assert sel.representation == Representation(("mean",), 1)
    assert [(s["views"], s["layer"], s["dims"]) for s in sel.scores] == [(["last"], 1, 6), (["mean"], 2, 6),
                                                                         (["mean"], 1, 6)]
    assert sel.scores[2]["cv_acc"] > sel.scores[1]["cv_acc"] > sel.scores[0]["cv_acc"]
    assert [s["l2"] for s in sel.l2_scores] == list(L2_GRID) and sel.folds == 4
    best = min(sel.l2_scores, key=lambda s: (-s["cv_acc"], s["cv_nll"], -s["l2"]))
    assert sel.l2 == best["l2"]
    # the out-of-fold logits are the chosen setting's, on the same folds
    _, _, oof = cv_score(views["mean@1"], y, stratified_folds(y, 4, 0), num_labels=3, l2=sel.l2)
    torch.testing.assert_close(sel.oof_logits, oof)
    d = sel.to_dict()
    assert (d["views"], d["layer"], d["l2"], d["folds"]) == (["mean"], 1, sel.l2, 4) and d["candidates"] == sel.scores


def test_equal_scores_pick_the_fewest_dimensions():
    views, y = _views()
    flat = {"mean@1": views["mean@1"], "last@1": torch.zeros(len(y), 6)}  # a view that adds nothing
    cands = [Representation(("mean", "last"), 1), Representation(("mean",), 1), Representation(("last",), 1)]
    sel = choose(flat, y, cands, num_labels=3, l2=0.1)
    assert sel.scores[0]["cv_acc"] == sel.scores[1]["cv_acc"] and sel.scores[0]["cv_nll"] == sel.scores[1]["cv_nll"]
    assert sel.representation == Representation(("mean",), 1)  # as good, half the width


def test_a_given_l2_is_kept_and_the_folds_never_outnumber_the_smallest_class():
    views, y = _views((3, 9, 9))
    sel = choose(views, y, [Representation(("mean",), 1), Representation(("last",), 1)], num_labels=3, l2=0.5,
                 folds=5)
    assert sel.l2 == 0.5 and sel.l2_scores == [] and sel.folds == 3
    assert sel.oof_logits.shape == (21, 3)
    one = choose(views, y, [Representation(("mean",), 1)], num_labels=3, l2=0.5)  # nothing to compare
    assert one.scores == [] and one.representation == Representation(("mean",), 1)
    tiny = choose(*_views((1, 4, 4)), [Representation(("mean",), 1)], num_labels=3, l2=0.5)
    assert tiny.folds == 2  # at least two folds, even with a class of one sample


def test_representations_are_compared_at_the_default_l2_and_their_reported_scores_reproduce():
    # the scores router.json reports for each candidate are 4-fold CV at l2 0.01 (a moderate strength, in L2_GRID)
    views, y = _views()
    cands = [Representation(("mean",), 2), Representation(("mean",), 1)]
    sel = choose(views, y, cands, num_labels=3, folds=4)
    folds = stratified_folds(y, 4, 0)
    for s, rep in zip(sel.scores, cands):
        acc, nll, _ = cv_score(rep.features(views), y, folds, num_labels=3, l2=1e-2)
        assert (s["cv_acc"], s["cv_nll"]) == (round(acc, 4), round(nll, 4))
