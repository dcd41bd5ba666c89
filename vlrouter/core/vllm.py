"""Generation on a vLLM server: the chat request with the screenshot, the chosen adapter named as ``model``.

With ``engine.generation: vllm`` the engine routes in-process (the base model, adapters
off) and sends generation to a vLLM OpenAI-compatible server started with
``--enable-lora --lora-modules NAME=PATH …``: one ``POST /v1/chat/completions`` per row,
``model`` = the adapter's name (or the base model's served name for the ``base``
fallback), the user turn as OpenAI content parts -- the screenshot as an ``image_url``
``data:`` URL (PNG, the pixels the router saw), then the instruction as text, the order
vlrouter's own chat formatting uses. A batch's rows are sent concurrently, so vLLM
batches them itself.

``GET /v1/models`` says which adapters the server serves (asked once, and again when an
adapter is missing); ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (only on
a server started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) let ``router
add-adapter`` / ``remove-adapter`` change the served set without a restart.

Every failure -- the server down, an adapter it does not serve, a timeout, an error
answer -- is a :class:`~vlrouter.core.errors.GenerationServerError` naming
``engine.vllm_url`` in registry.yaml (file and line) and the fix.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlrouter.core.errors import GenerationServerError, GenerationTimeout, InputError, located
from vlrouter.core.registry import Registry
from vlrouter.core.results import BASE

API_KEY_ENV = "VLLM_API_KEY"  # the variable `vllm serve` reads for its --api-key; sent as a Bearer token when set
MAX_PARALLEL = 32  # rows of one batch in flight at once
# transformers generate() arguments and the OpenAI/vLLM request fields they become.
PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "repetition_penalty": "repetition_penalty", "stop_strings": "stop", "seed": "seed"}
IGNORED = ("do_sample", "pad_token_id", "tokenizer", "eos_token_id")


def image_data_url(image) -> str:
    """A PIL image as a ``data:image/png;base64,…`` URL (lossless: the pixels the router saw)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_body(model: str, image, prompt: str, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/chat/completions`` request for one row (greedy unless ``do_sample``)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": prompt}]}],
        "n": 1,
        "stream": False,
    }
    unknown = [k for k in gen_kwargs if k not in PARAMS and k not in IGNORED]
    if unknown:
        raise InputError(located(None, unknown[0], "this generate argument has no vLLM equivalent",
                                 fix=f"use {', '.join(PARAMS)}, or engine.generation: local"))
    for key, field in PARAMS.items():
        if gen_kwargs.get(key) is not None:
            value = gen_kwargs[key]
            body[field] = list(value) if key == "stop_strings" else value
    if not gen_kwargs.get("do_sample"):
        body["temperature"] = 0.0  # greedy, as the local engine
        body.pop("top_p", None)
        body.pop("top_k", None)
    return body


class VLLMClient:
    """A vLLM OpenAI-compatible server, as the engine's generator. Thread-safe."""

    def __init__(self, url: str, *, timeout: float = 120.0, model: str | None = None, lora_dir: str | None = None,
                 api_key: str | None = None, file: str | Path | None = None, line: int | None = None) -> None:
        base = url.strip().rstrip("/")
        self.url = base[:-3] if base.endswith("/v1") else base
        self.timeout = float(timeout)
        self.model = model  # the base model's served name (None: the first non-LoRA entry of /v1/models)
        self.lora_dir = lora_dir
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.file, self.line = file, line
        self._client = None
        self._served: dict[str, dict] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_registry(cls, reg: Registry) -> VLLMClient:
        e = reg.model.engine
        if not e.vllm_url:
            raise GenerationServerError(located(reg.path, "engine.vllm_url", "not set", line=reg.line_of(("engine",)),
                                                fix="add `vllm_url: http://HOST:PORT` under engine:"))
        lora_dir = None if e.vllm_lora_dir is None else str(reg.resolve(e.vllm_lora_dir))
        return cls(e.vllm_url, timeout=e.vllm_timeout, model=e.vllm_model, lora_dir=lora_dir, file=reg.path,
                   line=reg.line_of(("engine", "vllm_url")) or reg.line_of(("engine",)))

    def __repr__(self) -> str:
        return f"VLLMClient({self.url!r}, timeout={self.timeout:g})"

    # ---- HTTP ---------------------------------------------------------------------------------
    def _err(self, problem: str, fix: str, cls: type[GenerationServerError] = GenerationServerError):
        return cls(located(self.file, "engine.vllm_url", f"vLLM at {self.url}: {problem}", fix=fix, line=self.line))

    def _http(self):
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                self._client = httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers,
                                            limits=httpx.Limits(max_connections=MAX_PARALLEL))
            return self._client

    def request(self, method: str, path: str, body: dict | None = None):
        """One request; connection, timeout and protocol failures become located errors. Returns the response."""
        import httpx

        try:
            return self._http().request(method, path, json=body)
        except httpx.TimeoutException:
            raise self._err(f"no answer to {method} {path} within {self.timeout:g} s",
                            fix="raise engine.vllm_timeout in registry.yaml, or check the server's load and logs",
                            cls=GenerationTimeout) from None
        except httpx.ConnectError as e:
            raise self._err(f"cannot connect ({_reason(e)})",
                            fix="start the vLLM server (README: Scaling out), or correct engine.vllm_url") from None
        except httpx.HTTPError as e:
            raise self._err(f"{method} {path} failed: {type(e).__name__}: {_reason(e)}",
                            fix="check engine.vllm_url and the server's logs") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ---- what the server serves -----------------------------------------------------------------
    def served(self, refresh: bool = False) -> dict[str, dict]:
        """``GET /v1/models``: model id -> its card (base models have no ``parent``; LoRAs name their base)."""
        if self._served is not None and not refresh:
            return self._served
        r = self.request("GET", "/v1/models")
        data = _json(r)
        if r.status_code != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise self._err(f"GET /v1/models answered HTTP {r.status_code}: {_message(r)}",
                            fix="point engine.vllm_url at a vLLM OpenAI-compatible server (`vllm serve …`)")
        self._served = {str(c.get("id")): c for c in data["data"] if isinstance(c, dict) and c.get("id")}
        return self._served

    def base_name(self) -> str:
        """The base model's served name: engine.vllm_model, else the first model card without a parent."""
        served = self.served()
        if self.model is not None:
            if self.model not in served:
                served = self.served(refresh=True)
            if self.model not in served:
                raise self._err(f"serves no model named {self.model!r} (engine.vllm_model; it serves "
                                f"{', '.join(served) or 'nothing'})", fix="set engine.vllm_model to the name vLLM "
                                "serves the base model under (its --served-model-name), or remove it")
            return self.model
        bases = [mid for mid, card in served.items() if not card.get("parent")]
        if not bases:
            raise self._err("GET /v1/models lists no base model", fix="set engine.vllm_model to the base model's "
                            "served name")
        return bases[0]

    def model_for(self, adapter: str) -> str:
        """The ``model`` field for generating with ``adapter`` (``base``: the base model's served name)."""
        if adapter == BASE:
            return self.base_name()
        if adapter not in self.served() and adapter not in self.served(refresh=True):
            raise self._err(f"does not serve adapter {adapter!r} (it serves {', '.join(self.served()) or 'nothing'})",
                            fix=f"start vLLM with --lora-modules {adapter}=PATH (README: Scaling out), or load it at "
                                f"runtime with `router add-adapter` on a server started with "
                                f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        return adapter

    # ---- generation -------------------------------------------------------------------------------
    def chat(self, image, prompt: str, adapter: str, gen_kwargs: dict[str, Any]) -> str:
        """Generate one row's text with ``adapter`` on the server."""
        body = chat_body(self.model_for(adapter), image, prompt, gen_kwargs)
        r = self.request("POST", "/v1/chat/completions", body)
        if r.status_code == 404:
            self._served = None  # unloaded meanwhile? ask again next time
            raise self._err(f"does not serve {body['model']!r}: {_message(r)}",
                            fix=f"start vLLM with --lora-modules {adapter}=PATH, or `router add-adapter` again")
        data = _json(r)
        if r.status_code != 200:
            raise self._err(f"chat completion with {body['model']!r} answered HTTP {r.status_code}: {_message(r)}",
                            fix="see the vLLM server's log; README: Scaling out lists vLLM's LoRA limits")
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._err("the chat completion holds no choices[0].message.content",
                            fix="point engine.vllm_url at a vLLM OpenAI-compatible server") from None
        return text if isinstance(text, str) else ""

    def generate(self, images: Sequence, prompts: Sequence[str], adapters: Sequence[str],
                 gen_kwargs: dict[str, Any]) -> list[str]:
        """Every row's text, the rows sent concurrently (vLLM batches them); the first error is raised."""
        rows = list(zip(images, prompts, adapters))
        if len(rows) == 1:
            return [self.chat(*rows[0], gen_kwargs)]
        with ThreadPoolExecutor(min(len(rows), MAX_PARALLEL), thread_name_prefix="vlrouter-vllm") as pool:
            futures = [pool.submit(self.chat, img, prompt, adapter, gen_kwargs) for img, prompt, adapter in rows]
            return [f.result() for f in futures]

    # ---- runtime LoRA updates (router add-adapter / remove-adapter) ----------------------------------
    def lora_path(self, name: str, local_path: str | Path) -> str:
        """Where the server finds adapter ``name``: engine.vllm_lora_dir/NAME, else its folder on this machine."""
        return f"{self.lora_dir.rstrip('/')}/{name}" if self.lora_dir else str(Path(local_path).resolve())

    def load_lora(self, name: str, path: str) -> str:
        """``POST /v1/load_lora_adapter``; a message saying what happened."""
        r = self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self._served = None
        if r.status_code == 200:
            return f"loaded adapter {name!r} into vLLM at {self.url} from {path}"
        msg = _message(r)
        if _route_missing(r):
            raise self._err("does not allow runtime LoRA updates (no /v1/load_lora_adapter)",
                            fix=f"restart vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or add "
                                f"--lora-modules {name}={path} to its command line")
        if r.status_code == 400 and "already been loaded" in msg:
            return f"vLLM at {self.url} already serves adapter {name!r}"
        raise self._err(f"refused to load adapter {name!r} from {path} (HTTP {r.status_code}: {msg})",
                        fix="check that the server sees that folder (engine.vllm_lora_dir maps it) and that the "
                            "adapter fits the served base model (README: Scaling out lists vLLM's LoRA limits)")

    def unload_lora(self, name: str) -> str:
        r = self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        self._served = None
        if r.status_code == 200:
            return f"unloaded adapter {name!r} from vLLM at {self.url}"
        if _route_missing(r):
            raise self._err("does not allow runtime LoRA updates (no /v1/unload_lora_adapter)",
                            fix="restart vLLM without the adapter's --lora-modules entry, or with "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        if r.status_code == 404:
            return f"vLLM at {self.url} did not serve adapter {name!r}"
        raise self._err(f"refused to unload adapter {name!r} (HTTP {r.status_code}: {_message(r)})",
                        fix="see the vLLM server's log")


def _json(r) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _message(r) -> str:
    """vLLM's error text: ``{"error": {"message"}}`` (current), ``{"message"}`` (older), or the body."""
    data = _json(r)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return " ".join(str(err["message"]).split())[:300]
        if data.get("message"):
            return " ".join(str(data["message"]).split())[:300]
        if data.get("detail"):
            return " ".join(str(data["detail"]).split())[:300]
    return " ".join((r.text or f"HTTP {r.status_code}").split())[:300]


def _route_missing(r) -> bool:
    """A 404/405 from the web framework itself (the endpoint is not registered), not from vLLM's handler."""
    data = _json(r)
    return r.status_code in (404, 405) and isinstance(data, dict) and data.get("detail") in ("Not Found",
                                                                                             "Method Not Allowed")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


def sync_adapter(registry: Registry, name: str, *, added: bool) -> str | None:
    """After ``router add-adapter`` / ``remove-adapter`` with ``engine.generation: vllm``: load (unload) ``name`` on
    the vLLM server, so it serves what the registry lists. None when generation is local."""
    if registry.model.engine.generation != "vllm":
        return None
    client = VLLMClient.from_registry(registry)
    try:
        if not added:
            return client.unload_lora(name)
        path = client.lora_path(name, registry.resolve(registry.adapter(name).checkpoint))
        return client.load_lora(name, path)
    finally:
        client.close()
