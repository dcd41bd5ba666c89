"""RouterClient: call a `router serve` server from Python and get the Engine's own Route / Action types back.

    from vlrouter.client import RouterClient

    client = RouterClient("http://127.0.0.1:8000", api_key="…")     # or env VLROUTER_API_KEY
    route = client.route("screen.png", "Click March 29")           # Route(adapter, confidence, probs, …)
    action = client.act(image, "Click March 29")                   # Action(adapter, confidence, text, action, …)
    actions = client.act_batch([(img1, p1), (img2, p2)])           # the server batches them with everyone else's

Images may be PIL images, paths or bytes (PNG, JPEG or WebP). Errors come back as the
library's typed errors with the server's one-line message (an unknown adapter is an
:class:`~vlrouter.core.errors.UnknownAdapterError`, a bad image an
:class:`~vlrouter.core.errors.ImageError`, …); a full server queue (503) is retried after
its ``Retry-After``, a few times.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from vlrouter.core.actions import UIAction
from vlrouter.core.errors import (
    ImageError,
    InputError,
    LowConfidenceError,
    RouterError,
    UnknownAdapterError,
    located,
)
from vlrouter.core.results import Action, Route

__all__ = ["RouterClient", "ServerError"]


class ServerError(RouterError):
    """The server answered an error that is not a bad input of this call (busy, timeout, auth, a server fault)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def image_bytes(image: Any) -> bytes:
    """The bytes to send for a PIL image (as PNG), a path, or bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageError(located(str(image), None, f"image file not found: {path}", fix="check the path"))
        return path.read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InputError(f"image must be a PIL image, a path or bytes, got {type(image).__name__}")


def _fields(cls, data: dict) -> dict:
    """The keys of ``data`` that ``cls`` takes: fields the server adds later pass through when the types have them."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in data.items() if k in names}


def route_from_dict(data: dict) -> Route:
    return Route(**_fields(Route, data))


def action_from_dict(data: dict) -> Action:
    parsed = data.get("action")
    ui = UIAction(name=parsed["name"], args=parsed.get("args", {})) if isinstance(parsed, dict) else None
    return Action(**{**_fields(Action, data), "action": ui})


class RouterClient:
    """A synchronous client of one server (thread-safe: one connection pool)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 120.0, retries: int = 3,
                 max_items: int = 32) -> None:
        self.url = url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("VLROUTER_API_KEY") or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.max_items = max_items  # items per /v1/act request in act_batch
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, json=body)
            except httpx.HTTPError as e:
                raise ServerError(f"{self.url}{path}: cannot reach the server ({type(e).__name__}: {e}) "
                                  "(fix: start it with `router serve`, or check the URL)") from None
            if r.status_code == 503 and attempt < self.retries and "retry-after" in r.headers:
                time.sleep(min(float(r.headers["retry-after"] or 1), 30.0))
                continue
            break
        if r.is_success:
            return r.json()
        raise self._error(r, path)

    def _error(self, r: httpx.Response, path: str) -> RouterError:
        try:
            err = r.json()["error"]
            message, code = str(err["message"]), err.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = f"{self.url}{path}: HTTP {r.status_code}: {r.text[:200]}", None
        if r.status_code == 404 and code == "model_not_found":
            return UnknownAdapterError(message)
        if r.status_code == 422 and code == "low_confidence":
            return LowConfidenceError(message)
        if r.status_code in (400, 413) and code in ("invalid_image", "image_too_large", "missing_image"):
            return ImageError(message)
        if r.status_code in (400, 413):
            return InputError(message)
        return ServerError(message, r.status_code, code)

    # ---- the API -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """``auto``, ``base`` and every adapter the server's router has now."""
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def route(self, image, prompt: str) -> Route:
        return route_from_dict(self._request("POST", "/v1/route", {"image": _b64(image), "prompt": prompt}))

    def route_batch(self, items: Sequence[tuple[Any, str]]) -> list[Route]:
        out: list[Route] = []
        for chunk in _chunks(list(items), self.max_items):
            body = {"items": [{"image": _b64(img), "prompt": p} for img, p in chunk]}
            out += [route_from_dict(d) for d in self._request("POST", "/v1/route", body)["routes"]]
        return out

    def act(self, image, prompt: str, max_new_tokens: int = 64, *, adapter: str | None = None,
            **generation) -> Action:
        """Route and act, like ``Engine.act``. ``adapter`` forces one (or ``"base"``); ``generation``:
        ``temperature``, ``top_p``, ``seed``, ``stop``."""
        body = {"image": _b64(image), "prompt": prompt, "max_new_tokens": max_new_tokens, **generation}
        if adapter is not None:
            body["model"] = adapter
        return action_from_dict(self._request("POST", "/v1/act", body))

    def act_batch(self, items: Sequence[tuple[Any, str]], max_new_tokens: int = 64, *,
                  adapters: Sequence[str | None] | None = None, **generation) -> list[Action]:
        """Act on many (image, prompt) items; the server batches them (``adapters``: one per item, None routes)."""
        items = list(items)
        forced = list(adapters) if adapters is not None else [None] * len(items)
        if len(forced) != len(items):
            raise InputError(f"got {len(forced)} adapters for {len(items)} items (fix: one entry per item, None to "
                             "route)")
        out: list[Action] = []
        rows = [{"image": _b64(img), "prompt": p, **({"model": a} if a is not None else {})}
                for (img, p), a in zip(items, forced)]
        for chunk in _chunks(rows, self.max_items):
            body = {"items": chunk, "max_new_tokens": max_new_tokens, **generation}
            out += [action_from_dict(d) for d in self._request("POST", "/v1/act", body)["actions"]]
        return out

    def reload(self) -> dict:
        """Make the server switch to the live router now (``POST /admin/reload``)."""
        return self._request("POST", "/admin/reload")


def _b64(image: Any) -> str:
    return base64.b64encode(image_bytes(image)).decode("ascii")


def _chunks(rows: list, n: int) -> list[list]:
    return [rows[i:i + n] for i in range(0, len(rows), max(1, n))]
