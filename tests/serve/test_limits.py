"""The server's limits: body and image size (413), a full queue (503 + Retry-After), a client that goes away
(its slot is freed), the request timeout (504), and remote image URLs when allowed.

A test makes the model busy by holding the engine's lock, as a long batch would.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serve/: serve_helpers
from serve_helpers import MAX_NEW, run_server  # noqa: E402

from vlrouter.serve import ServeSettings


@pytest.fixture(scope="module")
def strict(engine):
    settings = ServeSettings(max_batch_size=2, max_wait_ms=0, max_queue=3, max_body_bytes=64 * 1024,
                             max_image_bytes=32 * 1024, default_max_tokens=MAX_NEW, reload_interval_s=0,
                             allow_remote_images=True, retry_after_s=2)
    with run_server(engine, settings) as s:
        yield s


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _act(img, prompt) -> dict:
    return {"image": base64.b64encode(_png(img)).decode(), "prompt": prompt, "max_new_tokens": MAX_NEW}


def _wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_an_oversized_body_is_413_whether_declared_or_streamed(strict, items):
    big = {"image": "A" * 100_000, "prompt": "Click"}
    r = httpx.post(f"{strict.url}/v1/act", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "the request body is" in r.json()["error"]["message"] and "limit of 65,536" in r.json()["error"]["message"]
    chunks = (b"x" * 8192 for _ in range(12))  # no Content-Length: counted while reading
    r = httpx.post(f"{strict.url}/v1/act", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the server's limit of 65,536 bytes" in r.json()["error"]["message"]
    assert httpx.post(f"{strict.url}/v1/act", json=_act(*items[0])).status_code == 200


def test_an_oversized_image_is_413(strict):
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (110, 110, 3), dtype=np.uint8))
    data = _png(noise)
    assert 32 * 1024 < len(data) < 46 * 1024  # under the body limit once base64-encoded, over the image limit
    r = httpx.post(f"{strict.url}/v1/act", json={"image": base64.b64encode(data).decode(), "prompt": "Click"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    assert r.json()["error"]["param"] == "image" and "limit of 32,768" in r.json()["error"]["message"]


def test_a_full_queue_is_503_with_retry_after_and_the_waiting_requests_still_finish(strict, engine, items):
    state = strict.state
    with ThreadPoolExecutor(4) as pool, engine.lock:  # the model is busy
        first = pool.submit(httpx.post, f"{strict.url}/v1/act", json=_act(*items[0]), timeout=60)
        _wait_for(lambda: state.batcher.running == 1)  # taken by the worker, waiting for the model
        queued = [pool.submit(httpx.post, f"{strict.url}/v1/act", json=_act(*items[i]), timeout=60) for i in (1, 2, 3)]
        _wait_for(lambda: state.batcher.depth == 3)
        r = httpx.post(f"{strict.url}/v1/act", json=_act(*items[4]))
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "the request queue is full (3 of 3 waiting)" in err["message"]
        assert "--max-queue" in err["message"]
    answers = [f.result() for f in [first, *queued]]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["text"] for a in answers] == [engine.act(*items[i], MAX_NEW).text for i in range(4)]
    assert "vlrouter_queue_rejections_total 1" in httpx.get(f"{strict.url}/metrics").text


def test_a_client_that_disconnects_frees_its_queue_slot(strict, engine, items):
    state = strict.state
    cancelled = state.metrics.cancelled.values[()]
    with ThreadPoolExecutor(2) as pool:
        with engine.lock:
            first = pool.submit(httpx.post, f"{strict.url}/v1/act", json=_act(*items[0]), timeout=60)
            _wait_for(lambda: state.batcher.running == 1)
            with pytest.raises(httpx.ReadTimeout):  # gives up and closes the connection
                httpx.post(f"{strict.url}/v1/act", json=_act(*items[1]), timeout=httpx.Timeout(60, read=0.5))
            _wait_for(lambda: state.batcher.depth == 0)  # its slot is free while the model is still busy
            assert state.metrics.cancelled.values[()] == cancelled + 1
        assert first.result().status_code == 200
    assert httpx.post(f"{strict.url}/v1/act", json=_act(*items[1])).status_code == 200


def test_a_request_past_the_timeout_is_504_and_the_next_one_is_served(engine, items):
    with run_server(engine, ServeSettings(request_timeout_s=0.5, default_max_tokens=MAX_NEW,
                                          reload_interval_s=0)) as s:
        with engine.lock:
            r = httpx.post(f"{s.url}/v1/act", json=_act(*items[0]))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "request timeout of 0.5 s" in r.json()["error"]["message"]
        assert httpx.post(f"{s.url}/v1/act", json=_act(*items[0])).status_code == 200


@pytest.fixture
def image_host(tmp_path, items):
    """A plain HTTP server on loopback serving one screenshot (a stand-in for a remote image URL)."""
    items[2][0].save(tmp_path / "shot.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_remote_image_url_is_fetched_when_the_server_allows_it(strict, engine, items, image_host):
    def chat(url):
        return httpx.post(f"{strict.url}/v1/chat/completions", json={"model": "auto", "max_tokens": MAX_NEW,
                          "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                    {"type": "text", "text": items[2][1]}]}]})

    r = chat(f"{image_host}/shot.png")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == engine.act(*items[2], MAX_NEW).text
    missing = chat(f"{image_host}/nope.png")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
    assert "answered HTTP 404" in missing.json()["error"]["message"]
