"""Reload without restart: a router promoted while clients send requests is picked up, and no request fails."""

from __future__ import annotations

import base64
import io
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serve/: serve_helpers
import engine_helpers as H  # noqa: E402
from serve_helpers import MAX_NEW, run_server  # noqa: E402

from vlrouter.core.engine import Engine
from vlrouter.serve import ServeSettings

NEW = "settings-toggle"
CKS = {n: f"checkpoints/{n}" for n in H.NAMES}


def _act_body(img, prompt) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": prompt, "max_new_tokens": MAX_NEW}


@pytest.fixture
def project(serve_project, tiny_model_dir, tmp_path):
    """A private copy of the served project, with a fourth LoRA checkpoint not registered yet."""
    root = tmp_path / "p"
    shutil.copytree(serve_project.parent, root, symlinks=True)
    H.make_lora_adapters(tiny_model_dir, root / "checkpoints", [NEW], seed=7)
    return root / "registry.yaml"


def test_a_router_promoted_under_load_is_served_without_a_failed_request(project, tiny_encoder):
    engine = Engine.from_registry(project, device="cpu")
    work = [(img, prompt) for img, prompt, _ in H.samples([*H.NAMES, NEW])]
    bodies = [_act_body(img, prompt) for img, prompt in work]
    results: list[tuple[float, float, int, int, dict]] = []  # (sent at, answered at, item, status, answer)
    stop = threading.Event()
    settings = ServeSettings(max_batch_size=4, max_wait_ms=5, reload_interval_s=0.1, default_max_tokens=MAX_NEW)
    with run_server(engine, settings) as server:
        def client(k: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                j = k
                while not stop.is_set():
                    idx = j % len(bodies)
                    sent = time.monotonic()
                    r = http.post("/v1/act", json=bodies[idx])
                    results.append((sent, time.monotonic(), idx, r.status_code, r.json()))
                    j += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            promoting = time.monotonic()
            H.promote_router(project, {**CKS, NEW: f"checkpoints/{NEW}"}, encoder=tiny_encoder)  # as add-adapter does
            deadline = time.monotonic() + 60
            while NEW not in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]:
                assert time.monotonic() < deadline, "the promoted router was not picked up"
                time.sleep(0.05)
            swapped = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        models = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        reloads = httpx.get(f"{server.url}/metrics").text
    failed = [(status, answer) for *_, status, answer in results if status != 200]
    assert not failed, failed[:3]
    before = [r for r in results if r[1] < promoting]  # answered before the promotion began: the old router
    after = [r for r in results if r[0] > swapped]  # sent once /v1/models listed the new adapter
    assert before and after
    assert models == ["auto", "base", *H.NAMES, NEW]
    assert 'vlrouter_reloads_total{result="ok"} 1' in reloads
    fresh = Engine.from_registry(project, device="cpu")  # what a restart would serve
    want = [fresh.act(img, prompt, MAX_NEW) for img, prompt in work]
    for _, _, idx, _, answer in after:
        assert set(answer["probs"]) == {*H.NAMES, NEW}
        assert (answer["adapter"], answer["text"]) == (want[idx].adapter, want[idx].text)
    assert all(set(answer["probs"]) == set(H.NAMES) for *_, answer in before)
    assert NEW in {answer["adapter"] for *_, answer in after}  # the new adapter's LoRA really generates


def test_admin_reload_forces_it_and_a_stale_promotion_keeps_the_old_router(project, tiny_encoder, items):
    engine = Engine.from_registry(project, device="cpu")
    settings = ServeSettings(reload_interval_s=0, default_max_tokens=MAX_NEW, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with run_server(engine, settings) as server:
        H.promote_router(project, {**CKS, NEW: f"checkpoints/{NEW}"}, encoder=tiny_encoder, update_registry=False)
        r = httpx.post(f"{server.url}/admin/reload", headers=auth)  # registry.yaml not saved yet: stale
        assert r.status_code == 409 and r.json()["error"]["code"] == "router_stale"
        assert "the adapter set differs" in r.json()["error"]["message"]
        ok = httpx.post(f"{server.url}/v1/act", json=_act_body(*items[0]), headers=auth)
        assert ok.status_code == 200 and set(ok.json()["probs"]) == set(H.NAMES)
        H.write_registry(project.parent, engine.base_model.name_or_path, {**CKS, NEW: f"checkpoints/{NEW}"})
        assert httpx.post(f"{server.url}/admin/reload").status_code == 401
        r = httpx.post(f"{server.url}/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["added"] == [NEW] and r.json()["adapters"] == [*H.NAMES, NEW]
        assert httpx.get(f"{server.url}/readyz").json()["adapters"] == [*H.NAMES, NEW]
