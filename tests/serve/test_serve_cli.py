"""`router serve` as a user runs it: a real process, loopback, an API key from the environment, Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from vlrouter.cli.app import app
from vlrouter.client import RouterClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
import engine_helpers as H  # noqa: E402

ROUTER = str(Path(sys.executable).parent / "router")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_router_serve_answers_on_loopback_with_the_key_and_stops_on_ctrl_c(serve_project, engine, tmp_path):
    port = _free_port()
    log = tmp_path / "decisions.jsonl"
    env = {**os.environ, "VLROUTER_API_KEY": "cli-key", "VLROUTER_PROGRESS": "0", "VLROUTER_DEBUG": ""}
    proc = subprocess.Popen([ROUTER, "serve", "--registry", str(serve_project), "--port", str(port), "--device", "cpu",
                             "--max-batch-size", "4", "--decision-log", str(log), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router serve did not become ready"
            time.sleep(0.2)
        img, prompt, _ = H.samples()[0]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # the key came from the env
        action = RouterClient(f"http://127.0.0.1:{port}", api_key="cli-key").act(img, prompt, max_new_tokens=4)
        want = engine.act(img, prompt, max_new_tokens=4)
        assert (action.adapter, action.text) == (want.adapter, want.text)
        assert log.read_text().count("\n") == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert f"serving on http://127.0.0.1:{port}" in out and "API key required" in out
    assert "Traceback" not in err


def test_router_serve_with_a_broken_registry_is_one_error_line(tmp_path):
    (tmp_path / "registry.yaml").write_text("base_model: x\nrouter:\n  colour: blue\nadapters: []\n")
    res = CliRunner().invoke(app, ["serve", "--registry", str(tmp_path / "registry.yaml")],
                             env={"VLROUTER_DEBUG": "", "COLUMNS": "200", "VLROUTER_PROGRESS": "0"})
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "colour" in lines[0]
