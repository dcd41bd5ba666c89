"""The eval gate: a candidate router goes live only if it is a router at all and no worse than the live one.

A candidate with non-finite numbers, or no better than chance on its validation samples,
is never promoted (not even with ``--force``). Otherwise it is compared with the live
router -- read once, scored on the *same* validation samples in its own representation --
and kept out when it scores lower (``--force`` overrides). The decision is written into the
candidate's router.json, then :func:`vlrouter.core.store.promote` swaps it in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.errors import CheckpointError, PromotionRefused, located
from vlrouter.core.fit import as_labels
from vlrouter.core.head import head_logits
from vlrouter.core.store import META_FILE, RouterMeta, check_router_location, load_router, promote


@dataclass
class GateDecision:
    promoted: bool
    message: str
    val_acc: float | None
    live_val_acc: float | None
    n_val: int | None


def live_accuracy(live_dir: str | Path, candidate: RouterMeta, val_views, val_labels) -> tuple[float | None, str]:
    """The live router's accuracy on the candidate's validation samples, read from ONE live version.

    ``val_views`` holds every view embedded for those samples (``{"view@layer": [N, H]}``),
    so a live router that reads another representation is scored on its own features.
    ``(None, why)`` when there is no live router, it does not load, or it is not comparable
    (other labels, features from another encoder, or views this run did not embed).
    """
    live = Path(live_dir)
    if not (live / META_FILE).is_file():
        return None, "no live router"
    try:
        head, meta = load_router(live)
    except CheckpointError:
        return None, "the live router does not load"
    if list(meta.adapters) != list(candidate.adapters):
        return None, f"the live router has other labels ({', '.join(meta.adapters)})"
    if meta.encoder_fingerprint != candidate.encoder_fingerprint:
        return None, "the live router used another encoder"
    if val_views is None or val_labels is None:
        return None, "no validation features to compare on"
    rep = meta.model_copy(update={"num_layers": meta.num_layers or candidate.num_layers}).representation()
    if any(k not in val_views for k in rep.keys):
        return None, f"the live router reads {rep.label}, which this run did not embed"
    try:
        feats = rep.features(val_views)
        acc = float((head_logits(head, feats).argmax(1) == as_labels(val_labels)).float().mean())
    except RuntimeError:
        return None, "the live router does not fit these features"
    return acc, ""


def balanced_accuracy(head, val_feats, val_labels) -> tuple[float, int]:
    """``(mean per-class recall, classes present)`` of ``head`` on the validation samples.

    Chance is ``1 / classes``: a head that answers one adapter for everything (or guesses)
    scores exactly that, however imbalanced the validation split is.
    """
    import torch

    y = as_labels(val_labels)
    pred = head_logits(head, val_feats).argmax(1)
    classes = torch.unique(y)
    recalls = [float((pred[y == c] == c).float().mean()) for c in classes]
    return sum(recalls) / len(recalls), len(recalls)


def _refuse(cand: Path, problem: str, fix: str, val_acc=None, live_acc=None) -> PromotionRefused:
    err = PromotionRefused(located(cand, None, problem, fix=fix))
    err.candidate_dir, err.val_acc, err.live_val_acc = str(cand), val_acc, live_acc
    return err


def check_candidate(cand: Path, meta: RouterMeta, head=None, val_feats=None, val_labels=None) -> None:
    """Refuse (even with ``--force``) a candidate that is not a router at all: non-finite numbers, or no
    better than chance on its validation samples -- e.g. a head trained with ``lr: 1e3`` that answers one
    adapter for everything. Measured with the candidate's head on its validation features when given
    (balanced accuracy vs ``1 / classes``), else from router.json's metrics."""
    val_acc, best_loss = meta.metrics.get("val_acc"), meta.best_loss
    fix = "check train.lr and the other train: settings, and the training data; then retrain"
    for name, v in {"val_acc": val_acc, "best_loss": best_loss}.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise _refuse(cand, f"{name} is {v!r}: training diverged; not promoted (not even with --force)", fix,
                          val_acc)
    if head is not None and val_feats is not None and val_labels is not None and len(val_labels):
        score, classes = balanced_accuracy(head, val_feats, val_labels)
        what, n = "balanced accuracy (mean recall per adapter)", len(val_labels)
    else:
        per = meta.metrics.get("per_class") or {}
        recalls = [c.get("recall") for c in per.values() if isinstance(c, dict) and c.get("support")]
        if recalls and all(isinstance(r, (int, float)) for r in recalls):
            score, classes, what = sum(recalls) / len(recalls), len(recalls), "balanced accuracy"
        elif isinstance(val_acc, (int, float)):
            score, classes, what = val_acc, len(meta.adapters), "validation accuracy"
        else:
            raise _refuse(cand, "router.json has no validation accuracy; not promoted", fix)
        n = meta.metrics.get("n_val")
    chance = 1.0 / max(1, classes)
    if not score > chance + 1e-9:
        raise _refuse(cand, f"new router's {what} {score:.3f} does not beat chance {chance:.3f} on {n} validation "
                      "samples (it answers no better than one adapter for everything); not promoted (not even "
                      "with --force)", fix + " (more samples per adapter help)", val_acc)


def promote_with_gate(candidate_dir: str | Path, live_dir: str | Path, *, val_views=None, val_labels=None,
                      force: bool = False, stamp: dict[str, Any] | None = None) -> GateDecision:
    """Promote the candidate unless it scored below the live router on the same validation samples.

    First :func:`check_candidate`: a candidate with non-finite numbers or no better than
    chance is never promoted. The live router is read once (:func:`live_accuracy`). Below
    it and not ``force``: :class:`PromotionRefused` with both numbers; the live router is
    left untouched and the candidate stays in its version folder. ``stamp`` holds
    router.json fields recorded on this machine before promotion (``base_model``,
    ``model_fingerprint``: what the engine here will compare against).
    """
    cand, live = Path(candidate_dir), Path(live_dir)
    check_router_location(live)
    head, meta = load_router(cand)  # whole and finite, or CheckpointError
    if stamp:
        meta = meta.model_copy(update=stamp)
    rep = meta.representation()
    own = rep.features(val_views) if val_views is not None and all(k in val_views for k in rep.keys) else None
    check_candidate(cand, meta, head, own, val_labels)
    val_acc = meta.metrics.get("val_acc")
    n_val = meta.metrics.get("n_val")
    live_acc, note = live_accuracy(live, meta, val_views, val_labels)

    def fmt(a: float | None) -> str:
        return f"{a:.3f}" if isinstance(a, (int, float)) else "n/a"

    same = f"on the same {n_val} validation samples"
    if live_acc is not None and val_acc is not None and val_acc < live_acc:
        if not force:
            raise _refuse(cand, f"new router {fmt(val_acc)} < live {fmt(live_acc)} {same}; kept the live router, "
                          "the candidate stays here", "--force to promote anyway", val_acc, live_acc)
        msg = f"promoted by --force: new {fmt(val_acc)} < live {fmt(live_acc)} {same}"
    elif live_acc is not None:
        msg = f"promoted: new {fmt(val_acc)} >= live {fmt(live_acc)} {same}"
    else:
        msg = f"promoted: val acc {fmt(val_acc)} ({note})"
    _record_gate(cand, meta, live_acc, msg)
    promote(cand, live)
    return GateDecision(True, msg, val_acc, live_acc, n_val)


def _record_gate(cand: Path, meta: RouterMeta, live_acc: float | None, message: str) -> None:
    """Write the gate's decision into the candidate's router.json (atomically, before it goes live)."""
    metrics = {**meta.metrics, "gate": message}
    if live_acc is not None:
        metrics["live_val_acc"] = live_acc
    data = meta.model_copy(update={"metrics": metrics}).model_dump(mode="json")
    atomic_write_bytes(cand / META_FILE, (json.dumps(data, indent=2) + "\n").encode())
