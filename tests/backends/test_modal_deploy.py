"""`router deploy --backend modal`, offline: the serving app and class, their body via .local(), uploads, errors.

Nothing here reaches Modal's cloud: the app module is imported with sockets blocked, the
class body runs in-process with ``Server().web.local()``, and the upload/deploy driver
runs against stand-in volumes with the deploy call and the URL lookup replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
import engine_helpers as H

from tests.backends.test_modal import FakeVolume, _env, _tree_bytes
from vlrouter.backends import modal_deploy, modal_run
from vlrouter.core.errors import BackendError, StaleRouterError
from vlrouter.core.progress import RecordingProgress
from vlrouter.core.registry import Registry

REPO = Path(__file__).resolve().parents[2]
ROUTER = str(Path(sys.executable).with_name("router"))
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")
API_KEY = "deploy-test-key"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_encoder):
    root = tmp_path_factory.mktemp("deploy-project")
    reg = H.make_project(root, tiny_model_dir, encoder=tiny_encoder)
    reg.write_text(reg.read_text() + "serve:\n  gpu: L4\n  max_containers: 3\n  concurrency: 4\n")
    return root


@pytest.fixture
def project(built, tmp_path) -> Registry:
    root = tmp_path / "p"
    shutil.copytree(built, root, symlinks=True)
    return Registry.load(root / "registry.yaml")


# ---- the app and the class, defined offline --------------------------------------------------

def test_serve_app_and_class_are_defined_offline_with_their_resources(tmp_path):
    """Sockets blocked, deprecations as errors; every argument the decorators receive is recorded and checked."""
    script = textwrap.dedent("""
        import json, os, socket, warnings

        def refuse(*a, **k):
            raise OSError("network blocked by the test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        warnings.simplefilter("error")
        import modal

        seen = {}
        real_cls, real_concurrent = modal.App.cls, modal.concurrent

        def cls(self, **kw):
            seen["cls"] = {k: v for k, v in kw.items() if k not in ("volumes", "env", "secrets")}
            seen["volumes"] = {m: v.name for m, v in kw["volumes"].items()}
            seen["env"] = sorted(kw["env"])
            seen["secrets"] = len(kw["secrets"])
            return real_cls(self, **kw)

        def concurrent(**kw):
            seen["concurrent"] = kw
            return real_concurrent(**kw)

        modal.App.cls, modal.concurrent = cls, concurrent
        os.environ.update({"VLROUTER_MODAL_SERVE_GPU": "L40S", "VLROUTER_MODAL_SERVE_MAX_CONTAINERS": "5",
                           "VLROUTER_MODAL_SERVE_CONCURRENCY": "16", "VLROUTER_MODAL_SERVE_SCALEDOWN_WINDOW": "120"})
        import vlrouter.backends.modal_serve as m
        assert isinstance(m.serve_app, modal.App) and m.serve_app.name == "vlrouter-serve"
        assert isinstance(m.Server, modal.Cls)
        classes = sorted(k for k, v in vars(m).items() if isinstance(v, modal.Cls))
        spec = m.Server._get_class_service_function()._spec_  # what Modal provisions (no public accessor)
        seen["spec"] = {"gpus": spec.gpus, "cpu": spec.cpu, "memory": spec.memory}
        print(json.dumps({"classes": classes, **seen}))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=_env(MODAL_CONFIG_PATH=str(tmp_path / "none.toml")))
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["classes"] == ["Server"]
    assert seen["cls"] == {"gpu": "L40S", "cpu": 4.0, "memory": 32768, "min_containers": 0, "max_containers": 5,
                           "scaledown_window": 120, "timeout": 600}
    assert seen["concurrent"] == {"max_inputs": 16}
    assert seen["volumes"] == {"/data": "moe-lora-data", "/checkpoints": "moe-lora-checkpoints"}
    assert "HF_HOME" in seen["env"] and "VLROUTER_MODAL_DATA_VOLUME" in seen["env"]
    assert seen["secrets"] == 0  # no key given: no Secret
    assert seen["spec"] == {"gpus": "L40S", "cpu": 4.0, "memory": 32768}


def test_serve_settings_come_from_the_registry_and_land_in_the_class(project):
    reg = project
    mserve = modal_deploy.load_serve_app(reg, api_key="k")
    try:
        assert mserve.SERVE_APP_NAME == "vlrouter-serve" and mserve.CONCURRENCY == 4
        assert mserve.SERVER_RESOURCES == {"gpu": "L4", "cpu": 4.0, "memory": 32768, "min_containers": 0,
                                           "max_containers": 3, "scaledown_window": 300, "timeout": 600}
        opts = mserve.server_options()
        assert set(opts["volumes"]) == {"/data", "/checkpoints"} and len(opts["secrets"]) == 1  # the key
        assert "VLROUTER_MODAL_SERVE_API_KEY" not in os.environ  # set only around the import
        s = mserve.server_settings({"VLROUTER_API_KEY": "k"})
        assert (s.api_key, s.max_batch_size, s.max_queue, s.reload_interval_s) == ("k", 4, 64, 0)
        with pytest.raises(BackendError, match="--gpu: unknown Modal GPU 'V100'"):
            modal_deploy.load_serve_app(reg, gpu="V100")
    finally:
        modal_deploy.load_serve_app(Registry.from_bytes(b"base_model: x\nadapters: []\n"))  # the defaults again


def test_the_class_body_runs_locally_and_answers_requests(project, monkeypatch):
    import base64
    import io

    from starlette.testclient import TestClient

    mserve = modal_deploy.load_serve_app(project)
    monkeypatch.setenv(mserve.ENV_REGISTRY, str(project.path))
    monkeypatch.setenv("VLROUTER_API_KEY", API_KEY)
    web = mserve.Server().web.local()  # @modal.enter() ran: the engine is loaded
    img, prompt, adapter = H.samples()[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": prompt, "max_new_tokens": 4}
    with TestClient(web) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["adapters"] == H.NAMES
        assert client.post("/v1/act", json=body).status_code == 401  # the key is required
        r = client.post("/v1/act", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == adapter and r.json()["text"]
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in models["data"]] == ["auto", "base", *H.NAMES]


# ---- credentials, connectivity, local checks: before anything is touched -------------------------------

def test_deploy_without_credentials_fails_in_under_a_second_and_changes_nothing(project, monkeypatch):
    from typer.testing import CliRunner

    import vlrouter.cli.main  # noqa: F401  (attaches every command)
    from vlrouter.cli.app import app

    for k in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(k, raising=False)
    before = _tree_bytes(project.root)
    for args in (["deploy", "--backend", "modal", "--api-key", "k"], ["deploy", "--backend", "modal", "--stop"]):
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, [*args, "--registry", str(project.path)])
        elapsed = time.perf_counter() - t0
        assert res.exit_code == 1, res.output
        assert elapsed < 1.0, elapsed
        assert "Modal credentials not found" in res.output and "modal token new" in res.output
        assert "Connecting" not in res.output and "Traceback" not in res.output
    assert _tree_bytes(project.root) == before


def test_deploy_without_credentials_through_the_router_command(project, tmp_path):
    empty = tmp_path / "empty-modal.toml"
    empty.write_text("")
    before = _tree_bytes(project.root)
    r = subprocess.run([ROUTER, "deploy", "--backend", "modal", "--registry", str(project.path)], capture_output=True,
                       text=True, timeout=60, env=_env(MODAL_CONFIG_PATH=str(empty), VLROUTER_NO_ENTRY_POINTS="1",
                                                       COLUMNS="300"))
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Modal credentials not found" in out and "modal token new" in out, out
    assert out.count("\n") == 1 and "Traceback" not in out  # one line
    assert _tree_bytes(project.root) == before


def test_deploy_offline_says_connecting_then_fails_cleanly(project, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")

    def unreachable(address, timeout=None, *a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    before = _tree_bytes(project.root)
    prog = RecordingProgress()
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"cannot reach Modal \(api\.modal\.com:443: Network is unreachable"):
        modal_deploy.deploy_modal(project, api_key="k", progress=prog)
    with pytest.raises(BackendError, match=r"cannot reach Modal"):
        modal_deploy.stop_modal(project, progress=prog)
    assert time.perf_counter() - t0 < 5
    assert prog.messages == ["Connecting to Modal…", "Connecting to Modal…"] and prog.tasks == []
    assert _tree_bytes(project.root) == before


def test_local_problems_are_refused_before_connecting(project, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    prog = RecordingProgress()
    text = project.path.read_text()
    project.path.write_text(text.replace("gpu: L4", "gpu: T4"))
    monkeypatch.setattr(modal_run, "weight_bytes", lambda *a, **k: (17_500_000_000, "stand-in size"))
    with pytest.raises(BackendError, match=r"registry.yaml:\d+: serve.gpu: GPU T4 has 16 GB, but .* needs about "
                                           r"20.2 GB .*\(fix: choose a larger GPU, e.g. L4"):
        modal_deploy.deploy_modal(Registry.load(project.path), api_key="k", progress=prog)
    project.path.write_text(text.replace("  - name: provider-select", "  - name: settings\n    dataset: d.jsonl\n"
                                         "    checkpoint: checkpoints/calendar\n  - name: provider-select"))
    with pytest.raises(StaleRouterError, match="router retrain"):
        modal_deploy.deploy_modal(Registry.load(project.path), api_key="k", progress=prog)
    assert prog.messages == []  # never got as far as "Connecting to Modal…"


def test_the_cli_refuses_a_public_endpoint_unless_asked(project, monkeypatch):
    from typer.testing import CliRunner

    import vlrouter.cli.main  # noqa: F401
    from vlrouter.cli.app import app

    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    monkeypatch.delenv("VLROUTER_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["deploy", "--registry", str(project.path)])
    assert res.exit_code == 1 and "--api-key: the endpoint would be public" in res.output and "--public" in res.output


# ---- the uploads and the deploy, against stand-in volumes --------------------------------------------------------

@pytest.fixture
def volumes(project, tmp_path, monkeypatch):
    """Stand-in data and checkpoints volumes; the deploy call and the URL lookup recorded instead of run."""
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    monkeypatch.setattr(modal_deploy, "probe_modal", lambda *a, **k: None)
    mapp = modal_deploy.load_serve_app(project, api_key=API_KEY).mapp  # defined with Modal's volumes, before the swap
    data, ck = FakeVolume(tmp_path / "data"), FakeVolume(tmp_path / "checkpoints")
    monkeypatch.setitem(mapp.VOLUMES, mapp.DATA_ROOT, data)
    monkeypatch.setitem(mapp.VOLUMES, mapp.CHECKPOINTS_ROOT, ck)
    deployed = []
    monkeypatch.setattr(modal_deploy, "_deploy", lambda mserve: deployed.append(mserve.SERVE_APP_NAME))
    monkeypatch.setattr(modal_deploy, "_web_url", lambda name: f"https://ws--{name}-server-web.modal.run")
    return data, ck, deployed


def _as_in_a_container(data: FakeVolume, ck: FakeVolume, app: str) -> Path:
    """The deployed registry.yaml (and router.json) with the containers' mount points mapped to the stand-ins."""
    deployed = data.root / "deploy" / app / "registry.yaml"
    local = deployed.with_name("local.yaml")
    local.write_text(deployed.read_text().replace(" /data/", f" {data.root}/").replace(" /checkpoints/",
                                                                                        f" {ck.root}/"))
    for meta in deployed.parent.glob("routers/*/router.json"):
        meta.write_text(meta.read_text().replace('"/data/', f'"{data.root}/'))
    return local


def test_deploy_uploads_what_the_containers_need_and_they_serve_the_same_router(project, volumes, tiny_model_dir):
    from vlrouter.core.engine import Engine

    data, ck, deployed = volumes
    before = _tree_bytes(project.root)
    prog = RecordingProgress()
    result = modal_deploy.deploy_modal(project, api_key=API_KEY, progress=prog)
    assert deployed == ["vlrouter-serve"] and result.url == "https://ws--vlrouter-serve-server-web.modal.run"
    assert (result.gpu, result.adapters, result.adapters_uploaded, result.max_containers) == ("L4", 3, 3, 3)
    assert prog.messages[0] == "Connecting to Modal…"
    assert all(done == total for _, total, done in prog.tasks if total)  # every bar reached its files
    assert _tree_bytes(project.root) == before  # nothing local changed
    name = Path(tiny_model_dir).name
    [model_dir] = (data.root / "models").glob(f"*/{name}")
    assert (model_dir / "config.json").read_bytes() == (Path(tiny_model_dir) / "config.json").read_bytes()
    for n in H.NAMES:
        assert (ck.root / n / "adapter_model.safetensors").read_bytes() == \
            (project.root / "checkpoints" / n / "adapter_model.safetensors").read_bytes()
    deployed_reg = Registry.load(data.root / "deploy" / "vlrouter-serve" / "registry.yaml")
    assert deployed_reg.model.base_model == f"/data/models/{model_dir.parent.name}/{name}"
    assert [a.checkpoint for a in deployed_reg.adapters] == [f"/checkpoints/{n}" for n in H.NAMES]
    assert deployed_reg.model.serve == project.model.serve

    # A container's view: the engine loads from the uploads alone and answers like the local one.
    engine = Engine.from_registry(_as_in_a_container(data, ck, "vlrouter-serve"), device="cpu")
    local = Engine.from_registry(project.path, device="cpu")
    for img, prompt, _ in H.samples():
        a, b = engine.act(img, prompt, max_new_tokens=4), local.act(img, prompt, max_new_tokens=4)
        assert (a.adapter, a.text) == (b.adapter, b.text)

    again = modal_deploy.deploy_modal(project, api_key=API_KEY)  # unchanged adapters are not uploaded again
    assert again.adapters_uploaded == 0
    H.make_lora_adapters(tiny_model_dir, project.root / "checkpoints", ["calendar"], seed=5)  # retrained LoRA
    assert modal_deploy.deploy_modal(project, api_key=API_KEY).adapters_uploaded == 1


def test_the_cli_prints_the_endpoint_and_json(project, volumes):
    from typer.testing import CliRunner

    import vlrouter.cli.main  # noqa: F401
    from vlrouter.cli.app import app

    res = CliRunner().invoke(app, ["deploy", "--backend", "modal", "--api-key", API_KEY, "--registry",
                                   str(project.path)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "endpoint: https://ws--vlrouter-serve-server-web.modal.run" in res.output
    assert "/v1, API key required" in res.output
    res = CliRunner().invoke(app, ["deploy", "--json", "--registry", str(project.path)],
                             env={"VLROUTER_API_KEY": API_KEY})
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["url"].startswith("https://") and out["app"] == "vlrouter-serve"


def test_stop_stops_the_deployed_app_and_says_when_there_is_none(project, monkeypatch):
    import modal.exception as mexc

    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    monkeypatch.setattr(modal_deploy, "probe_modal", lambda *a, **k: None)
    stopped = []
    monkeypatch.setattr(modal_deploy, "_stop", stopped.append)
    assert modal_deploy.stop_modal(project) == "vlrouter-serve" and stopped == ["vlrouter-serve"]

    def missing(name):
        raise mexc.NotFoundError(f"App '{name}' not found")

    monkeypatch.setattr(modal_deploy, "_stop", missing)
    with pytest.raises(BackendError, match=r"no deployed Modal app named 'vlrouter-serve' \(fix: deploy it"):
        modal_deploy.stop_modal(project)
