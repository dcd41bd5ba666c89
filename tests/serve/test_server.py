"""`router serve` end to end: a real uvicorn server on loopback, called with openai, RouterClient and raw HTTP.

Every answer is compared with the in-process Engine's for the same input: the text, the
adapter that generated and the routed one exactly, the probabilities to 1e-4 (batched
routing pads rows, which moves the last float digits).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serve/: serve_helpers
import engine_helpers as H  # noqa: E402
from serve_helpers import API_KEY, MAX_NEW, run_server  # noqa: E402

from vlrouter.client import RouterClient
from vlrouter.core.actions import UIAction
from vlrouter.core.engine import Engine
from vlrouter.core.errors import UnknownAdapterError
from vlrouter.core.results import Action, Route
from vlrouter.serve import ServeSettings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(img)).decode()


def _chat(img, prompt, model="auto", **kw) -> dict:
    return {"model": model, "max_tokens": MAX_NEW, **kw, "messages": [
        {"role": "system", "content": "You operate a GUI."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                                     {"type": "text", "text": prompt}]}]}


def _openai(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, **kw)


@pytest.fixture(scope="module")
def expected(engine, items) -> list[Action]:
    """What the in-process engine answers, one call at a time."""
    return [engine.act(img, prompt, max_new_tokens=MAX_NEW) for img, prompt in items]


def _assert_same(got: dict, want: Action) -> None:
    assert (got["adapter"], got["routed"], got["fallback"]) == (want.adapter, want.routed, want.fallback)
    assert got["probs"] == pytest.approx(want.probs, abs=1e-4)
    assert got["confidence"] == pytest.approx(want.confidence, abs=1e-4)


# ---- the three ways in: openai, RouterClient, raw HTTP ------------------------------------------

def test_the_openai_client_gets_the_engines_answers(server, engine, items, expected):
    client = _openai(server)
    for (img, prompt), want in zip(items, expected):
        resp = client.chat.completions.create(**_chat(img, prompt))
        assert resp.object == "chat.completion" and resp.model == want.adapter
        assert resp.choices[0].message.content == want.text and resp.choices[0].message.role == "assistant"
        assert resp.choices[0].finish_reason in ("stop", "length")
        vl = resp.vlrouter  # the extra object rides along in openai's models
        _assert_same({**vl, "text": resp.choices[0].message.content}, want)
        assert {"ood_score", "known", "action", "timings", "forced"} <= set(vl) and vl["forced"] is False
        assert vl["action"] == (None if want.action is None else {"name": want.action.name, "args": want.action.args,
                                                                   "call": str(want.action)})
    assert [m.id for m in client.models.list()] == ["auto", "base", *engine.adapters]


def test_model_forces_an_adapter_or_the_base_and_stream_sends_the_same_text(server, engine, items, expected):
    client = _openai(server)
    img, prompt = items[0]
    for model in ("claim-window", "base"):
        resp = client.chat.completions.create(**_chat(img, prompt, model=model))
        assert resp.model == model
        assert resp.choices[0].message.content == engine.act(img, prompt, MAX_NEW, adapter=model).text
        assert resp.vlrouter["forced"] is True and resp.vlrouter["probs"] == {}
    chunks = list(client.chat.completions.create(**_chat(img, prompt), stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].model == expected[0].adapter
    assert chunks[-1].vlrouter["routed"] == expected[0].routed
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(img, prompt, stream=True), headers=AUTH)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_router_client_returns_the_engines_route_and_action_types(server, engine, items, expected, tmp_path):
    client = RouterClient(server.url, api_key=API_KEY)
    img, prompt = items[0]
    route = client.route(img, prompt)
    want = engine.route(img, prompt)
    assert isinstance(route, Route) and route.adapter == want.adapter
    assert route.probs == pytest.approx(want.probs, abs=1e-4)
    path = tmp_path / "shot.png"
    items[1][0].save(path)
    for source in (path, str(path), _png(items[1][0]), items[1][0]):  # a path, a str, bytes, a PIL image
        a = client.act(source, items[1][1], max_new_tokens=MAX_NEW)
        assert isinstance(a, Action) and (a.adapter, a.routed, a.text) == (expected[1].adapter, expected[1].routed,
                                                                            expected[1].text)
        assert a.action is None or isinstance(a.action, UIAction)
    batch = client.act_batch(items, max_new_tokens=MAX_NEW)
    assert [(a.adapter, a.routed, a.text, a.action) for a in batch] == \
           [(a.adapter, a.routed, a.text, a.action) for a in expected]
    forced = client.act_batch(items[:2], max_new_tokens=MAX_NEW, adapters=["base", None])
    assert [a.adapter for a in forced] == ["base", expected[1].adapter]
    assert forced[0].text == engine.act(*items[0], MAX_NEW, adapter="base").text
    assert [r.adapter for r in client.route_batch(items)] == [a.routed for a in expected]
    assert client.models() == ["auto", "base", *engine.adapters]
    with pytest.raises(UnknownAdapterError, match="'calender' does not exist.*calendar"):
        client.act(img, prompt, adapter="calender")


def test_raw_http_route_and_act_carry_the_engines_dict_fields(server, engine, items, expected):
    img, prompt = items[2]
    b64 = base64.b64encode(_png(img)).decode()
    r = httpx.post(f"{server.url}/v1/route", json={"image": b64, "prompt": prompt}, headers=AUTH)
    want = engine.route(img, prompt).to_dict()
    assert r.status_code == 200 and set(want) <= set(r.json()) and r.json()["adapter"] == want["adapter"]
    r = httpx.post(f"{server.url}/v1/act", json={"image": b64, "prompt": prompt, "max_new_tokens": MAX_NEW},
                   headers=AUTH)
    got = r.json()
    assert r.status_code == 200 and set(expected[2].to_dict()) <= set(got)
    _assert_same(got, expected[2])
    assert got["text"] == expected[2].text
    r = httpx.post(f"{server.url}/v1/act", headers=AUTH, json={"max_new_tokens": MAX_NEW, "items": [
        {"image": base64.b64encode(_png(i)).decode(), "prompt": p} for i, p in items]})
    assert [a["text"] for a in r.json()["actions"]] == [a.text for a in expected]


# ---- batching under load --------------------------------------------------------------------------------

def test_eight_concurrent_clients_get_the_sequential_answers_in_shared_batches(server, items, expected):
    clients, calls, limit_s = 8, 25, 120
    bodies = [json.dumps(_chat(img, prompt)).encode() for img, prompt in items]
    answers: list[tuple[int, int, str, str]] = []
    errors: list[str] = []
    start = threading.Barrier(clients)
    deadline = time.monotonic() + limit_s

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=60) as http:
            start.wait()
            for j in range(calls):
                if time.monotonic() > deadline:
                    errors.append(f"client {k}: over the {limit_s} s limit")
                    return
                idx = (j + k) % len(items)
                r = http.post("/v1/chat/completions", content=bodies[idx])
                if r.status_code != 200:
                    errors.append(f"client {k}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                d = r.json()
                answers.append((idx, r.status_code, d["model"], d["choices"][0]["message"]["content"]))

    before = _batch_stats(server)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit_s + 30)
    assert not errors, errors[:5]
    assert len(answers) == clients * calls
    for idx, _, model, text in answers:
        assert (model, text) == (expected[idx].adapter, expected[idx].text)
    rows, batches = (a - b for a, b in zip(_batch_stats(server), before))
    assert rows / batches > 1.5, f"{rows} rows in {batches} engine calls: requests were not batched"


def _batch_stats(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    total = float(re.search(r"^vlrouter_batch_size_sum (\S+)$", text, re.MULTILINE).group(1))
    count = float(re.search(r"^vlrouter_batch_size_count (\S+)$", text, re.MULTILINE).group(1))
    return total, count


# ---- generation settings ------------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_stop_cuts_the_text_like_openai(server, engine, items):
    import torch

    img, prompt = items[0]

    def post(**kw) -> dict:
        return httpx.post(f"{server.url}/v1/chat/completions", json=_chat(img, prompt, **kw), headers=AUTH).json()

    for seed in range(20):  # a seed whose sample has a printable character to stop at
        text = post(temperature=1.0, seed=seed, max_tokens=12)["choices"][0]["message"]["content"]
        stop = next((c for c in text[1:] if c.isalnum()), None)
        if stop:
            break
    assert stop, "no sample with a printable character in 20 seeds"
    assert post(temperature=1.0, seed=seed, max_tokens=12)["choices"][0]["message"]["content"] == text
    with engine.lock:  # the same draw in process
        torch.manual_seed(seed)
        assert engine.act(img, prompt, 12, do_sample=True, temperature=1.0).text == text
    cut = post(temperature=1.0, seed=seed, max_tokens=12, stop=[stop, "never"])
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    greedy = post(temperature=0, seed=seed)["choices"][0]["message"]["content"]
    assert greedy == engine.act(img, prompt, MAX_NEW).text  # seed means nothing without sampling


# ---- health, metrics, decision log ----------------------------------------------------------------------

def test_health_readiness_and_metrics(server, engine):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}  # no key needed
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["adapters"] == engine.adapters
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    r = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("vlrouter_requests_total{", "vlrouter_request_duration_seconds_bucket{", "vlrouter_routes_total{",
                 "vlrouter_fallbacks_total ", "vlrouter_unknown_total ", "vlrouter_batch_size_bucket{",
                 "vlrouter_queue_depth ", "vlrouter_cancelled_total ", "vlrouter_queue_rejections_total "):
        assert name in r.text, name
    assert re.search(r'vlrouter_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', r.text)


def test_every_decision_is_logged_as_a_jsonl_line(server, items):
    img, prompt = items[3]
    httpx.post(f"{server.url}/v1/chat/completions", json=_chat(img, prompt), headers=AUTH).raise_for_status()
    lines = server.state.settings.decision_log.read_text().splitlines()
    entry = json.loads(lines[-1])
    assert entry["image_sha256"] == hashlib.sha256(_png(img)).hexdigest() and entry["prompt"] == prompt
    for key in ("time", "routed", "confidence", "ood_score", "known", "adapter", "action", "latency_ms", "model"):
        assert key in entry
    assert entry["endpoint"] == "/v1/chat/completions" and entry["model"] == "auto"


# ---- bad requests: the right 4xx with a clear message, and the server keeps serving -----------------------

def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


REAL_B64 = base64.b64encode(_png(H.screen("calendar"))).decode()
REAL_URL = "data:image/png;base64," + REAL_B64


def _with_image_url(url: str) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Click March 29"}]}]}


BAD = {  # id: (path, body or raw bytes, status, code, words in the message)
    "malformed-json": ("/v1/chat/completions", b'{"model": "auto", "messages": [', 400, "invalid_json",
                       "not valid JSON"),
    "no-image": ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Click March 29"}]}]}, 400, "missing_image", "messages[0].content: no image"),
    "text-only-content": ("/v1/chat/completions", {"model": "auto", "messages": [
        {"role": "user", "content": "Click March 29"}]}, 400, "missing_image", "no image: the content is plain text"),
    "two-images": ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Click"}]}]}, 400, "too_many_images", "2 images"),
    "non-image-data-url": ("/v1/chat/completions", _with_image_url("data:text/plain;base64,aGVsbG8="), 400,
                           "invalid_image", "media type 'text/plain', not a PNG, JPEG or WebP"),
    "image-bytes-that-are-not-an-image": ("/v1/chat/completions", _with_image_url(
        "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()), 400, "invalid_image",
        "not a PNG, JPEG or WebP file"),
    "decompression-bomb": ("/v1/chat/completions", _with_image_url(
        "data:image/png;base64," + base64.b64encode(_bomb_png()).decode()), 400, "invalid_image",
        "refused before decoding"),
    "remote-url": ("/v1/chat/completions", _with_image_url("https://example.com/screen.png"), 400,
                   "remote_image_refused", "remote image URLs are refused"),
    "unknown-model": ("/v1/chat/completions", {**_with_image_url(REAL_URL), "model": "calender"},
                      404, "model_not_found", "'calender' does not exist (fix: one of auto, base, calendar"),
    "no-user-message": ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "system", "content": "x"}]},
                        400, "invalid_request", "no user message"),
    "max-tokens-over-the-limit": ("/v1/chat/completions", {**_with_image_url(REAL_URL),
                                                           "max_tokens": 100000}, 400, "invalid_request",
                                  "max_tokens: must be an integer in [1, 1024]"),
    "temperature-out-of-range": ("/v1/chat/completions", {**_with_image_url(REAL_URL),
                                                          "temperature": 7}, 400, "invalid_request", "temperature"),
    "own-act-without-prompt": ("/v1/act", {"image": "AAAA"}, 400, "missing_prompt", "prompt is missing or empty"),
    "own-act-bad-base64": ("/v1/act", {"image": "not base64!", "prompt": "Click"}, 400, "invalid_image",
                           "not valid base64"),
    "prompt-over-the-token-limit": ("/v1/act", {"image": REAL_B64, "prompt": "click " * 800}, 400,
                                    "context_length_exceeded", "tokens, over the server's limit of 4096"),
    "unknown-endpoint": ("/v1/embeddings", {}, 404, "not_found", "no endpoint POST /v1/embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(server, items, case):
    path, body, status, code, words = BAD[case]
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}{path}", headers={**AUTH, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert words in err["message"] and "\n" not in err["message"] and "Traceback" not in r.text
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(*items[0]), headers=AUTH)
    assert ok.status_code == 200


def test_a_wrong_or_missing_api_key_is_401_except_for_health(server, items):
    body = _chat(*items[0])
    for headers, words in (({}, "missing API key"), ({"Authorization": "Bearer nope"}, "incorrect API key")):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and words in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/").status_code == 200  # the page is static; it asks for the key


def test_an_unexpected_error_is_a_one_line_500_and_the_server_keeps_serving(server, engine, items, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line of a long story")

    monkeypatch.setattr(engine, "act_batch", broken)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(*items[0]), headers=AUTH)
    monkeypatch.undo()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["message"].startswith("unexpected RuntimeError: boom (the server logged the traceback")
    assert "second line" not in r.text and "Traceback" not in r.text
    assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat(*items[0]), headers=AUTH).status_code == 200


def test_low_confidence_with_fallback_error_is_422_with_the_librarys_message(engine, items):
    strict = Engine(engine.model, engine.processor, engine.head, engine.meta.model_copy(update={"temperature": 50.0}),
                    plugin_manager=engine.plugin_manager, min_confidence=1.0, fallback="error")
    with run_server(strict, ServeSettings(default_max_tokens=MAX_NEW, reload_interval_s=0)) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=_chat(*items[0]))
        assert r.status_code == 422 and r.json()["error"]["code"] == "low_confidence"
        assert "below router.min_confidence=1.0 and router.fallback is 'error' (fix:" in r.json()["error"]["message"]
        forced = httpx.post(f"{s.url}/v1/chat/completions", json=_chat(*items[0], model="calendar"))
        assert forced.status_code == 200  # a forced adapter never falls back


# ---- an app built from a registry path (loads in the background) ----------------------------------------

def test_an_app_built_from_a_registry_loads_in_the_background_and_says_when_it_is_ready(serve_project, items,
                                                                                          expected):
    with run_server(serve_project, ServeSettings(default_max_tokens=MAX_NEW, reload_interval_s=0)) as s:
        assert httpx.get(f"{s.url}/readyz").json()["status"] == "ready"
        r = httpx.post(f"{s.url}/v1/chat/completions", json=_chat(*items[0]))
        assert r.json()["choices"][0]["message"]["content"] == expected[0].text


def test_an_app_whose_registry_does_not_load_stays_up_and_says_why(tmp_path, items):
    missing = tmp_path / "nope" / "registry.yaml"
    with run_server(missing, ServeSettings(reload_interval_s=0), wait_ready=False) as s:
        url = s.url
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "registry file not found" in ready.json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        r = httpx.post(f"{url}/v1/chat/completions", json=_chat(*items[0]))
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
        assert "registry file not found" in r.json()["error"]["message"]
