"""OpenAI wire shapes: parse chat and vlrouter requests; build chat.completion, chunk, model-list and error bodies.

Requests are parsed by hand rather than by a schema library so that every refusal names
the exact field (``messages[0].content[1].image_url.url: …``) in the same one-line,
``(fix: …)`` style the library's errors use, inside OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "..."}}
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlrouter.core.errors import (
    GenerationServerError,
    GenerationTimeout,
    ImageError,
    InputError,
    LowConfidenceError,
    RouterError,
    UnknownAdapterError,
    located,
)
from vlrouter.serve.batching import GenSettings
from vlrouter.serve.settings import ServeSettings

AUTO = "auto"
BASE = "base"
OWNER = "vlrouter"
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WebP"}
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


# ---- errors -----------------------------------------------------------------------------------

class APIError(Exception):
    """An HTTP error answered in OpenAI's shape. ``message`` is one line, with a fix where there is one."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, problem: str, *, fix: str | None = None, code: str = "invalid_request",
                status: int = 400) -> APIError:
    return APIError(status, located(None, param, problem, fix=fix), param=param, code=code)


def from_router_error(e: RouterError) -> APIError:
    """The library's typed errors as HTTP errors; the message is the library's, unchanged."""
    if isinstance(e, UnknownAdapterError):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, ImageError):
        return APIError(400, str(e), param="image", code="invalid_image")
    if isinstance(e, LowConfidenceError):
        return APIError(422, str(e), code="low_confidence")
    if isinstance(e, InputError):
        return APIError(400, str(e), code="invalid_request")
    if isinstance(e, GenerationServerError):  # vLLM (engine.generation: vllm): down, timed out, refused
        timeout = isinstance(e, GenerationTimeout)
        return APIError(504 if timeout else 502, str(e), type="server_error",
                        code="generation_timeout" if timeout else "generation_server_error")
    return APIError(500, str(e), type="server_error", code=type(e).__name__)


# ---- parsing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    """Where a request's screenshot is: decoded ``data`` (data: URL or base64), or a remote ``url`` to fetch."""

    param: str  # the field that held it, for errors
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class Item:
    """One (screenshot, instruction) to route or act on, and the adapter the caller forces (None: route)."""

    image: ImageRef
    prompt: str
    adapter: str | None = None
    prompt_param: str = "prompt"


@dataclass(frozen=True)
class ChatRequest:
    model: str
    item: Item
    gen: GenSettings
    stream: bool


@dataclass(frozen=True)
class OwnRequest:
    """A ``/v1/route`` or ``/v1/act`` body: one item, or ``items`` (answered as a list)."""

    items: list[Item]
    gen: GenSettings
    batch: bool


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise bad_request(None, "request body is empty", fix="send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        problem = f"request body is not valid JSON ({e})" if isinstance(e, ValueError) else "JSON nested too deep"
        raise bad_request(None, problem, fix="send a JSON object with Content-Type: application/json",
                          code="invalid_json") from None


def _object(body: Any, where: str | None = None) -> dict:
    if not isinstance(body, dict):
        raise bad_request(where, f"expected a JSON object, got {type(body).__name__}", fix="send a JSON object")
    return body


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_request(key, f"must be a number in {rng}, got {v!r}")
    return float(v)


def parse_generation(body: dict, settings: ServeSettings, *, token_keys=("max_tokens", "max_completion_tokens"),
                     ) -> GenSettings:
    """max_tokens, temperature, top_p, seed, stop -> :class:`GenSettings` (OpenAI's ranges)."""
    max_new = settings.default_max_tokens
    for key in token_keys:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= settings.max_new_tokens:
            raise bad_request(key, f"must be an integer in [1, {settings.max_new_tokens}], got {v!r}",
                              fix="ask for fewer tokens (the server's --max-tokens-limit caps it)")
        max_new = v
    temperature = _number(body, "temperature", 0.0, 2.0) or 0.0
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise bad_request("seed", f"must be a non-negative integer, got {seed!r}")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request("stop", "must be a string or a list of at most 4 strings", code="invalid_stop")
    if any(not s for s in stops):
        raise bad_request("stop", "stop strings must not be empty", code="invalid_stop")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", f"only n=1 is supported, got {n!r}", fix="send one request per choice")
    return GenSettings(max_new_tokens=max_new, temperature=temperature,
                       top_p=top_p if temperature > 0 else None, seed=seed if temperature > 0 else None, stop=stops)


def image_from_url(url: Any, param: str, settings: ServeSettings) -> ImageRef:
    """A ``data:`` URL decoded (checked: an image media type, base64, size); an http(s) URL kept to fetch."""
    if not isinstance(url, str) or not url:
        raise bad_request(param, "image URL is missing or not a string",
                          fix="send {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,…\"}}")
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if not m:
            raise bad_request(param, "malformed data: URL", fix="use data:image/png;base64,<base64 bytes>",
                              code="invalid_image")
        mime, params, payload = m.group(1).strip().lower(), m.group(2).lower(), m.group(3)
        if mime not in IMAGE_TYPES:
            raise bad_request(param, f"data URL has media type {mime or 'text/plain'!r}, not a PNG, JPEG or WebP "
                              "image", fix="send the screenshot as data:image/png;base64,…", code="invalid_image")
        if ";base64" not in params:
            raise bad_request(param, "data URL is not base64-encoded", fix="use data:image/png;base64,…",
                              code="invalid_image")
        return ImageRef(param, data=decode_base64(payload, param, settings))
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise bad_request(param, "remote image URLs are refused by this server",
                              fix="send the screenshot inline as a data:image/png;base64,… URL, or start the server "
                                  "with --allow-remote-images", code="remote_image_refused")
        return ImageRef(param, url=url)
    raise bad_request(param, f"unsupported image URL scheme {scheme!r}" if scheme else "not a data: or http(s) URL",
                      fix="send the screenshot inline as a data:image/png;base64,… URL", code="invalid_image")


def decode_base64(payload: Any, param: str, settings: ServeSettings) -> bytes:
    if not isinstance(payload, str) or not payload:
        raise bad_request(param, "image is missing or not a base64 string",
                          fix="send the PNG/JPEG bytes base64-encoded")
    if payload.startswith("data:"):
        return image_from_url(payload, param, settings).data or b""
    compact = re.sub(r"\s+", "", payload)
    if len(compact) * 3 // 4 > settings.max_image_bytes:
        raise too_large(param, f"image is over the server's limit of {settings.max_image_bytes:,} bytes",
                        code="image_too_large")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(param, f"image is not valid base64 ({e})", fix="base64-encode the PNG/JPEG bytes",
                          code="invalid_image") from None
    if len(data) > settings.max_image_bytes:
        raise too_large(param, f"image is {len(data):,} bytes, over the server's limit of "
                        f"{settings.max_image_bytes:,}", code="image_too_large")
    check_image_format(data, param)
    return data


def check_image_format(data: bytes, param: str) -> None:
    if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return
    raise bad_request(param, "the image is not a PNG, JPEG or WebP file", fix="send a PNG, JPEG or WebP screenshot",
                      code="invalid_image")


def too_large(param: str | None, problem: str, code: str = "request_too_large") -> APIError:
    return APIError(413, located(None, param, problem, fix="send a smaller screenshot (downscale or compress it)"),
                    param=param, code=code)


def parse_chat(body: Any, settings: ServeSettings) -> ChatRequest:
    """The last user message's one ``image_url`` part and its text parts; ``model``; generation settings."""
    body = _object(body)
    model = body.get("model", AUTO)
    if not isinstance(model, str) or not model:
        raise bad_request("model", "must be a string: auto, base, or an adapter name", code="model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream", f"must be true or false, got {stream!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "missing or empty",
                          fix="send [{\"role\": \"user\", \"content\": [image_url part, text part]}]")
    last = None
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            last = i
    if last is None:
        raise bad_request("messages", "no user message", fix="add {\"role\": \"user\", \"content\": […]}")
    where = f"messages[{last}].content"
    content = messages[last].get("content")
    if isinstance(content, str):
        raise bad_request(where, "no image: the content is plain text",
                          fix="send a content list with one image_url part (a data:image/png;base64,… URL) and the "
                              "instruction as a text part", code="missing_image")
    if not isinstance(content, list):
        raise bad_request(where, "must be a list of content parts")
    images, texts = [], []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(p, "content part is not an object")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{p}.text", "must be a string")
            texts.append(part["text"])
        elif kind == "image_url":
            iu = part.get("image_url")
            url, up = (iu.get("url"), f"{p}.image_url.url") if isinstance(iu, dict) else (iu, f"{p}.image_url")
            images.append((url, up))
        else:
            raise bad_request(f"{p}.type", f"unsupported content part type {kind!r}",
                              fix="send one image_url part and text parts")
    if not images:
        raise bad_request(where, "no image", fix="add one {\"type\": \"image_url\", \"image_url\": {\"url\": "
                          "\"data:image/png;base64,…\"}} part", code="missing_image")
    if len(images) > 1:
        raise bad_request(where, f"{len(images)} images ({', '.join(p for _, p in images)}); vlrouter acts on one "
                          "screenshot per request", fix="send one image_url part", code="too_many_images")
    prompt = "\n".join(t for t in texts if t.strip()).strip()
    if not prompt:
        raise bad_request(where, "no instruction text", fix="add a {\"type\": \"text\", \"text\": \"Click March 29\"} "
                          "part", code="missing_prompt")
    image = image_from_url(images[0][0], images[0][1], settings)
    gen = parse_generation(body, settings)
    return ChatRequest(model=model, item=Item(image, prompt, None if model == AUTO else model, where), gen=gen,
                       stream=stream)


def parse_own(body: Any, settings: ServeSettings, *, act: bool) -> OwnRequest:
    """``{"image": base64, "prompt": str, "model"?: str, …}`` or ``{"items": [{…}, …], …}``."""
    body = _object(body)
    batch = "items" in body
    if batch:
        rows = body["items"]
        if not isinstance(rows, list) or not rows:
            raise bad_request("items", "must be a non-empty list of {\"image\", \"prompt\"} objects")
        if len(rows) > settings.max_queue:
            raise bad_request("items", f"{len(rows)} items are more than the server queues ({settings.max_queue})",
                              fix="send fewer items per request")
        where = [f"items[{i}]" for i in range(len(rows))]
    else:
        rows, where = [body], [""]
    items = []
    for row, w in zip(rows, where):
        row = _object(row, w or None)
        prefix = f"{w}." if w else ""
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_request(f"{prefix}prompt", "prompt is missing or empty",
                              fix="pass the instruction text, e.g. 'Click March 29'", code="missing_prompt")
        if "image" not in row:
            raise bad_request(f"{prefix}image", "no image", fix="send the screenshot's bytes base64-encoded",
                              code="missing_image")
        model = row.get("model", row.get("adapter", body.get("model", AUTO))) if act else AUTO
        if not isinstance(model, str) or not model:
            raise bad_request(f"{prefix}model", "must be a string: auto, base, or an adapter name")
        image = ImageRef(f"{prefix}image", data=decode_base64(row["image"], f"{prefix}image", settings))
        items.append(Item(image, prompt, None if model == AUTO else model, f"{prefix}prompt"))
    gen = parse_generation(body, settings, token_keys=("max_new_tokens", "max_tokens")) if act else GenSettings()
    return OwnRequest(items, gen, batch)


# ---- replies ----------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(text: str, model: str, vlrouter: dict, *, finish_reason: str, request_id: str,
                    created: int) -> dict[str, Any]:
    """A standard ``chat.completion``; ``model`` is the adapter that generated; plus the ``vlrouter`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": finish_reason, "logprobs": None}],
        "system_fingerprint": None,
        "vlrouter": vlrouter,
    }


def chat_chunks(text: str, model: str, vlrouter: dict, *, finish_reason: str, request_id: str, created: int,
                piece: int = 8) -> Iterator[str]:
    """Server-sent events of ``chat.completion.chunk`` objects, then ``data: [DONE]``.

    The text is generated first (in a batch) and then sent in pieces of ``piece``
    characters: the role, the content pieces, and a last chunk with ``finish_reason``
    and the ``vlrouter`` object.
    """
    def chunk(delta: dict, finish: str | None, extra: dict | None = None) -> str:
        obj = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if extra:
            obj.update(extra)
        return f"data: {json.dumps(obj)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    for i in range(0, len(text), piece):
        yield chunk({"content": text[i:i + piece]}, None)
    yield chunk({}, finish_reason, {"vlrouter": vlrouter})
    yield "data: [DONE]\n\n"


def model_list(adapters: list[str], created: int | None = None) -> dict[str, Any]:
    """``auto``, ``base`` and every adapter, as OpenAI's ``GET /v1/models`` list."""
    created = int(time.time()) if created is None else created
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": OWNER}
                                       for name in [AUTO, BASE, *adapters]]}
