"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread, stopped at the end."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

API_KEY = "test-key"
MAX_NEW = 4  # tokens per answer: small, the tests are about the server


@dataclass
class Server:
    url: str
    app: object
    uvicorn: object

    @property
    def state(self):
        return self.app.state.vlrouter


@contextmanager
def run_server(engine_or_registry, settings=None, *, ready_timeout: float = 120.0,
               wait_ready: bool = True) -> Iterator[Server]:
    """uvicorn serving ``create_app(engine_or_registry, settings)`` on 127.0.0.1, a free port, in a thread.

    Yields once uvicorn listens and (with ``wait_ready``) the engine is loaded and serving.
    """
    import uvicorn

    from vlrouter.serve import ServeSettings, create_app

    app = create_app(engine_or_registry, settings or ServeSettings())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not (server.started and (app.state.vlrouter.ready or not wait_ready)):
        if not thread.is_alive() or time.monotonic() > deadline or (wait_ready and app.state.vlrouter.load_error):
            server.should_exit = True
            raise RuntimeError(f"server did not start: {app.state.vlrouter.load_error}")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
