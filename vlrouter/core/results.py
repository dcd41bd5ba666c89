"""What the engine answers: Route (which adapter, how sure, how familiar the input) and Action (what it did).

Plain data, no torch: the HTTP client (``client.py``, ``RouterClient``) builds the same types from
JSON without loading a model. ``to_dict()`` gives JSON-safe dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlrouter.core.actions import UIAction

BASE = "base"  # Action.adapter when the base model (no adapter) generated the text


@dataclass(frozen=True)
class Route:
    """The router's answer: the top adapter, its probability, every adapter's probability, and whether
    the input looks like any adapter's training data at all.

    ``ood_score`` (higher = less like the training data; ~1 for typical training inputs)
    and ``known`` (``ood_score`` within the threshold calibrated on validation, so about
    95 % of in-distribution inputs are known) come from :mod:`vlrouter.core.ood`; with
    ``router.ood: off`` (or a router trained without it) ``ood_score`` is None and
    ``known`` True.
    """

    adapter: str
    confidence: float
    probs: dict[str, float]
    ood_score: float | None = None
    known: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "confidence": self.confidence, "probs": dict(self.probs),
                "ood_score": self.ood_score, "known": self.known}


@dataclass(frozen=True)
class Action:
    """What the engine did: the adapter that generated, the text, its parsed action, timings.

    ``adapter`` is the adapter that generated ``text`` (``"base"`` for the base model);
    ``routed`` is the router's top choice -- they differ when ``router.fallback``
    applied because ``confidence`` (the router's probability for ``routed``) was below
    ``router.min_confidence``, or the input was not ``known`` (see :class:`Route`).
    ``action`` is None when the text does not parse.
    ``timings`` holds ``route_ms`` (opening the image, processor, routing pass, head),
    ``generate_ms``, ``total_ms`` and ``vision_calls`` (vision-tower forwards during the
    call: 1 when the routing pass's image features were reused); for
    :meth:`Engine.act_batch`, the whole batch's numbers, and ``batch_size``.
    """

    adapter: str
    confidence: float
    text: str
    action: UIAction | None
    timings: dict[str, float]
    routed: str = ""
    probs: dict[str, float] = field(default_factory=dict)
    ood_score: float | None = None
    known: bool = True

    @property
    def fallback(self) -> bool:
        return self.adapter != self.routed

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "routed": self.routed,
            "fallback": self.fallback,
            "confidence": self.confidence,
            "probs": dict(self.probs),
            "ood_score": self.ood_score,
            "known": self.known,
            "text": self.text,
            "action": None if self.action is None else self.action.to_dict(),
            "timings": dict(self.timings),
        }


@dataclass(frozen=True)
class ReloadResult:
    """What :meth:`Engine.reload` / :meth:`Engine.swap_router` changed."""

    router: str | None  # the router version folder now live in the engine
    adapters: list[str]  # the router's labels, in order
    added: list[str] = field(default_factory=list)  # LoRAs loaded into the running model
    removed: list[str] = field(default_factory=list)  # LoRAs dropped from it
    replaced: list[str] = field(default_factory=list)  # same name, checkpoint files changed: reloaded

    def to_dict(self) -> dict[str, Any]:
        return {"router": self.router, "adapters": list(self.adapters), "added": list(self.added),
                "removed": list(self.removed), "replaced": list(self.replaced)}
