"""Choose the router's representation (views × layer) and L2 strength by k-fold cross-validation on train.

Every candidate is scored the same way: stratified ``k`` folds of the TRAINING split only
(the validation split measures the result and never takes part), features standardized
on each fold's training part, an L2-regularised logistic regression fitted by L-BFGS
(:func:`vlrouter.core.fit.fit_logistic`), accuracy and log-loss on the held-out fold. The
best candidate has the highest mean accuracy, then the lowest log-loss, then the fewest
dimensions; the L2 strength is then tuned the same way for it alone. All of it runs on
cached features: choosing never re-runs the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlrouter.core.fit import L2_GRID, as_labels, best_l2, cv_score, stratified_folds
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.views import VIEWS, Representation

if TYPE_CHECKING:
    import torch

# Single views, and the concatenations worth trying: what the screenshot shows (and where) + what was asked.
VIEW_SETS: tuple[tuple[str, ...], ...] = tuple((v,) for v in VIEWS) + (
    ("image-mean", "text-mean"),
    ("image-grid", "text-mean"),
    ("image-mean", "image-std", "text-mean"),
    ("image-grid", "image-std", "text-mean"),
    ("image-grid", "image-std", "text-mean", "last"),
    ("mean", "last"),
)
DEFAULT_L2 = 1e-2  # used while comparing representations; then tuned on the winner


@dataclass
class Selection:
    """The chosen representation and L2 strength, with every candidate's cross-validated score."""

    representation: Representation
    l2: float
    folds: int
    scores: list[dict[str, Any]] = field(default_factory=list)  # {views, layer, cv_acc, cv_nll, dims}
    l2_scores: list[dict[str, Any]] = field(default_factory=list)  # {l2, cv_acc, cv_nll}
    oof_logits: Any = None  # the chosen setting's out-of-fold logits on the training split (for calibration)

    def to_dict(self) -> dict[str, Any]:
        return {"views": list(self.representation.views), "layer": self.representation.layer, "l2": self.l2,
                "folds": self.folds, "candidates": self.scores, "l2_candidates": self.l2_scores}


def candidates(views: Sequence[str] | None, layers: Sequence[int]) -> list[Representation]:
    """Every representation to score: the explicit views (or :data:`VIEW_SETS`) at each of ``layers``."""
    sets = [tuple(views)] if views is not None else list(VIEW_SETS)
    return [Representation(s, layer) for layer in layers for s in sets]


def choose(train_views: dict[str, torch.Tensor], labels, cands: Sequence[Representation], *, num_labels: int,
           l2: float | None = None, folds: int = 5, seed: int = 0, weights: torch.Tensor | None = None,
           progress: Progress | None = None) -> Selection:
    """Score every candidate by CV on the training split; pick the best, then its L2 strength (unless given)."""
    y = as_labels(labels)
    smallest = int(min(y.bincount(minlength=num_labels)[y.unique()]))
    k = max(2, min(folds, smallest))
    fold_idx = stratified_folds(y, k, seed)
    prog = progress_or_null(progress)
    scores: list[dict[str, Any]] = []
    oof: dict[tuple[int, float], Any] = {}  # (candidate, l2) -> out-of-fold logits
    probe = l2 if l2 is not None else DEFAULT_L2
    top = 0
    if len(cands) > 1:
        with prog.task("choosing the representation (cross-validation)", total=len(cands)) as task:
            for i, rep in enumerate(cands):
                x = rep.features(train_views)
                acc, nll, oof[i, probe] = cv_score(x, y, fold_idx, num_labels=num_labels, l2=probe, weights=weights)
                scores.append({"views": list(rep.views), "layer": rep.layer, "dims": int(x.shape[1]),
                               "cv_acc": round(acc, 4), "cv_nll": round(nll, 4)})
                task.advance()
        top = min(range(len(cands)), key=lambda i: (-scores[i]["cv_acc"], scores[i]["cv_nll"], scores[i]["dims"]))
    best = cands[top]
    l2_scores: list[dict[str, Any]] = []
    if l2 is not None:
        chosen_l2 = float(l2)
    else:
        x = best.features(train_views)
        with prog.task("choosing the L2 strength (cross-validation)", total=len(L2_GRID)) as task:
            for value in L2_GRID:
                acc, nll, oof[top, value] = cv_score(x, y, fold_idx, num_labels=num_labels, l2=value, weights=weights)
                l2_scores.append({"l2": value, "cv_acc": round(acc, 4), "cv_nll": round(nll, 4)})
                task.advance()
        chosen_l2 = best_l2(l2_scores)
    prog.log(f"representation: {best.label}, l2 {chosen_l2:g} ({k}-fold CV on the training split)")
    return Selection(representation=best, l2=chosen_l2, folds=k, scores=scores, l2_scores=l2_scores,
                     oof_logits=oof.get((top, chosen_l2)))
