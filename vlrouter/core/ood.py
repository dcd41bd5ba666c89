"""Out-of-distribution scores: how unlike every adapter's training data an input is.

Softmax confidence says nothing about inputs unlike anything seen in training (a blank
screenshot can get 0.99 for some adapter). Two distances are measured instead, each in
units of its spread over the (in-distribution) validation split, and the larger counts:

* **distance to the data** -- in the head's standardized input space, the squared
  Mahalanobis distance to the nearest class mean under one shared covariance, estimated
  from the training residuals and shrunk towards a scaled identity (Ledoit-Wolf). With
  ``D`` dimensions and ``N`` samples (often ``D > N``) the covariance is kept as a
  low-rank basis plus the identity, so it costs ``O(D·r)``::

      Σ = (1 - α) S + α·μ·I,  S = V diag(s) V^T (rank r ≤ N),  μ = tr(S)/D
      d(x) = min_c |z|² / (α μ) - Σ_k w_k (v_k·z)²,  z = x - m_c,  w_k = (1-α)s_k / (α μ ((1-α)s_k + α μ))

  ``z_far = (log d(x) - mean) / sd`` (one-sided: only "farther than usual" is odd);
* **screen content** (only without the layout below, which supersedes it) -- how varied the
  screenshot's tokens are (the total variance of the image tokens at the router's layer,
  the squared norm of the ``image-std`` view), two-sided: a blank or near-uniform
  screenshot is as unlike a GUI as pure noise is. ``z_content = |log v(x) - mean| / sd``;
* **screen layout** -- the distance from the screenshot's edge layout
  (:mod:`vlrouter.core.layout`, unit vectors) to the nearest training screenshot's, one-sided:
  an unseen *kind* of screen (a list of toggles when the adapters know month grids, forms
  and provider lists) in a familiar colour scheme. Pooled hidden states mostly see colours
  and words; this sees structure, and a blank screen (no edges) or noise (edges
  everywhere) as well. At most :data:`MAX_LAYOUTS` training layouts are kept (a seeded,
  per-adapter even draw). ``z_layout = (d(x) - mean) / sd``.

``ood_score = sqrt(Σ max(z, 0)²)`` over the distances measured: how far, in spreads, an input
lies beyond typical on every count together (0 when it is typical on all; evidence adds
up, so an unseen screen that is a little odd in features *and* clearly odd in layout
scores above an in-distribution one that is odd on one count). Leaving one demo task out,
the two-sided content score only added noise once the layout was there (the unseen
task's AUROC 0.950 with it, 0.968 without, blank and noise 1.0 either way). The threshold
is the validation split's ``quantile`` (default 95 %) score, so about 95 % of
in-distribution inputs are ``known``.
Routers saved before the layout view keep their own rule, the largest z (``combine: max``
in router.json's ``ood``), so their thresholds mean what they meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlrouter.core.errors import CheckpointError, located
from vlrouter.core.views import LAYOUT

if TYPE_CHECKING:
    import torch

MAX_RANK = 256  # covariance directions kept (the rest count as isotropic)
MAX_LAYOUTS = 16384  # training layouts kept for the nearest-layout distance (fp16: 16 MiB at most)
QUANTILE = 0.95
TENSORS = ("ood.means", "ood.basis", "ood.weights")
LAYOUTS = "ood.layouts"  # optional: routers trained before the layout view have none


@dataclass
class OODModel:
    """Class means, the covariance's low-rank part, the isotropic scale, the validation spreads and the threshold."""

    means: torch.Tensor  # [C, D]
    basis: torch.Tensor  # [D, r]
    weights: torch.Tensor  # [r]
    iso: float  # α·μ, the isotropic variance
    threshold: float = float("inf")
    quantile: float = QUANTILE
    shrinkage: float = 0.0
    far: tuple[float, float] = (0.0, 1.0)  # mean and sd of log distance over validation
    content: tuple[float, float] | None = None  # mean and sd of log token variance (None: not measured)
    layouts: torch.Tensor | None = None  # [M, LAYOUT_DIM] training layouts (None: no layout distance)
    layout: tuple[float, float] | None = None  # mean and sd of the nearest-layout distance over validation
    combine: str = "norm"  # "norm": sqrt(Σ max(z, 0)²); "max": the largest z (routers saved before the layout view)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-class squared Mahalanobis distance / D of standardized features ``x [N, D]`` (float64)."""
        xd = x.double()
        best = None
        for m in self.means.double():
            z = xd - m
            d = (z * z).sum(1) / self.iso - ((z @ self.basis.double()) ** 2 * self.weights.double()).sum(1)
            best = d if best is None else best.minimum(d)
        return best.clamp_min(1e-12) / x.shape[1]

    @property
    def screen_views(self) -> tuple[str, ...]:
        """The screenshot views :meth:`score` reads besides the head's features: ``image-std`` (content) and/or
        ``layout``, as fitted (the engine computes no others)."""
        return (("image-std",) if self.content is not None else ()) + \
            ((LAYOUT,) if self.layout is not None and self.layouts is not None else ())

    def layout_distance(self, layout: torch.Tensor) -> torch.Tensor:
        """Euclidean distance from each layout ``[N, LAYOUT_DIM]`` to the nearest kept training layout."""
        import torch

        # queries rounded as the bank is (float16), compared in float64: a training screenshot is at distance 0
        bank = self.layouts.double()
        q = layout.half().double()
        return torch.cat([torch.cdist(q[i:i + 256], bank).amin(1) for i in range(0, len(q), 256)]) \
            if len(q) else torch.zeros(0)

    def score(self, x: torch.Tensor, content: torch.Tensor | None = None,
              layout: torch.Tensor | None = None) -> torch.Tensor:
        """``ood_score`` of standardized features ``x [N, D]``, the image tokens' ``image-std`` view and the
        screenshots' ``layout`` view (each left out when not given or not fitted)."""
        import torch

        parts = [(self.distance(x).log() - self.far[0]) / self.far[1]]
        if self.content is not None and content is not None:
            parts.append(((_log_variance(content) - self.content[0]) / self.content[1]).abs())
        if self.layout is not None and self.layouts is not None and layout is not None:
            parts.append((self.layout_distance(layout).double() - self.layout[0]) / self.layout[1])
        if self.combine == "max":
            return torch.stack(parts).amax(0)
        return torch.stack(parts).clamp_min(0).square().sum(0).sqrt()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(zip(TENSORS, (self.means.float(), self.basis.float(), self.weights.float())))
        if self.layouts is not None:
            out[LAYOUTS] = self.layouts.half()
        return out

    def meta(self) -> dict[str, Any]:
        return {"method": "+".join(("mahalanobis-shrunk", *("content" if v == "image-std" else v
                                                           for v in self.screen_views))), "threshold": self.threshold,
                "quantile": self.quantile, "iso": self.iso, "shrinkage": self.shrinkage,
                "rank": int(self.basis.shape[1]), "far": list(self.far),
                "content": list(self.content) if self.content is not None else None,
                "layout": list(self.layout) if self.layout is not None else None, "combine": self.combine}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: Any = None) -> OODModel:
        missing = [t for t in TENSORS if t not in tensors]
        if missing or not isinstance(meta, dict) or "threshold" not in meta or "iso" not in meta:
            raise CheckpointError(located(where, "ood", f"the OOD statistics are incomplete (missing "
                                          f"{missing or 'meta'})",
                                          fix="retrain with `router retrain`, or set router.ood: off"))
        content, layout = meta.get("content"), meta.get("layout")
        return cls(means=tensors["ood.means"], basis=tensors["ood.basis"], weights=tensors["ood.weights"],
                   iso=float(meta["iso"]), threshold=float(meta["threshold"]),
                   quantile=float(meta.get("quantile", QUANTILE)), shrinkage=float(meta.get("shrinkage", 0.0)),
                   far=tuple(meta.get("far", (0.0, 1.0))), content=tuple(content) if content else None,
                   layouts=tensors.get(LAYOUTS), layout=tuple(layout) if layout else None,
                   combine=meta.get("combine", "max"))


def _log_variance(image_std: torch.Tensor) -> torch.Tensor:
    """log of the image tokens' total variance, from the ``image-std`` view ``[N, H]``."""
    return (image_std.double() ** 2).sum(1).clamp_min(1e-30).log()


def _ledoit_wolf(r: torch.Tensor, gram: torch.Tensor) -> float:
    """Ledoit-Wolf shrinkage intensity for the covariance of residuals ``r [N, D]`` (from their Gram matrix)."""
    n, d = r.shape
    mu = float(gram.trace()) / (n * d)
    s_fro2 = float((gram * gram).sum()) / n ** 2  # |S|_F^2
    delta2 = s_fro2 - 2 * mu * float(gram.trace()) / n + mu * mu * d  # |S - mu I|_F^2
    norms = gram.diagonal()
    beta2 = float((norms * norms).sum()) / n ** 2 - s_fro2 / n  # (1/n^2) sum |r r^T - S|_F^2
    if delta2 <= 0:
        return 1.0
    return min(1.0, max(0.0, beta2 / delta2))


def keep_layouts(layouts: torch.Tensor, labels, num_labels: int, limit: int = MAX_LAYOUTS,
                 seed: int = 0) -> torch.Tensor:
    """At most ``limit`` distinct training layouts: all when they fit, else an even, seeded draw per adapter."""
    import torch

    y = torch.as_tensor(labels, dtype=torch.long)
    layouts, first = _distinct_rows(layouts.float())
    y = y[first]
    if len(layouts) <= limit:
        return layouts
    g = torch.Generator().manual_seed(seed)
    rank = torch.empty(len(y), dtype=torch.long)  # each layout's place in a shuffled order of its adapter's
    for c in range(num_labels):
        idx = torch.nonzero(y == c).flatten()
        rank[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx))
    order = torch.argsort(rank * num_labels + y)  # round robin over adapters: small ones keep all they have
    return layouts[order[:limit].sort().values]


def _distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ``x`` (first occurrences, in order) and their indices."""
    import torch

    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if len(x) else 0,), len(x), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(x)), reduce="amin")
    first = first.sort().values
    return x[first], first


def fit_ood(x: torch.Tensor, labels, num_labels: int, layouts: torch.Tensor | None = None) -> OODModel:
    """Fit class means and the shrunk shared covariance on standardized training features ``x [N, D]``, and keep
    the training screenshots' ``layouts`` (when given) for the nearest-layout distance."""
    import torch

    xd = x.double()
    y = torch.as_tensor(labels, dtype=torch.long)
    means = torch.stack([xd[y == c].mean(0) for c in range(num_labels)])
    r = xd - means[y]
    n, d = r.shape
    gram = r @ r.T
    alpha = _ledoit_wolf(r, gram)
    mu = float(gram.trace()) / (n * d)
    evals, evecs = torch.linalg.eigh(gram / n)  # the nonzero eigenvalues of S = r^T r / n
    order = evals.argsort(descending=True)[:MAX_RANK]
    evals, evecs = evals[order], evecs[:, order]
    keep = evals > 1e-10 * max(float(evals.max()), 1e-30)
    evals, evecs = evals[keep], evecs[:, keep]
    basis = (r.T @ evecs) / torch.sqrt(evals * n)  # orthonormal directions in feature space [D, r]
    iso = max(alpha * mu, 1e-12)
    s = (1 - alpha) * evals
    weights = s / (iso * (s + iso))
    # kept in float16 from the start, as router.json's head.safetensors stores them: scores do not move on a reload
    kept = keep_layouts(layouts, y, num_labels).half() if layouts is not None and len(layouts) else None
    return OODModel(means=means.float(), basis=basis.float(), weights=weights.float(), iso=iso, shrinkage=alpha,
                    layouts=kept)


def _spread(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), max(float(v.std()) if len(v) > 1 else 1.0, 1e-6)


def calibrate(model: OODModel, val_x: torch.Tensor, val_content: torch.Tensor | None = None,
              train_content: torch.Tensor | None = None, quantile: float = QUANTILE,
              val_layout: torch.Tensor | None = None) -> OODModel:
    """Measure each distance's spread (validation; content over train + validation) and set the threshold so
    that ``quantile`` of the (in-distribution) validation inputs are known.

    The layout distance's spread leaves out validation screenshots that are also training
    screenshots (distance 0: one screen with several instructions): new screenshots are
    what it must judge."""
    import torch

    model.far = _spread(model.distance(val_x).log())
    with_layout = model.layouts is not None and val_layout is not None
    if val_content is not None and not with_layout:  # the layout sees blank and noise screens too, and better
        both = val_content if train_content is None else torch.cat([train_content, val_content])
        model.content = _spread(_log_variance(both))
    if with_layout:
        d = model.layout_distance(val_layout).double()
        fresh = d[d > 0]  # rounded as the bank is, a training screenshot is exactly 0 away
        model.layout = _spread(fresh if len(fresh) >= 2 else d)
    scores = model.score(val_x, val_content, val_layout)
    model.threshold = float(torch.quantile(scores, quantile))
    model.quantile = quantile
    return model


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve of separating out- from in-distribution by score (higher = more OOD)."""
    import torch

    a = torch.as_tensor(in_scores, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(out_scores, dtype=torch.float64).reshape(-1)
    if not len(a) or not len(b):
        return float("nan")
    greater = (b[:, None] > a[None, :]).double().sum() + 0.5 * (b[:, None] == a[None, :]).double().sum()
    return float(greater / (len(a) * len(b)))
