"""Calibration and evaluation of a router head: temperature, ECE, per-class metrics, confusion plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.fit import as_labels, one_thread
from vlrouter.core.head import head_logits

if TYPE_CHECKING:
    import torch

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a tiny val split must not push T to 0 or infinity
PLOT_FILE = "confusion.png"


def calibrate_temperature(logits: torch.Tensor, labels) -> float:
    """The softmax temperature minimising validation NLL (grid over log T, then refined).

    Bounded to :data:`TEMPERATURE_RANGE`: on a small, perfectly separated val split the
    unbounded optimum is T -> 0, which would make every routing decision look certain.
    """
    import torch

    z = logits.double()
    y = as_labels(labels)
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    with one_thread():
        grid = [lo + (hi - lo) * i / 200 for i in range(201)]
        vals = [nll(g) for g in grid]
        i = min(range(len(grid)), key=lambda j: (vals[j], abs(grid[j])))
        a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        for _ in range(40):  # golden-section refinement inside the bracketing cell
            m1, m2 = a + (b - a) * 0.382, a + (b - a) * 0.618
            if nll(m1) <= nll(m2):
                b = m2
            else:
                a = m1
        best = (a + b) / 2
        if nll(best) > vals[i]:
            best = grid[i]
    return round(math.exp(best), 6)


def expected_calibration_error(probs: torch.Tensor, labels, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by count."""
    import torch

    y = as_labels(labels)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    conf = conf.double()
    for b in range(bins):
        sel = (conf > edges[b]) & (conf <= edges[b + 1]) if b else (conf >= edges[0]) & (conf <= edges[1])
        if sel.any():
            ece += float(sel.double().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def classification_metrics(pred, labels, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = true)."""
    import torch

    p, y = as_labels(pred), as_labels(labels)
    k = len(class_names)
    conf = torch.zeros(k, k, dtype=torch.long)
    for t, q in zip(y.tolist(), p.tolist()):
        conf[t, q] += 1
    per = {}
    for i, name in enumerate(class_names):
        tp = int(conf[i, i])
        pred_n, true_n = int(conf[:, i].sum()), int(conf[i].sum())
        prec = tp / pred_n if pred_n else 0.0
        rec = tp / true_n if true_n else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[name] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": true_n}
    n = int(y.numel())
    acc = float((p == y).float().mean()) if n else 0.0
    return {"n": n, "accuracy": acc, "per_class": per, "confusion": conf.tolist(), "class_names": list(class_names)}


def evaluate(head, feats: torch.Tensor, labels, *, class_names: list[str], temperature: float = 1.0) -> dict[str, Any]:
    """Metrics of ``head`` on ``feats``: accuracy, per-class P/R/F1, confusion, NLL and ECE
    before (T=1) and after temperature scaling."""
    import torch

    y = as_labels(labels)
    logits = head_logits(head, feats).double()
    out = classification_metrics(logits.argmax(1), y, class_names)
    if y.numel():
        out["nll"] = float(torch.nn.functional.cross_entropy(logits, y))
        out["nll_calibrated"] = float(torch.nn.functional.cross_entropy(logits / temperature, y))
        out["ece"] = expected_calibration_error(torch.softmax(logits, 1), y)
        out["ece_calibrated"] = expected_calibration_error(torch.softmax(logits / temperature, 1), y)
    out["temperature"] = temperature
    return out


def plot_confusion(metrics: dict[str, Any], path: str | Path, *, title: str = "router confusion matrix") -> Path:
    """Write the confusion matrix of :func:`evaluate`'s metrics as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = metrics["class_names"]
    conf = metrics["confusion"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2))
    try:
        im = ax.imshow(conf, cmap="Blues")
        ax.set_xticks(range(k), labels=names, rotation=35, ha="right")
        ax.set_yticks(range(k), labels=names)
        ax.set_xlabel("predicted adapter")
        ax.set_ylabel("true adapter")
        top = max((max(r) for r in conf), default=0)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(conf[i][j]), ha="center", va="center",
                        color="white" if conf[i][j] > top / 2 else "black")
        ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f} on {metrics['n']} samples")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def reliability_bins(probs: torch.Tensor, labels, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins: ``{lo, hi, n, confidence, accuracy}`` each (the reliability diagram's data)."""
    y = as_labels(labels)
    conf, pred = probs.double().max(1)
    correct = (pred == y).double()
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        n = int(sel.sum())
        out.append({"lo": lo, "hi": hi, "n": n, "confidence": float(conf[sel].mean()) if n else float("nan"),
                    "accuracy": float(correct[sel].mean()) if n else float("nan")})
    return out


def plot_reliability(bins: list[dict[str, float]], path: str | Path, *, title: str = "reliability") -> Path:
    """The reliability diagram as a PNG: accuracy per confidence bin against the diagonal."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    try:
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
        filled = [b for b in bins if b["n"]]
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in filled], [b["accuracy"] for b in filled],
               width=[b["hi"] - b["lo"] for b in filled], edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red",
                markersize=4, label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (after temperature)")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
