"""A stand-in vLLM OpenAI-compatible server on loopback that checks every request against vLLM's documented API.

What it checks (vLLM's OpenAI server, ``vllm/entrypoints/openai``; docs "OpenAI-Compatible
Server" and "LoRA Adapters"):

* ``POST /v1/chat/completions``: a JSON object with only fields the API knows; ``model``
  a served model id (the base model or a ``--lora-modules`` / runtime-loaded LoRA), else
  404 in vLLM's error shape; ``messages`` a non-empty list of ``{role, content}`` where
  content is a string or a list of ``text`` / ``image_url`` parts; every ``image_url`` a
  ``data:image/…;base64,`` URL that decodes to an image; ``max_tokens`` a positive int,
  ``temperature`` in [0, 2], ``top_p`` in (0, 1], ``n`` 1, ``stream`` false, ``stop`` a
  string or a list of strings. Answers a ``chat.completion`` whose text depends on the
  model and the instruction, so a test can tell which adapter generated.
* ``GET /v1/models``: ``{"object": "list", "data": [cards]}``; LoRA cards name their ``parent``.
* ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (only with
  ``runtime_updates=True``, as vLLM registers them only under
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``{"lora_name", "lora_path"}`` /
  ``{"lora_name"}``; 400 for a name already loaded, 404 for a folder without an adapter.

A request that breaks the schema is answered 400 and recorded in ``violations``; tests
assert there are none. The server runs in a daemon thread and stops when the ``with``
block ends, or by itself after ``lifetime_s``.
"""

from __future__ import annotations

import base64
import binascii
import io
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
               "stream", "stop", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs",
               "top_logprobs", "user", "response_format", "stream_options", "min_tokens"}


def standin_text(model: str, prompt: str) -> str:
    """What the stand-in generates: parseable, and different per model and instruction."""
    return f"click(x={zlib.crc32(model.encode()) % 1000}, y={len(prompt)})"


@dataclass
class StandIn:
    base: str = "Qwen/Qwen3-VL-8B-Instruct"
    loras: dict[str, str] = field(default_factory=dict)  # name -> path
    runtime_updates: bool = False
    delay_s: float = 0.0  # answer chat requests this late (timeouts)
    fail_status: int | None = None  # answer chat requests with this error status
    url: str = ""
    requests: list[dict] = field(default_factory=list)  # (path, body) of every request
    violations: list[str] = field(default_factory=list)
    images: list = field(default_factory=list)  # decoded images of chat requests

    def error(self, status: int, message: str, type_: str):
        return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}},
                            status_code=status)

    def bad(self, message: str):
        self.violations.append(message)
        return self.error(400, message, "BadRequestError")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            now = int(time.time())
            cards = [{"id": self.base, "object": "model", "created": now, "owned_by": "vllm", "root": self.base,
                      "parent": None, "max_model_len": 4096, "permission": []}]
            cards += [{"id": n, "object": "model", "created": now, "owned_by": "vllm", "root": p,
                       "parent": self.base, "permission": []} for n, p in self.loras.items()]
            return {"object": "list", "data": cards}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            import asyncio

            try:
                body = await request.json()
            except ValueError:
                return self.bad("body is not JSON")
            self.requests.append({"path": "/v1/chat/completions", "body": body})
            problem = self.check_chat(body)
            if problem:
                return self.bad(problem)
            model = body["model"]
            if model != self.base and model not in self.loras:
                return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.fail_status:
                return self.error(self.fail_status, "CUDA out of memory (stand-in)", "InternalServerError")
            prompt = " ".join(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
            text = standin_text(model, prompt)
            return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

        if self.runtime_updates:
            @app.post("/v1/load_lora_adapter")
            async def load(request: Request):
                body = await request.json()
                self.requests.append({"path": "/v1/load_lora_adapter", "body": body})
                if not isinstance(body.get("lora_name"), str) or not isinstance(body.get("lora_path"), str):
                    return self.bad("load_lora_adapter needs string lora_name and lora_path")
                name, path = body["lora_name"], body["lora_path"]
                if name in self.loras:
                    return self.error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
                if not (Path(path) / "adapter_config.json").is_file():
                    return self.error(404, f"No adapter found for {path}", "NotFoundError")
                self.loras[name] = path
                return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

            @app.post("/v1/unload_lora_adapter")
            async def unload(request: Request):
                body = await request.json()
                self.requests.append({"path": "/v1/unload_lora_adapter", "body": body})
                name = body.get("lora_name")
                if name not in self.loras:
                    return self.error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
                del self.loras[name]
                return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        return app

    def check_chat(self, body: Any) -> str | None:
        """The first way ``body`` breaks vLLM's chat completions schema, or None."""
        from PIL import Image

        if not isinstance(body, dict):
            return "body is not an object"
        extra = set(body) - CHAT_FIELDS
        if extra:
            return f"unknown fields {sorted(extra)}"
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "model must be a non-empty string"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
                return f"bad message {m!r:.80}"
            content = m["content"]
            if isinstance(content, str):
                continue
            if not isinstance(content, list) or not content:
                return "content must be a string or a non-empty list of parts"
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        return "a text part needs a string text"
                elif kind == "image_url":
                    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
                        return "image_url.url must be a data:image/...;base64, URL"
                    try:
                        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True)))
                        img.load()
                    except (binascii.Error, OSError, ValueError) as e:
                        return f"the image does not decode: {e}"
                    self.images.append(img)
                else:
                    return f"unknown content part type {kind!r}"
        mt = body.get("max_tokens", body.get("max_completion_tokens"))
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            return "max_tokens must be a positive integer"
        t = body.get("temperature")
        if t is not None and (not isinstance(t, (int, float)) or not 0 <= t <= 2):
            return "temperature must be in [0, 2]"
        p = body.get("top_p")
        if p is not None and (not isinstance(p, (int, float)) or not 0 < p <= 1):
            return "top_p must be in (0, 1]"
        if body.get("n", 1) != 1 or body.get("stream", False) is not False:
            return "n must be 1 and stream false here"
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                               and all(isinstance(s, str) for s in stop))):
            return "stop must be a string or a list of strings"
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_standin(standin: StandIn | None = None, *, lifetime_s: float = 300.0) -> Iterator[StandIn]:
    """Serve ``standin`` on 127.0.0.1 (a free port) in a daemon thread; stopped at the end of the block."""
    import uvicorn

    standin = standin or StandIn()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(standin.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"vllm-standin-{port}", daemon=True)
    thread.start()
    timer = threading.Timer(lifetime_s, lambda: setattr(server, "should_exit", True))
    timer.daemon = True
    timer.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the vLLM stand-in did not start")
        time.sleep(0.01)
    standin.url = f"http://127.0.0.1:{port}"
    try:
        yield standin
    finally:
        timer.cancel()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
