"""The contract between `router retrain` and a training backend.

A backend is any object with ``name`` and ``retrain(request) -> RetrainResult``.
Options resolve in one place (:func:`vlrouter.core.train.resolve_options`):
defaults < registry.yaml ``train:`` < CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vlrouter.core.progress import Progress


@dataclass
class RetrainRequest:
    registry_path: str
    overrides: dict[str, Any] = field(default_factory=dict)  # CLI flags that were given (None dropped)
    force: bool = False  # promote even when the eval gate says no
    progress: Progress | None = None


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


class Backend(Protocol):
    name: str

    def retrain(self, request: RetrainRequest) -> RetrainResult: ...
