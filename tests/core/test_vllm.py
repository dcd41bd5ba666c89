"""engine.generation: vllm -- routing in-process on the base model, generation on a (stand-in) vLLM server."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers, vllm_standin
import engine_helpers as H
from vllm_standin import StandIn, free_port, run_standin, standin_text

from vlrouter.core.engine import Engine
from vlrouter.core.errors import GenerationServerError, GenerationTimeout, RegistryError, UnknownAdapterError
from vlrouter.core.images import open_image
from vlrouter.core.registry import Registry
from vlrouter.core.vllm import VLLMClient, sync_adapter

MAX_NEW = 6


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_encoder):
    """The three adapters + a router; registry.yaml generates locally."""
    root = tmp_path_factory.mktemp("vllm-project")
    return H.make_project(root, tiny_model_dir, encoder=tiny_encoder)


@pytest.fixture(scope="module")
def local(project):
    return Engine.from_registry(project, device="cpu")


@pytest.fixture(scope="module")
def items():
    return [(img, prompt) for img, prompt, _ in H.samples()]


def _vllm_registry(project: Path, url: str, name: str = "vllm.yaml", **engine) -> Path:
    lines = ["engine:", "  generation: vllm", f"  vllm_url: {url}"] + [f"  {k}: {v}" for k, v in engine.items()]
    path = project.parent / name
    path.write_text(project.read_text() + "\n".join(lines) + "\n")
    return path


def _served(project: Path) -> dict[str, str]:
    reg = Registry.load(project)
    return {a.name: str(reg.resolve(a.checkpoint)) for a in reg.adapters}


@pytest.fixture(scope="module")
def standin(project):
    with run_standin(StandIn(loras=_served(project))) as s:
        yield s


@pytest.fixture(scope="module")
def remote(project, standin):
    return Engine.from_registry(_vllm_registry(project, standin.url), device="cpu")


def _lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_routing_stays_in_process_and_no_lora_weights_are_loaded(remote, local, items):
    assert remote.pool is None and not hasattr(remote.model, "peft_config") and _lora_params(remote.model) == 0
    assert type(remote.model).__name__ == "Qwen3VLForConditionalGeneration"
    for img, prompt in items:
        a, b = remote.route(img, prompt), local.route(img, prompt)
        assert a.adapter == b.adapter and a.probs == pytest.approx(b.probs, abs=1e-5)


def test_act_sends_the_screenshot_and_instruction_to_the_routed_adapter(remote, local, standin, items):
    standin.requests.clear()
    standin.images.clear()
    for img, prompt in items:
        action = remote.act(img, prompt, max_new_tokens=MAX_NEW)
        assert action.adapter == local.route(img, prompt).adapter
        assert action.text == standin_text(action.adapter, prompt)
        assert action.action is not None and action.action.name == "click"  # the adapter's plugin parsed it
    assert not standin.violations
    bodies = [r["body"] for r in standin.requests if r["path"] == "/v1/chat/completions"]
    assert len(bodies) == len(items)
    for body, (_, prompt) in zip(bodies, items):
        parts = body["messages"][-1]["content"]
        assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == prompt
        assert body["max_tokens"] == MAX_NEW and body["temperature"] == 0.0 and body["n"] == 1
    for sent, (img, _) in zip(standin.images, items):  # lossless: the pixels the router saw
        assert sent.convert("RGB").tobytes() == open_image(img).tobytes()


def test_act_batch_base_fallback_and_sampling_settings(remote, standin, items):
    standin.requests.clear()
    forced = ["base", "calendar", None, "provider-select", None, "claim-window"]
    actions = remote.act_batch(items, max_new_tokens=MAX_NEW, adapters=forced)
    for a, (_, prompt), f in zip(actions, items, forced):
        model = standin.base if a.adapter == "base" else a.adapter
        assert a.text == standin_text(model, prompt) and (f is None or a.adapter == f)
    assert sorted(r["body"]["model"] for r in standin.requests) == sorted(
        standin.base if a.adapter == "base" else a.adapter for a in actions)
    standin.requests.clear()
    remote.act(*items[0], max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9)
    body = standin.requests[-1]["body"]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 3)
    assert not standin.violations


def test_a_server_that_is_down_is_a_located_error_naming_engine_vllm_url(project, items):
    url = f"http://127.0.0.1:{free_port()}"
    engine = Engine.from_registry(_vllm_registry(project, url, "down.yaml"), device="cpu")
    t0 = time.perf_counter()
    with pytest.raises(GenerationServerError, match=rf"down\.yaml:\d+: engine\.vllm_url: vLLM at {url}: cannot "
                                                    r"connect .*\(fix: start the vLLM server"):
        engine.act(*items[0], max_new_tokens=MAX_NEW)
    assert time.perf_counter() - t0 < 5
    assert engine.route(*items[0]).adapter  # routing does not need the server


def test_an_adapter_the_server_does_not_serve_is_a_located_error_with_the_fix(project, items):
    with run_standin(StandIn(loras={"calendar": "/x"})) as s:
        engine = Engine.from_registry(_vllm_registry(project, s.url, "partial.yaml"), device="cpu")
        with pytest.raises(GenerationServerError, match=r"partial\.yaml:\d+: engine\.vllm_url: .*does not serve "
                                                        r"adapter 'claim-window'.*--lora-modules claim-window=PATH"):
            engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="claim-window")
        assert engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="calendar").text
        with pytest.raises(UnknownAdapterError):  # not the router's: refused before any request
            engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="nope")
        s.loras["claim-window"] = "/y"  # loaded on the server since (another process, a restart with --lora-modules)
        assert engine.act(*items[0], max_new_tokens=MAX_NEW, adapter="claim-window").adapter == "claim-window"
        assert not s.violations


@pytest.mark.parametrize("body", [{"error": {"message": "x " * 400}}, {"message": "x " * 400},
                                  {"detail": "x " * 400}], ids=["current", "older", "detail"])
def test_a_long_vllm_error_message_is_cut_to_300_characters_on_one_line(body):
    from types import SimpleNamespace

    from vlrouter.core.vllm import _message

    msg = _message(SimpleNamespace(json=lambda: body, text="", status_code=400))
    assert msg == ("x " * 150)[:300] and len(msg) == 300


def test_a_slow_server_times_out_and_an_error_answer_is_reported(project, items):
    with run_standin(StandIn(loras=_served(project), delay_s=3.0)) as s:
        engine = Engine.from_registry(_vllm_registry(project, s.url, "slow.yaml", vllm_timeout=0.5), device="cpu")
        t0 = time.perf_counter()
        with pytest.raises(GenerationTimeout, match=r"no answer to POST /v1/chat/completions within 0\.5 s "
                                                    r"\(fix: raise engine\.vllm_timeout"):
            engine.act(*items[0], max_new_tokens=MAX_NEW)
        assert time.perf_counter() - t0 < 3
        s.delay_s, s.fail_status = 0.0, 500
        with pytest.raises(GenerationServerError, match=r"answered HTTP 500: CUDA out of memory \(stand-in\)"):
            engine.act(*items[0], max_new_tokens=MAX_NEW)


def test_the_registry_needs_a_url_for_vllm_generation(tmp_path):
    p = tmp_path / "registry.yaml"
    p.write_text("base_model: x\nengine:\n  generation: vllm\nadapters: []\n")
    with pytest.raises(RegistryError, match=r"registry.yaml:\d+: engine.vllm_url: required when engine.generation is "
                                            r"vllm .*\(fix: write the vLLM server's address"):
        Registry.load(p)


def test_runtime_lora_updates_load_and_unload_adapters(project, tmp_path, tiny_model_dir):
    ck = H.make_lora_adapters(tiny_model_dir, tmp_path / "ck", ["settings-toggle"])["settings-toggle"]
    with run_standin(StandIn(loras=_served(project), runtime_updates=True)) as s:
        client = VLLMClient(s.url + "/v1")  # a trailing /v1 is the same server
        assert "settings-toggle" not in client.served()
        msg = client.load_lora("settings-toggle", client.lora_path("settings-toggle", ck))
        assert msg.startswith("loaded adapter 'settings-toggle'") and s.loras["settings-toggle"] == str(ck.resolve())
        assert client.model_for("settings-toggle") == "settings-toggle"
        assert "already serves" in client.load_lora("settings-toggle", str(ck))
        with pytest.raises(GenerationServerError, match="refused to load adapter 'x' .*HTTP 404: No adapter found"):
            client.load_lora("x", str(tmp_path / "missing"))
        assert client.unload_lora("settings-toggle").startswith("unloaded")
        assert "did not serve" in client.unload_lora("settings-toggle")
        assert not s.violations
    refused = r"does not allow runtime LoRA updates .*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
    with run_standin(StandIn(runtime_updates=False)) as s, pytest.raises(GenerationServerError, match=refused):
        VLLMClient(s.url).load_lora("settings-toggle", str(ck))


def test_add_and_remove_adapter_load_and_unload_it_on_the_vllm_server(project, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    import vlrouter.cli.main  # noqa: F401  (attaches every command)
    from vlrouter.cli.app import app

    root = tmp_path / "p"
    H.make_lora_adapters(tiny_model_dir, root / "served", ["settings-toggle"])  # where "the server" sees it
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text("")
    reg = root / "registry.yaml"
    base = project.read_text().replace("checkpoints/", str(project.parent / "checkpoints") + "/")
    add = ["add-adapter", "settings-toggle", "--no-retrain", "--dataset", str(root / "data/train.jsonl"),
           "--checkpoint", str(project.parent / "checkpoints/calendar"), "--registry", str(reg)]
    with run_standin(StandIn(loras=_served(project), runtime_updates=True)) as s:
        reg.write_text(base + f"engine:\n  generation: vllm\n  vllm_url: {s.url}\n  vllm_lora_dir: served\n")
        res = CliRunner().invoke(app, add)
        assert res.exit_code == 0, res.output
        assert "loaded adapter 'settings-toggle' into vLLM" in res.output
        assert s.loras["settings-toggle"] == str(root / "served" / "settings-toggle")  # engine.vllm_lora_dir/NAME
        res = CliRunner().invoke(app, ["remove-adapter", "settings-toggle", "--no-retrain", "--registry", str(reg)])
        assert res.exit_code == 0, res.output
        assert "unloaded adapter 'settings-toggle'" in res.output and "settings-toggle" not in s.loras
        assert not s.violations
    with run_standin(StandIn(loras=_served(project), runtime_updates=False)) as s:  # no runtime updates: a warning
        reg.write_text(base + f"engine:\n  generation: vllm\n  vllm_url: {s.url}\n")
        res = CliRunner().invoke(app, add)
        assert res.exit_code == 0, res.output  # the registry edit stands
        assert "warning" in res.output and "does not allow runtime LoRA updates" in res.output
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in res.output
        assert "settings-toggle" in Registry.load(reg).adapter_names
    assert sync_adapter(Registry.load(project), "calendar", added=True) is None  # local generation: nothing to do


def test_router_serve_answers_502_with_the_located_message_when_vllm_is_down(project, items):
    import base64
    import io

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from serve_helpers import run_server

    from vlrouter.serve import ServeSettings

    url = f"http://127.0.0.1:{free_port()}"
    engine = Engine.from_registry(_vllm_registry(project, url, "down-serve.yaml"), device="cpu")
    buf = io.BytesIO()
    items[0][0].save(buf, format="PNG")
    with run_server(engine, ServeSettings(reload_interval_s=0)) as srv:
        r = httpx.post(srv.url + "/v1/act", json={"image": base64.b64encode(buf.getvalue()).decode(),
                                                  "prompt": items[0][1]}, timeout=30)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "generation_server_error" and "engine.vllm_url" in err["message"]
        assert "Traceback" not in r.text
        r = httpx.post(srv.url + "/v1/route", json={"image": base64.b64encode(buf.getvalue()).decode(),
                                                    "prompt": items[0][1]}, timeout=30)
        assert r.status_code == 200  # routing still works


# ---- the client's HTTP on an in-memory transport: headers, request bodies, error texts -----------------

class _Seen(list):
    clients: list


def _on_mock(monkeypatch, handler) -> _Seen:
    """Every httpx.Client the vLLM client makes talks to ``handler``; returns the requests it saw (``.clients``:
    the httpx clients made)."""
    import httpx

    seen, real = _Seen(), httpx.Client

    def record(request):
        seen.append(request)
        return handler(request)

    def client(**kw):
        made = real(transport=httpx.MockTransport(record), **kw)
        clients.append(made)
        return made

    clients = []
    monkeypatch.setattr(httpx, "Client", client)
    seen.clients = clients
    return seen


def _cards(*loras):
    return {"object": "list", "data": [{"id": "qwen", "parent": None}] + [{"id": n, "parent": "qwen"} for n in loras]}


def test_greedy_requests_send_temperature_zero_and_no_sampling_settings():
    from PIL import Image

    from vlrouter.core.errors import InputError
    from vlrouter.core.vllm import chat_body

    img = Image.new("RGB", (8, 8), (10, 20, 30))
    kw = {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "stop_strings": ("a", "b"), "seed": 3,
          "repetition_penalty": 1.1, "pad_token_id": 7}
    greedy = chat_body("calendar", img, "Click", kw)
    assert {k: greedy[k] for k in ("model", "max_tokens", "temperature", "stop", "seed", "repetition_penalty")} == {
        "model": "calendar", "max_tokens": 4, "temperature": 0.0, "stop": ["a", "b"], "seed": 3,
        "repetition_penalty": 1.1}
    assert not {"top_p", "top_k", "pad_token_id", "max_new_tokens"} & set(greedy)
    sampled = chat_body("calendar", img, "Click", {**kw, "do_sample": True})
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.7, 0.9, 5)
    with pytest.raises(InputError, match=r"^num_beams: this generate argument has no vLLM equivalent \(fix: use "
                                         r"max_new_tokens, temperature, top_p.*, or engine.generation: local\)$"):
        chat_body("calendar", img, "Click", {"num_beams": 2})


def test_the_api_key_is_sent_as_a_bearer_token_and_no_key_sends_no_header(monkeypatch):
    from vlrouter.core.vllm import API_KEY_ENV

    seen = _on_mock(monkeypatch, lambda r: __import__("httpx").Response(200, json=_cards()))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    VLLMClient("http://vllm.test:8001", api_key="s3cret").served()
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    VLLMClient("http://vllm.test:8001").served()
    monkeypatch.setenv(API_KEY_ENV, "")  # set but empty: no key
    VLLMClient("http://vllm.test:8001").served()
    monkeypatch.delenv(API_KEY_ENV)
    VLLMClient("http://vllm.test:8001").served()
    assert [r.headers.get("authorization") for r in seen] == ["Bearer s3cret", "Bearer from-env", None, None]
    assert [str(r.url) for r in seen] == ["http://vllm.test:8001/v1/models"] * 4


def test_a_404_for_the_adapter_names_it_and_asks_the_server_what_it_serves_again(monkeypatch):
    import httpx
    from PIL import Image

    def handler(r):
        if r.url.path == "/v1/models":
            return httpx.Response(200, json=_cards("calendar"))
        if r.method == "POST" and json.loads(r.content)["model"] == "calendar":
            return httpx.Response(404, json={"error": {"message": "The model `calendar` does not exist.",
                                                       "type": "NotFoundError", "code": 404}})
        return httpx.Response(405, json={"error": {"message": "Method Not Allowed"}})

    seen = _on_mock(monkeypatch, handler)
    client, img = VLLMClient("http://vllm.test", file="registry.yaml", line=7), Image.new("RGB", (8, 8))
    for _ in range(2):
        with pytest.raises(GenerationServerError) as e:
            client.chat(img, "Click", "calendar", {})
        assert str(e.value) == ("registry.yaml:7: engine.vllm_url: vLLM at http://vllm.test: does not serve "
                                "'calendar': The model `calendar` does not exist. (fix: start vLLM with "
                                "--lora-modules calendar=PATH, or `router add-adapter` again)")
    assert [r.url.path for r in seen] == ["/v1/models", "/v1/chat/completions"] * 2  # served list asked again
    with pytest.raises(GenerationServerError, match=r"chat completion with 'qwen' answered HTTP 405: Method Not "
                                                    r"Allowed \(fix: see the vLLM server's log"):
        client.chat(img, "Click", "base", {})  # another error status is not "does not serve"
    assert client._served is not None  # kept: only a 404 means the served set changed


def test_error_texts_are_one_line_cut_short_or_name_the_status_or_exception(monkeypatch):
    from types import SimpleNamespace

    import httpx

    from vlrouter.core.vllm import _message

    def no_json():
        raise ValueError("not JSON")

    html = SimpleNamespace(json=no_json, text="<html>\n  bad   gateway " + "y" * 400, status_code=502)
    assert _message(html) == ("<html> bad gateway " + "y" * 400)[:300]
    assert _message(SimpleNamespace(json=no_json, text="", status_code=502)) == "HTTP 502"

    reasons = iter([httpx.ConnectError(""), httpx.ConnectError("[Errno 111]  Connection\n refused"),
                    httpx.ConnectError("z" * 500)])

    def refuse(request):
        raise next(reasons)

    _on_mock(monkeypatch, refuse)
    client = VLLMClient("http://vllm.test")
    for shown in ["ConnectError", "[Errno 111] Connection refused", "z" * 200]:
        with pytest.raises(GenerationServerError) as e:
            client.served()
        assert str(e.value) == (f"engine.vllm_url: vLLM at http://vllm.test: cannot connect ({shown}) (fix: start "
                                "the vLLM server (README: Scaling out), or correct engine.vllm_url)")


def test_close_ends_the_connection_pool_and_a_later_request_opens_a_new_one(monkeypatch):
    import httpx

    seen = _on_mock(monkeypatch, lambda r: httpx.Response(200, json=_cards("calendar")))
    client = VLLMClient("http://vllm.test")
    client.served()
    client.served(refresh=True)
    assert len(seen.clients) == 1  # one pool for every request
    client.close()
    assert seen.clients[0].is_closed
    client.close()  # twice: nothing to do
    assert "calendar" in client.served(refresh=True) and len(seen.clients) == 2 and not seen.clients[1].is_closed


@pytest.mark.parametrize(("status", "body"), [(404, {"detail": "Not Found"}), (405, {"detail": "Method Not Allowed"})],
                         ids=["404", "405"])
def test_a_server_without_the_runtime_lora_routes_says_how_to_allow_them(monkeypatch, status, body):
    """FastAPI answers 404/405 with {"detail": ...} when vLLM did not register /v1/load_lora_adapter; vLLM's own
    404 (an adapter folder it cannot find) has its error shape and is another message."""
    import httpx

    answer = {"json": body}
    _on_mock(monkeypatch, lambda r: httpx.Response(status, **answer))
    client = VLLMClient("http://vllm.test")
    with pytest.raises(GenerationServerError, match=r"does not allow runtime LoRA updates \(no /v1/load_lora_adapter\) "
                                                    r"\(fix: restart vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        client.load_lora("calendar", "/srv/loras/calendar")
    with pytest.raises(GenerationServerError, match=r"does not allow runtime LoRA updates \(no "
                                                    r"/v1/unload_lora_adapter\)"):
        client.unload_lora("calendar")
    answer["json"] = {"error": {"message": "No adapter found"}}
    with pytest.raises(GenerationServerError, match=rf"refused to load adapter 'calendar' from /srv/loras/calendar "
                                                    rf"\(HTTP {status}: No adapter found\)"):
        client.load_lora("calendar", "/srv/loras/calendar")


def test_the_client_takes_engine_settings_from_the_registry_and_errors_name_the_url_line(monkeypatch, tmp_path):
    import httpx

    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    seen = _on_mock(monkeypatch, refuse)
    text = ("base_model: Qwen/Qwen3-VL-8B-Instruct\nadapters: []\nengine:\n  generation: vllm\n  vllm_timeout: 30\n"
            "  vllm_url: http://10.0.0.5:8001/v1/\n  vllm_model: qwen\n  vllm_lora_dir: loras\n")
    client = VLLMClient.from_registry(Registry.from_bytes(text.encode(), tmp_path / "registry.yaml"))
    assert (client.url, client.timeout, client.model) == ("http://10.0.0.5:8001", 30.0, "qwen")  # no trailing /v1
    assert client.lora_path("calendar", "/elsewhere") == f"{tmp_path}/loras/calendar"  # relative to the registry
    with pytest.raises(GenerationServerError) as e:
        client.served()
    assert str(e.value).startswith(f"{tmp_path / 'registry.yaml'}:6: engine.vllm_url: vLLM at http://10.0.0.5:8001: "
                                   "cannot connect ([Errno 111] Connection refused)")
    assert seen.clients[0].timeout.read == 30.0
    plain = VLLMClient("  http://h:8001/  ")
    assert (plain.url, plain.timeout) == ("http://h:8001", 120.0)  # the default: two minutes per request
    assert repr(plain) == "VLLMClient('http://h:8001', timeout=120)"
    assert VLLMClient("http://h/v1").url == "http://h" and VLLMClient("http://h/api/v1x").url == "http://h/api/v1x"


def test_the_served_models_are_asked_once_and_odd_answers_are_errors(monkeypatch):
    import httpx

    answer = {"status_code": 200, "json": {"object": "list", "data": [{"id": "qwen"}, "junk", {"object": "model"},
                                                                      {"id": "calendar", "parent": "qwen"}]}}
    seen = _on_mock(monkeypatch, lambda r: httpx.Response(**answer))
    client = VLLMClient("http://vllm.test")
    assert list(client.served()) == ["qwen", "calendar"]  # cards without an id (or not cards) are skipped
    assert list(client.served()) == ["qwen", "calendar"] and len(seen) == 1  # cached
    assert client.base_name() == "qwen" and len(seen) == 1
    for status, body, shown in [(200, {"object": "list"}, "HTTP 200: {"), (200, ["qwen"], "HTTP 200: "),
                                (401, {"object": "list", "data": []}, "HTTP 401: ")]:
        answer.update(status_code=status, json=body)
        with pytest.raises(GenerationServerError, match=r"GET /v1/models answered " + re.escape(shown) + r".*\(fix: "
                                                        r"point engine.vllm_url at a vLLM OpenAI-compatible server"):
            client.served(refresh=True)


def test_the_base_models_served_name_is_engine_vllm_model_when_set(monkeypatch):
    import httpx

    cards = {"object": "list", "data": [{"id": "qwen"}, {"id": "calendar", "parent": "qwen"}]}
    seen = _on_mock(monkeypatch, lambda r: httpx.Response(200, json=cards))
    assert VLLMClient("http://vllm.test", model="qwen").base_name() == "qwen" and len(seen) == 1
    client = VLLMClient("http://vllm.test", model="qwen-8b")
    with pytest.raises(GenerationServerError, match=r"serves no model named 'qwen-8b' \(engine.vllm_model; it serves "
                                                    r"qwen, calendar\) \(fix: set engine.vllm_model to the name"):
        client.base_name()
    assert len(seen) == 3  # asked again before giving up: the cached list may be old
    cards["data"].append({"id": "qwen-8b"})  # served since
    assert client.base_name() == "qwen-8b" and len(seen) == 4
    cards["data"] = [{"id": "calendar", "parent": "qwen"}]
    with pytest.raises(GenerationServerError, match=r"GET /v1/models lists no base model \(fix: set engine.vllm_model"):
        VLLMClient("http://vllm.test").base_name()


def test_a_batch_gets_one_text_per_row_in_row_order(monkeypatch):
    import httpx
    from PIL import Image

    def answer(r):
        if r.url.path == "/v1/models":
            return httpx.Response(200, json=_cards("calendar", "claim-window"))
        body = json.loads(r.content)
        text = f"{body['model']}: {body['messages'][0]['content'][1]['text']}"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}]})

    _on_mock(monkeypatch, answer)
    client, img = VLLMClient("http://vllm.test"), Image.new("RGB", (8, 8))
    rows = [("calendar", "a"), ("base", "b"), ("claim-window", "c"), ("calendar", "d")]
    texts = client.generate([img] * 4, [p for _, p in rows], [a for a, _ in rows], {"max_new_tokens": 3})
    assert texts == ["calendar: a", "qwen: b", "claim-window: c", "calendar: d"]
    assert client.generate([img], ["e"], ["claim-window"], {}) == ["claim-window: e"]


def test_only_vllms_already_loaded_answer_counts_as_already_served(monkeypatch):
    import httpx

    loaded = "The lora adapter 'calendar' has already been loaded."
    answer = {"status_code": 400, "json": {"error": {"message": loaded}}}
    _on_mock(monkeypatch, lambda r: httpx.Response(**answer))
    client = VLLMClient("http://vllm.test")
    assert client.load_lora("calendar", "/srv/calendar") == "vLLM at http://vllm.test already serves adapter 'calendar'"
    answer["json"] = {"error": {"message": "Invalid lora_path"}}
    with pytest.raises(GenerationServerError, match=r"refused to load adapter 'calendar' from /srv/calendar "
                                                    r"\(HTTP 400: Invalid lora_path\)"):
        client.load_lora("calendar", "/srv/calendar")
    answer["status_code"] = 500  # a server error that happens to mention it is no success
    answer["json"] = {"error": {"message": "adapter has already been loaded, then the GPU fell over"}}
    with pytest.raises(GenerationServerError, match=r"HTTP 500"):
        client.load_lora("calendar", "/srv/calendar")


def test_syncing_an_adapter_with_the_server_closes_its_connections(monkeypatch, tmp_path):
    import httpx

    seen = _on_mock(monkeypatch, lambda r: httpx.Response(200, text="Success"))
    text = ("base_model: Qwen/Qwen3-VL-8B-Instruct\nengine:\n  generation: vllm\n  vllm_url: http://vllm.test\n"
            "adapters:\n  - name: calendar\n    dataset: d.jsonl\n    checkpoint: ck/calendar\n")
    reg = Registry.from_bytes(text.encode(), tmp_path / "registry.yaml")
    assert sync_adapter(reg, "calendar", added=True) == ("loaded adapter 'calendar' into vLLM at http://vllm.test "
                                                         f"from {tmp_path / 'ck' / 'calendar'}")
    assert sync_adapter(reg, "calendar", added=False) == "unloaded adapter 'calendar' from vLLM at http://vllm.test"
    assert [json.loads(r.content) for r in seen] == [{"lora_name": "calendar",
                                                      "lora_path": str(tmp_path / "ck" / "calendar")},
                                                     {"lora_name": "calendar"}]
    assert len(seen.clients) == 2 and all(c.is_closed for c in seen.clients)
