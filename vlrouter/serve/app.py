"""The HTTP app: one Engine behind OpenAI-compatible chat completions, vlrouter's route/act, health, metrics, reload.

:func:`create_app` builds a FastAPI (ASGI) app around an :class:`~vlrouter.core.engine.Engine`
(or a registry.yaml path, loaded in the background while ``/healthz`` already answers).
Requests are parsed and their screenshots opened on the event loop and in the thread
pool, then queued into the :class:`~vlrouter.serve.batching.Batcher`, which runs
``engine.act_batch`` in one worker thread. Every error is JSON in OpenAI's error shape
with the library's one-line message: never a traceback (an unexpected exception is
logged, and answered as a one-line 500). The app prints nothing; it logs to
``vlrouter.serve`` and ``vlrouter.decisions``.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /v1/route``,
``POST /v1/act``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``POST /admin/reload``,
and the page at ``GET /``. With an API key, all but ``/healthz``, ``/readyz`` and the
page need ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlrouter.core.encoder import prompt_token_limit
from vlrouter.core.engine import Engine
from vlrouter.core.errors import InputError, RouterError, StaleRouterError, located
from vlrouter.core.images import open_image
from vlrouter.serve import openai_compat as oa
from vlrouter.serve.batching import Batcher, Job, QueueFull
from vlrouter.serve.decisions import DecisionLog
from vlrouter.serve.metrics import CONTENT_TYPE, Metrics
from vlrouter.serve.page import PAGE
from vlrouter.serve.reload import RouterWatcher
from vlrouter.serve.settings import ServeSettings

log = logging.getLogger("vlrouter.serve")

ENDPOINTS = ("/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/route", "/v1/act",
             "/admin/reload")
OPEN_ENDPOINTS = ("/", "/healthz", "/readyz")  # no API key needed: probes, and the page (static; it asks for the key)
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class ClientGone(Exception):
    """The client disconnected while its request waited; its queue slot was freed."""


# ---- the server's state --------------------------------------------------------------------------

class ServerState:
    """The engine (or its loading), the batcher, metrics, decision log and reload watcher of one app."""

    def __init__(self, source: Engine | str | Path, settings: ServeSettings) -> None:
        self.settings = settings
        self.source = source
        self.engine: Engine | None = source if isinstance(source, Engine) else None
        self.load_error: str | None = None
        self.batcher: Batcher | None = None
        self.watcher: RouterWatcher | None = None
        self.metrics = Metrics(queue_depth=lambda: self.batcher.depth if self.batcher else 0,
                               running=lambda: self.batcher.running if self.batcher else 0)
        self.decisions = DecisionLog(settings.decision_log, settings.decision_images)
        self.started = int(time.time())
        self._tokenizer = None
        self._loader: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    async def start(self) -> None:
        if self.engine is None:
            self._loader = asyncio.create_task(self._load())
        else:
            await self._serve(self.engine)

    async def _load(self) -> None:
        try:
            engine = await run_in_threadpool(Engine.from_registry, self.source)
        except RouterError as e:
            self.load_error = str(e)
            log.error("cannot load the engine: %s", e)
            return
        except Exception as e:
            self.load_error = f"unexpected {type(e).__name__}: {e}"
            log.exception("cannot load the engine")
            return
        self.engine = engine
        await self._serve(engine)

    async def _serve(self, engine: Engine) -> None:
        s = self.settings
        # a private copy for counting prompt tokens on the event loop: the engine's own is used under its locks
        self._tokenizer = copy.deepcopy(engine.processor.tokenizer)
        batcher = Batcher(engine, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                          on_batch=self.metrics.batch, on_cancel=lambda: self.metrics.inc(self.metrics.cancelled))
        await batcher.start()
        self.watcher = RouterWatcher(engine, s.reload_interval_s, on_result=self._reloaded)
        self.watcher.start()
        self.batcher = batcher
        log.info("ready: router %s, adapters %s", engine.router_version, ", ".join(engine.adapters))

    def _reloaded(self, result, error) -> None:
        self.metrics.inc(self.metrics.reloads, "ok" if error is None else "error")

    async def stop(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        if self.watcher is not None:
            await run_in_threadpool(self.watcher.stop)
        if self.batcher is not None:
            await self.batcher.stop()
        self.decisions.close()

    # ---- request helpers ---------------------------------------------------------------------

    def require_ready(self) -> Engine:
        if not self.ready or self.engine is None:
            if self.load_error:
                raise oa.APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                                  code="model_load_failed")
            raise oa.APIError(503, "the model is still loading (fix: retry shortly; GET /readyz says when it is "
                              "ready)", type="server_error", code="loading",
                              headers={"Retry-After": str(max(1, self.settings.retry_after_s))})
        return self.engine

    def check_model(self, model: str) -> None:
        engine = self.require_ready()
        if model in (oa.AUTO, oa.BASE) or model in engine.adapters:
            return
        names = ", ".join([oa.AUTO, oa.BASE, *engine.adapters])
        raise oa.APIError(404, located(None, "model", f"the model {model!r} does not exist",
                                       fix=f"one of {names} (GET /v1/models)"), param="model",
                          code="model_not_found")

    def check_prompt(self, item: oa.Item) -> None:
        n = len(self._tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
        limit = self.settings.max_prompt_tokens or prompt_token_limit(self.engine.processor)
        if n > limit:
            raise oa.APIError(400, located(None, item.prompt_param, f"the instruction is {n} tokens, over the "
                                           f"server's limit of {limit}",
                                           fix="shorten it, or raise router.max_prompt_tokens"),
                              param=item.prompt_param, code="context_length_exceeded")

    async def open_ref(self, ref: oa.ImageRef):
        """The request's screenshot as an opened PIL image, and its bytes (ImageError -> 400)."""
        data = ref.data if ref.data is not None else await self._fetch(ref)
        image = await run_in_threadpool(open_image, data, where=ref.param)
        return image, data

    async def _fetch(self, ref: oa.ImageRef) -> bytes:
        import httpx

        limit = self.settings.max_image_bytes
        buf = bytearray()
        try:
            async with httpx.AsyncClient(timeout=self.settings.remote_image_timeout_s, follow_redirects=True) as c, \
                    c.stream("GET", ref.url) as r:
                if r.status_code != 200:
                    raise oa.bad_request(ref.param, f"fetching the image URL answered HTTP {r.status_code}",
                                         fix="check the URL, or send the image inline as a data: URL",
                                         code="image_fetch_failed")
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > limit:
                        raise oa.too_large(ref.param, f"the image at the URL is over the server's limit of "
                                           f"{limit:,} bytes", code="image_too_large")
        except httpx.HTTPError as e:
            raise oa.bad_request(ref.param, f"cannot fetch the image URL ({type(e).__name__}: {e})",
                                 fix="check the URL, or send the image inline as a data: URL",
                                 code="image_fetch_failed") from None
        oa.check_image_format(bytes(buf), ref.param)
        return bytes(buf)

    async def run_jobs(self, request: Request, jobs: list[Job]) -> list[Any]:
        """Queue ``jobs`` and wait for their results; 503 when the queue is full, 504 past the timeout."""
        assert self.batcher is not None
        try:
            futures = self.batcher.submit(jobs)
        except QueueFull as e:
            self.metrics.inc(self.metrics.rejected)
            wait = max(1, self.settings.retry_after_s)
            raise oa.APIError(503, f"the server is busy: {e} (fix: retry after {wait} s, or start the server with a "
                              "larger --max-queue)", type="server_error", code="queue_full",
                              headers={"Retry-After": str(wait)}) from None
        gathered = asyncio.gather(*futures)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathered, gone}, timeout=self.settings.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if gathered in done:
            return gathered.result()
        gathered.cancel()  # frees the queue slots of jobs not started yet
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it any more
        if gone in done:
            raise ClientGone()
        raise oa.APIError(504, f"no answer within the server's request timeout of {self.settings.request_timeout_s:g}"
                          " s (fix: retry later, or start the server with a larger --request-timeout)",
                          type="server_error", code="timeout")

    def decision(self, endpoint: str, raw: bytes, item: oa.Item, model: str, d: dict, started: float) -> None:
        """Metrics and the decision log for one answered route/act."""
        forced = bool(d.get("forced"))
        acted = "text" in d
        self.metrics.decision(routed=d.get("routed", d.get("adapter")), adapter=d.get("adapter") if acted else None,
                              fallback=bool(d.get("fallback")), known=d.get("known"), forced=forced)
        try:
            self.decisions.record(endpoint=endpoint, image_sha256=hashlib.sha256(raw).hexdigest(), image=raw,
                                  prompt=item.prompt, model=model, decision=d,
                                  latency_ms=(time.perf_counter() - started) * 1e3,
                                  router=self.engine.router_version if self.engine else None)
        except OSError as e:  # a full disk must not fail the request
            log.warning("decision log: cannot write (%s)", e)

    def finish_reason(self, text: str, max_new_tokens: int) -> str:
        n = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return "length" if n >= max_new_tokens else "stop"


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already, so only the disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is over ``limit`` bytes (by Content-Length, or while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise oa.too_large(None, f"the request body is {int(declared):,} bytes, over the server's limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise oa.too_large(None, f"the request body is over the server's limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def action_dict(action, forced: bool) -> dict[str, Any]:
    """``Action.to_dict()`` passed through (new fields appear unchanged), with ood_score/known and ``forced``."""
    d = action.to_dict()
    d.setdefault("ood_score", getattr(action, "ood_score", None))
    d.setdefault("known", getattr(action, "known", None))
    d["forced"] = forced
    return d


def route_dict(route) -> dict[str, Any]:
    d = route.to_dict()
    d.setdefault("ood_score", getattr(route, "ood_score", None))
    d.setdefault("known", getattr(route, "known", None))
    return d


# ---- the middleware: API key, metrics, the last-resort error boundary --------------------------------

class _Guard:
    """Pure ASGI: checks the API key, times every request for /metrics, and turns a crash into a one-line 500."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.settings.api_key
        self._key = key.encode() if key else None

    def _authorized(self, scope) -> tuple[bool, str]:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if not header:
            return False, "missing API key (fix: send the header Authorization: Bearer KEY)"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return False, ("incorrect API key (fix: send the key the server was started with, as Authorization: "
                           "Bearer KEY)")
        return True, ""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            if self._key is not None and path not in OPEN_ENDPOINTS:
                ok, why = self._authorized(scope)
                if not ok:
                    err = oa.APIError(401, why, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    return await _json(err.body(), err.status, err.headers)(scope, receive, send_and_note)
            await self.app(scope, receive, send_and_note)
        except Exception as e:
            log.exception("unexpected error answering %s %s", scope.get("method"), path)
            if not status["sent"]:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                err = oa.APIError(500, f"unexpected {type(e).__name__}: {first} (the server logged the traceback; "
                                  "please report it)", type="server_error", code="internal_error")
                await _json(err.body(), err.status)(scope, receive, send_and_note)
        finally:
            self.state.metrics.request(endpoint, status["code"], time.perf_counter() - started)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the app ----------------------------------------------------------------------------------------------

def create_app(engine_or_registry: Engine | str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``engine_or_registry`` (an Engine, or a registry.yaml to load in the background)."""
    settings = settings or ServeSettings()
    if not isinstance(engine_or_registry, (Engine, str, Path)):
        raise InputError(f"create_app needs an Engine or a registry.yaml path, got {type(engine_or_registry).__name__}")
    state = ServerState(engine_or_registry, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="vlrouter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlrouter = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(oa.APIError)
    async def _api_error(request: Request, e: oa.APIError):
        return _json(e.body(), e.status, e.headers)

    @app.exception_handler(RouterError)
    async def _router_error(request: Request, e: RouterError):
        err = oa.from_router_error(e)
        if err.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e)
        return _json(err.body(), err.status)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            msg = located(None, None, f"no endpoint {request.method} {request.url.path}",
                          fix="see GET /v1/models, POST /v1/chat/completions, /v1/route, /v1/act")
            return _json(oa.APIError(404, msg, code="not_found").body(), 404)
        if e.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
            return _json(oa.APIError(405, msg, code="method_not_allowed").body(), 405, getattr(e, "headers", None))
        return _json(oa.APIError(e.status_code, str(e.detail)).body(), e.status_code, getattr(e, "headers", None))

    # ---- for people and probes ----------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.ready and state.engine is not None:
            e = state.engine
            return {"status": "ready", "router": e.router_version, "adapters": e.adapters,
                    "resident_adapters": e.pool.resident if e.pool is not None else None,
                    "queue_depth": state.batcher.depth if state.batcher else 0,
                    "last_reload_error": state.watcher.last_error if state.watcher else None}
        if state.load_error:
            return _json({"status": "failed", "error": state.load_error}, 503)
        return _json({"status": "loading"}, 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    # ---- OpenAI-compatible ---------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        engine = state.require_ready()
        return oa.model_list(engine.adapters, state.started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        state.require_ready()
        req = oa.parse_chat(oa.parse_json(await read_body(request, settings.max_body_bytes)), settings)
        state.check_model(req.model)
        state.check_prompt(req.item)
        image, raw = await state.open_ref(req.item.image)
        job = Job("act", image, req.item.prompt, req.item.adapter, req.gen)
        [action] = await state.run_jobs(request, [job])
        d = action_dict(action, forced=req.item.adapter is not None)
        state.decision("/v1/chat/completions", raw, req.item, req.model, d, started)
        vl = {k: v for k, v in d.items() if k != "text"}
        vl["router"] = state.engine.router_version if state.engine else None
        finish = state.finish_reason(action.text, req.gen.max_new_tokens)
        rid, created = oa.completion_id(), int(time.time())
        if req.stream:
            chunks = oa.chat_chunks(action.text, action.adapter, vl, finish_reason=finish, request_id=rid,
                                    created=created)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return oa.chat_completion(action.text, action.adapter, vl, finish_reason=finish, request_id=rid,
                                  created=created)

    # ---- vlrouter's own JSON --------------------------------------------------------------------

    async def _own(request: Request, act: bool):
        started = time.perf_counter()
        state.require_ready()
        req = oa.parse_own(oa.parse_json(await read_body(request, settings.max_body_bytes)), settings, act=act)
        for item in req.items:
            if item.adapter is not None:
                state.check_model(item.adapter)
            state.check_prompt(item)
        opened = [await state.open_ref(item.image) for item in req.items]
        jobs = [Job("act" if act else "route", image, item.prompt, item.adapter, req.gen)
                for item, (image, _) in zip(req.items, opened)]
        results = await state.run_jobs(request, jobs)
        endpoint = "/v1/act" if act else "/v1/route"
        out = []
        for item, (_, raw), result in zip(req.items, opened, results):
            d = action_dict(result, forced=item.adapter is not None) if act else route_dict(result)
            state.decision(endpoint, raw, item, item.adapter or oa.AUTO, d, started)
            out.append(d)
        if req.batch:
            return {"actions" if act else "routes": out}
        return out[0]

    @app.post("/v1/route")
    async def route(request: Request):
        return await _own(request, act=False)

    @app.post("/v1/act")
    async def act(request: Request):
        return await _own(request, act=True)

    # ---- operations ---------------------------------------------------------------------------------

    @app.post("/admin/reload")
    async def admin_reload():
        state.require_ready()
        assert state.watcher is not None
        try:
            result = await run_in_threadpool(state.watcher.reload_now)
        except StaleRouterError as e:
            raise oa.APIError(409, str(e), code="router_stale") from None
        except RouterError as e:
            raise oa.APIError(409, str(e), code="reload_failed") from None
        return result.to_dict()

    return app
