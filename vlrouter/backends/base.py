"""The contract between `router retrain` and a training backend.

A backend is any object with ``name`` and ``retrain(request) -> RetrainResult``. It
builds the routing dataset, embeds what is missing and trains a *candidate* router
(written with :func:`vlrouter.core.train.write_candidate` into a fresh version folder
beside the live router), and returns ``promoted=False``: the eval gate and promotion
are common to every backend and run afterwards in
:func:`vlrouter.core.train.run_retrain` (:func:`~vlrouter.core.train.promote_with_gate`).

Options resolve in one place (:func:`vlrouter.core.train.resolve_options`):
defaults < registry.yaml ``train:`` < CLI flags; the request carries the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vlrouter.core.progress import Progress

if TYPE_CHECKING:
    from vlrouter.core.registry import Registry
    from vlrouter.core.train import TrainOptions


@dataclass
class RetrainRequest:
    # The registry to train for. An object, not a path: `router add-adapter` retrains an
    # edited registry before it is saved (registry.yaml is written only on success).
    registry: Registry
    overrides: dict[str, Any] = field(default_factory=dict)  # CLI flags that were given (None dropped)
    force: bool = False  # promote even when the eval gate says no
    progress: Progress | None = None
    options: TrainOptions | None = None  # resolved by run_retrain; backends use these, not re-resolve


@dataclass
class RetrainResult:
    router_dir: str  # the live router folder (symlink) after the run
    candidate_dir: str  # where the new router was written
    promoted: bool
    adapters: list[str]
    val_acc: float
    live_val_acc: float | None  # the previous router's accuracy on the same validation samples
    embedded_new: int
    reused_cached: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_dir: str = ""  # the routing dataset trained on
    backend: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # embed/train timings and counts


class Backend(Protocol):
    name: str

    def retrain(self, request: RetrainRequest) -> RetrainResult: ...
