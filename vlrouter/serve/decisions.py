"""The decision log: every routing decision to Python logging and, optionally, one JSONL line each.

A line holds what a user needs to find the cases worth labelling later (low confidence,
``known: false``, fallbacks) and the screenshot they came from::

    {"time": "2026-…Z", "endpoint": "/v1/chat/completions", "image_sha256": "…", "prompt": "Click March 29",
     "model": "auto", "routed": "calendar", "confidence": 0.93, "ood_score": null, "known": null,
     "adapter": "calendar", "fallback": false, "forced": false, "action": "click(x=412, y=230)",
     "text": "click(x=412, y=230)", "latency_ms": 41.2, "router": "/…/runs/.router.versions/…"}

``jq 'select(.confidence < 0.6 or .known == false)' decisions.jsonl`` lists them; with
``--decision-images DIR`` each screenshot is kept once as ``DIR/<image_sha256>.<ext>``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlrouter.core.errors import InputError

log = logging.getLogger("vlrouter.decisions")
_EXT = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"RIFF": "webp"}


class DecisionLog:
    """Appends decisions to ``path`` (JSONL, one flushed line per decision) and logs each at INFO."""

    def __init__(self, path: str | Path | None = None, images: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.images = Path(images) if images is not None else None
        self._lock = threading.Lock()
        self._file = None
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            if self.images is not None:
                self.images.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{e.filename}: cannot write the decision log ({e.strerror}) "
                             "(fix: pass a writable --decision-log / --decision-images path)") from None

    def record(self, *, endpoint: str, image_sha256: str, image: bytes | None, prompt: str, model: str,
               decision: dict[str, Any], latency_ms: float, router: str | None) -> dict[str, Any]:
        """Log one decision; ``decision`` is a ``Route.to_dict()`` or ``Action.to_dict()`` (with ``forced``)."""
        action = decision.get("action")
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "endpoint": endpoint,
            "image_sha256": image_sha256,
            "prompt": prompt,
            "model": model,
            "routed": decision.get("routed", decision.get("adapter")),
            "confidence": decision.get("confidence"),
            "ood_score": decision.get("ood_score"),
            "known": decision.get("known"),
            "adapter": decision.get("adapter") if "text" in decision else None,
            "fallback": bool(decision.get("fallback", False)),
            "forced": bool(decision.get("forced", False)),
            "action": action.get("call") if isinstance(action, dict) else None,
            "text": decision.get("text"),
            "latency_ms": round(latency_ms, 2),
            "router": router,
        }
        log.info("%s routed=%s confidence=%s adapter=%s action=%s latency_ms=%.1f", endpoint, entry["routed"],
                 entry["confidence"], entry["adapter"], entry["action"], latency_ms)
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            if self.images is not None and image is not None:
                ext = next((e for magic, e in _EXT.items() if image.startswith(magic)), "img")
                target = self.images / f"{image_sha256}.{ext}"
                if not target.exists():
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                    tmp.write_bytes(image)
                    os.replace(tmp, target)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
