"""Fixtures for the server tests: one engine over the tiny model, and the main server (real uvicorn, loopback)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serve/: serve_helpers
import engine_helpers as H  # noqa: E402
from serve_helpers import API_KEY, MAX_NEW, Server, run_server  # noqa: E402


@pytest.fixture(scope="session")
def serve_project(tmp_path_factory, tiny_model_dir, tiny_encoder) -> Path:
    return H.make_project(tmp_path_factory.mktemp("serve-project"), tiny_model_dir, encoder=tiny_encoder)


@pytest.fixture(scope="session")
def engine(serve_project):
    from vlrouter.core.engine import Engine

    return Engine.from_registry(serve_project, device="cpu")


@pytest.fixture(scope="session")
def items():
    """(image, prompt) pairs: two per adapter."""
    return [(img, prompt) for img, prompt, _ in H.samples()]


@pytest.fixture(scope="session")
def server(engine, tmp_path_factory) -> Iterator[Server]:
    """The main server: an API key, batches of up to 8 gathered over 20 ms, a decision log."""
    from vlrouter.serve import ServeSettings

    log = tmp_path_factory.mktemp("decisions") / "decisions.jsonl"
    settings = ServeSettings(api_key=API_KEY, max_batch_size=8, max_wait_ms=20, max_queue=64,
                             default_max_tokens=MAX_NEW, reload_interval_s=0, decision_log=log)
    with run_server(engine, settings) as s:
        yield s
