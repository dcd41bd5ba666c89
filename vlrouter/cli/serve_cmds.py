"""``router serve``: load the engine once and serve it over HTTP (uvicorn), loopback by default."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from vlrouter.cli.app import app
from vlrouter.cli.options import DEFAULT_REGISTRY, DeviceOpt, RegistryOpt
from vlrouter.cli.ui import RichProgress, console, err_console, fail
from vlrouter.core.engine import Engine
from vlrouter.serve import ServeSettings, create_app

HostOpt = Annotated[str, typer.Option("--host", help="Address to bind; the loopback default is reachable only from "
                                      "this machine.")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="VLROUTER_API_KEY", show_envvar=True,
                                                  help="Require Authorization: Bearer KEY on every endpoint but "
                                                       "/healthz, /readyz and the page.")]
BatchOpt = Annotated[int, typer.Option("--max-batch-size", min=1, help="Most requests generated in one batch.")]
WaitOpt = Annotated[float, typer.Option("--max-wait-ms", min=0.0, help="How long a request waits for others to "
                                        "batch with.")]
QueueOpt = Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait for the model; beyond: 503.")]
BodyOpt = Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body (MiB); beyond: 413.")]
ImageOpt = Annotated[float, typer.Option("--max-image-mb", min=0.001, help="Largest decoded image (MiB); "
                                         "beyond: 413.")]
PromptTokOpt = Annotated[Optional[int], typer.Option(
    "--max-prompt-tokens", min=1, help="Longest instruction, in tokens; beyond: 400 (default: router.max_prompt_tokens "
                                       "in registry.yaml).")]
NewTokOpt = Annotated[int, typer.Option("--max-tokens-limit", min=1, help="Largest max_tokens a request may ask for.")]
TimeoutOpt = Annotated[float, typer.Option("--request-timeout", min=0.001, help="Seconds a request may wait and "
                                           "generate; beyond: 504.")]
RemoteOpt = Annotated[bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs (default: only "
                                         "data: URLs; the server would fetch any URL a client names).")]
ReloadOpt = Annotated[float, typer.Option("--reload-interval", min=0.0, help="Seconds between checks of the live "
                                          "router symlink (0: only POST /admin/reload).")]
DecisionLogOpt = Annotated[Optional[Path], typer.Option("--decision-log", help="Append every routing decision to "
                                                        "this JSONL file.")]
DecisionImagesOpt = Annotated[Optional[Path], typer.Option("--decision-images", help="Keep each decided screenshot "
                                                           "here, named by its sha256.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="uvicorn and vlrouter log level (debug, info, warning).")]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve_cmd(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    max_batch_size: BatchOpt = 8,
    max_wait_ms: WaitOpt = 10.0,
    max_queue: QueueOpt = 64,
    max_body_mb: BodyOpt = 20.0,
    max_image_mb: ImageOpt = 10.0,
    max_prompt_tokens: PromptTokOpt = None,
    max_tokens_limit: NewTokOpt = 1024,
    request_timeout: TimeoutOpt = 120.0,
    allow_remote_images: RemoteOpt = False,
    reload_interval: ReloadOpt = 1.0,
    decision_log: DecisionLogOpt = None,
    decision_images: DecisionImagesOpt = None,
    device: DeviceOpt = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve the router over HTTP: OpenAI-compatible /v1/chat/completions, /v1/route, /v1/act, a page at /."""
    import uvicorn

    settings = ServeSettings(
        api_key=api_key or None, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
        max_body_bytes=int(max_body_mb * 2 ** 20), max_image_bytes=int(max_image_mb * 2 ** 20),
        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_tokens_limit,
        default_max_tokens=min(64, max_tokens_limit), request_timeout_s=request_timeout,
        allow_remote_images=allow_remote_images, reload_interval_s=reload_interval, decision_log=decision_log,
        decision_images=decision_images)
    if not _is_loopback(host) and settings.api_key is None:
        err_console.print(f"[yellow]warning:[/] serving on {escape(host)} without an API key: anyone who can reach "
                          "this address can use the model (fix: --api-key KEY or VLROUTER_API_KEY)")
    with RichProgress().task("loading base model, adapters and router") as t:
        engine = Engine.from_registry(registry, device=device)
        t.advance()
    application = create_app(engine, settings)
    level = log_level.lower()
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = f"[{host}]" if ":" in host else host
    console.print(f"vlrouter: router {escape(str(engine.router_version))}; adapters "
                  f"{escape(', '.join(engine.adapters))}")
    console.print(f"serving on http://{escape(shown)}:{port}  (page: /, OpenAI base_url: http://{escape(shown)}:{port}"
                  f"/v1{', API key required' if settings.api_key else ''}; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level=level,
                                           access_log=level == "debug", timeout_graceful_shutdown=10))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C: the normal way to stop
        pass
    except SystemExit:  # uvicorn exits when it cannot bind; its log line above says why
        if server.started:
            raise
    if not server.started:
        fail(f"could not serve on {host}:{port} (the log above says why; fix: choose another --port or --host, or "
             "stop what is using it)")
    console.print("stopped")
