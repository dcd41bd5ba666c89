"""`router plugins | status | add-adapter | remove-adapter | tiny-model`, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from vlrouter.cli.app import app

REGISTRY = """\
# Router registry for the claims agent.
base_model: Qwen/Qwen3-VL-8B-Instruct   # the frozen base
router:
  dir: runs/router        # head + router.json
  pooling: mean
  min_confidence: 0.0
adapters:
  # label 0: date pickers
  - name: calendar
    plugin: vlrouter.adapters.calendar
    dataset: data/calendar/train.jsonl
    checkpoint: checkpoints/calendar-tasks
  - name: claim-window     # forms
    dataset: data/claim-window/train.jsonl
    checkpoint: checkpoints/claim-window
# end of adapters
"""

SAMPLE = '{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\nClick"}]}\n'


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace folder: registry.yaml (with comments) + the three seed datasets."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "registry.yaml").write_text(REGISTRY)
    for name, n in (("calendar", 3), ("claim-window", 2), ("provider-select", 4)):
        d = root / "data" / name
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text(SAMPLE * n)
    return root


def run(*args: str, ws: Path | None = None):
    argv = list(args)
    if ws is not None:
        argv += ["--registry", str(ws / "registry.yaml")]
    return CliRunner().invoke(app, argv, env={"COLUMNS": "200", "VLROUTER_DEBUG": ""})


def status_json(ws: Path) -> dict:
    res = run("status", "--json", ws=ws)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# ---- acceptance 1: add a plugin-declared adapter ------------------------------------------


def test_add_adapter_from_plugin_defaults_keeps_comments_and_status_lists_three(ws):
    reg = ws / "registry.yaml"
    res = run("add-adapter", "provider-select", "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    assert "label 2" in res.stdout
    assert "router retrain" in res.stdout

    text = reg.read_text()
    for line in REGISTRY.splitlines():  # every original line, comments included, survives
        assert line in text.splitlines(), line
    assert "# end of adapters" in text.splitlines()[-1]  # the closing comment stays last
    assert "  - name: provider-select\n" \
           "    plugin: vlrouter.adapters.provider_select\n" \
           "    dataset: data/provider-select/train.jsonl\n" \
           "    checkpoint: checkpoints/provider-select\n" in text

    st = status_json(ws)
    assert [(a["label"], a["name"]) for a in st["adapters"]] == [(0, "calendar"), (1, "claim-window"),
                                                               (2, "provider-select")]
    ps = st["adapters"][2]
    assert ps["plugin"] == "vlrouter.adapters.provider_select"
    assert ps["dataset_present"] and ps["dataset_lines"] == 4
    assert ps["checkpoint_present"] is False

    table = run("status", ws=ws)
    assert table.exit_code == 0, table.output
    for name in ("calendar", "claim-window", "provider-select"):
        assert name in table.stdout
    assert "adapters (3)" in table.stdout


def test_add_generic_adapter_stores_paths_relative_to_the_registry(ws, monkeypatch):
    (ws / "extra").mkdir()
    (ws / "extra" / "invoices.jsonl").write_text(SAMPLE)
    monkeypatch.chdir(ws.parent)  # paths typed relative to the cwd, not the registry's folder
    res = run("add-adapter", "invoice-form", "--dataset", "ws/extra/invoices.jsonl",
              "--checkpoint", "ws/checkpoints/invoice-form", "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    assert "generic" in res.stdout
    added = status_json(ws)["adapters"][2]
    assert added["name"] == "invoice-form" and added["plugin"] == "generic"
    assert added["dataset_present"] and added["dataset_lines"] == 1
    text = (ws / "registry.yaml").read_text()
    assert "dataset: extra/invoices.jsonl" in text
    assert "checkpoint: checkpoints/invoice-form" in text
    assert "plugin:" not in text.split("name: invoice-form")[1]


def test_dataset_option_overrides_the_plugin_default(ws):
    (ws / "ps.jsonl").write_text(SAMPLE)
    res = run("add-adapter", "provider-select", "--dataset", str(ws / "ps.jsonl"), "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    text = (ws / "registry.yaml").read_text()
    assert f"dataset: {ws / 'ps.jsonl'}" in text
    assert "checkpoint: checkpoints/provider-select" in text


def test_remove_adapter_shifts_labels_and_keeps_comments(ws):
    assert run("add-adapter", "provider-select", "--no-retrain", ws=ws).exit_code == 0
    res = run("remove-adapter", "calendar", "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    assert "was label 0" in res.stdout
    st = status_json(ws)
    assert [(a["label"], a["name"]) for a in st["adapters"]] == [(0, "claim-window"), (1, "provider-select")]
    text = (ws / "registry.yaml").read_text()
    assert "# Router registry for the claims agent." in text and "# forms" in text
    # Removing what was added gives back the original file.
    assert run("add-adapter", "calendar", "--no-retrain", ws=ws).exit_code == 0
    assert run("remove-adapter", "calendar", "--no-retrain", ws=ws).exit_code == 0
    assert run("remove-adapter", "provider-select", "--no-retrain", ws=ws).exit_code == 0
    assert "name: calendar" not in (ws / "registry.yaml").read_text()


def test_remove_unknown_adapter_suggests(ws):
    before = (ws / "registry.yaml").read_bytes()
    res = run("remove-adapter", "claim-windows", "--no-retrain", ws=ws)
    assert res.exit_code != 0
    assert "'claim-window'" in res.stderr and "registry.yaml" in res.stderr
    assert (ws / "registry.yaml").read_bytes() == before


# ---- acceptance 3: one clear error line, registry.yaml byte-identical ------------------------


def _edit(old: str, new: str):
    return lambda text: text.replace(old, new, 1)


ERROR_CASES = {
    # id: (edit of the file or None, extra command args or None, substrings the one line must hold)
    "yaml-syntax": (_edit("  pooling: mean", "  pooling: [mean"), None, ["registry.yaml:6", "YAML syntax error"]),
    "unknown-key": (_edit("  pooling: mean", "  pooling: mean\n  colour: red"), None,
                    ["registry.yaml:6", "router.colour", "unknown key 'colour'"]),
    "duplicate-name": (_edit("name: claim-window", "name: calendar"), None,
                       ["registry.yaml:13", "adapters[1].name", "duplicate adapter name 'calendar'"]),
    "add-unknown-name": (None, ["add-adapter", "calender", "--no-retrain"],
                         ["registry.yaml", "adapters[2].name", "unknown adapter 'calender'",
                          "did you mean 'calendar'"]),
    "add-already-present": (None, ["add-adapter", "claim-window", "--no-retrain"],
                            ["registry.yaml:13", "adapters[1].name", "already registered (label 1)"]),
    "bad-name-characters": (None, ["add-adapter", "Provider_Select", "--no-retrain"],
                            ["registry.yaml", "adapters[2].name", "must match [a-z0-9][a-z0-9-]*"]),
    "missing-dataset": ("rm-dataset", None, ["registry.yaml:18", "adapters[2].dataset",
                                             "data/provider-select/train.jsonl"]),
    "fallback-missing-adapter": (_edit("  min_confidence: 0.0", "  min_confidence: 0.0\n  fallback: provider"),
                                 None, ["registry.yaml:7", "router.fallback", "'provider'"]),
    "top-level-list": (lambda t: "- calendar\n- claim-window\n", None, ["registry.yaml:1", "top level is a list"]),
    "top-level-scalar": (lambda t: "just some text\n", None, ["registry.yaml:1", "top level is a str"]),
    "empty-file": (lambda t: "", None, ["registry.yaml", "file is empty"]),
    "remove-fallback-target": (_edit("  min_confidence: 0.0", "  min_confidence: 0.0\n  fallback: calendar"),
                               ["remove-adapter", "calendar", "--no-retrain"], ["registry.yaml:7", "router.fallback"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_errors_are_one_located_line_and_leave_registry_untouched(ws, case):
    edit, args, expected = ERROR_CASES[case]
    reg = ws / "registry.yaml"
    if edit == "rm-dataset":
        (ws / "data" / "provider-select" / "train.jsonl").unlink()
    elif edit is not None:
        reg.write_text(edit(REGISTRY))
    before = reg.read_bytes()
    res = run(*(args or ["add-adapter", "provider-select", "--no-retrain"]), ws=ws)
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    for s in expected:
        assert s in lines[0], (s, lines[0])
    assert "(fix: " in lines[0]
    assert "Traceback" not in res.output
    assert reg.read_bytes() == before
    assert sorted(p.name for p in ws.iterdir()) == sorted(["data", "registry.yaml"])  # no temp files left


def test_status_and_plugins_report_a_broken_registry_the_same_way(ws):
    (ws / "registry.yaml").write_text(REGISTRY.replace("  pooling: mean", "  pooling: first"))
    for cmd in ("status", "plugins"):
        res = run(cmd, ws=ws)
        assert res.exit_code == 1
        assert res.stderr.count("\n") == 1
        assert "registry.yaml:5: router.pooling" in res.stderr


def test_missing_registry_file_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["status", "--registry", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1
    assert "nope.yaml: registry file not found" in res.stderr


# ---- plugins / status ---------------------------------------------------------------------


def test_plugins_lists_builtins_hooks_and_adapters(ws):
    res = run("plugins", "--json", ws=ws)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    rows = {r["name"]: r for r in data["plugins"]}
    cal = rows["vlrouter.adapters.calendar"]
    assert cal["distribution"] == "built-in"
    assert cal["hooks"] == ["parse_action", "register_adapters"]
    assert cal["adapters"] == ["calendar"]
    assert rows["vlrouter.adapters.generic"]["adapters"] == []
    assert rows["vlrouter.backends.local"]["hooks"] == ["register_backends"]
    assert data["adapters"]["provider-select"]["dataset"] == "data/provider-select/train.jsonl"

    table = run("plugins", ws=ws)
    assert table.exit_code == 0
    assert "vlrouter.adapters.provider_select" in table.stdout
    assert "available to add: provider-select" in table.stdout


def test_plugins_works_without_a_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["registry"] is None


def _write_router(ws: Path, adapters: list[str], **over) -> None:
    d = ws / "runs" / "router"
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "adapters": adapters, "base_model": "Qwen/Qwen3-VL-8B-Instruct",
            "pooling": "mean", "layer": -1, "hidden_size": 8,
            "head": {"kind": "linear", "in_dim": 8, "num_labels": len(adapters)},
            "best_acc": 0.875, "created_at": "2026-11-21T10:00:00+00:00"}
    meta.update(over)
    (d / "router.json").write_text(json.dumps(meta))


def test_status_shows_router_missing_fresh_and_stale(ws):
    assert status_json(ws)["router"]["state"] == "missing"
    out = run("status", ws=ws).stdout
    assert "missing" in out and "router retrain" in out

    _write_router(ws, ["calendar", "claim-window"])
    st = status_json(ws)["router"]
    assert st["state"] == "ok" and st["val_acc"] == 0.875 and st["adapters"] == ["calendar", "claim-window"]
    out = run("status", ws=ws).stdout
    assert "up to date" in out and "0.875" in out and "STALE" not in out

    assert run("add-adapter", "provider-select", "--no-retrain", ws=ws).stdout.count("now stale") == 1
    st = status_json(ws)["router"]
    assert st["state"] == "stale" and "adapter set differs" in st["reason"]
    out = run("status", ws=ws).stdout
    assert "STALE" in out and "adapter set differs" in out

    _write_router(ws, ["calendar", "claim-window", "provider-select"], pooling="last")
    st = status_json(ws)["router"]
    assert st["state"] == "stale" and "pooling" in st["reason"]


def test_status_checkpoint_present_needs_adapter_config(ws):
    ck = ws / "checkpoints" / "calendar-tasks"
    ck.mkdir(parents=True)
    assert status_json(ws)["adapters"][0]["checkpoint_present"] is False
    (ck / "adapter_config.json").write_text("{}")
    st = status_json(ws)
    assert st["adapters"][0]["checkpoint_present"] is True
    assert st["adapters"][0]["dataset_lines"] == 3
    (ws / "data" / "claim-window" / "train.jsonl").unlink()
    st = status_json(ws)
    assert st["adapters"][1]["dataset_present"] is False and st["adapters"][1]["dataset_lines"] is None
    assert "missing" in run("status", ws=ws).stdout


# ---- acceptance 7: --help ----------------------------------------------------------------


@pytest.mark.parametrize("cmd", [[], ["plugins"], ["status"], ["add-adapter"], ["remove-adapter"], ["tiny-model"]],
                         ids=["router", "plugins", "status", "add-adapter", "remove-adapter", "tiny-model"])
def test_help_exits_zero(cmd):
    res = CliRunner().invoke(app, cmd + ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Usage" in res.stdout
    if cmd:
        assert cmd[0] in res.stdout


def test_add_adapter_help_lists_training_flags():
    out = CliRunner().invoke(app, ["add-adapter", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--dataset", "--checkpoint", "--plugin", "--no-retrain", "--epochs", "--batch-size", "--lr",
                 "--patience", "--backend", "--force", "--registry"):
        assert flag in out, flag


# ---- tiny-model ----------------------------------------------------------------------------


def test_tiny_model_writes_a_loadable_folder_and_reports_parameters(tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "tiny"
    res = CliRunner().invoke(app, ["tiny-model", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout and "preset tiny" in res.stdout
    n = int(res.stdout.split("preset tiny, ")[1].split(" parameters")[0].replace(",", ""))
    assert n > 10_000
    assert AutoConfig.from_pretrained(out).model_type == "qwen3_vl"


def test_tiny_model_rejects_unknown_preset(tmp_path):
    res = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--preset", "huge"])
    assert res.exit_code != 0
    assert not (tmp_path / "m").exists()


# ---- acceptance 2: a third-party plugin installed as a package ------------------------------

PLUGIN_MODULE = '''\
"""acme: an installed third-party vlrouter adapter plugin."""
from vlrouter import AdapterSpec, hookimpl
from vlrouter.core.actions import parse_call


@hookimpl
def register_adapters(register):
    register(AdapterSpec(name="invoice-form", description="Invoice forms.",
                         dataset="data/invoice-form/train.jsonl", checkpoint="checkpoints/invoice-form"))


@hookimpl
def parse_action(adapter, text):
    if adapter == "invoice-form":
        return parse_call(text, {"click": {"x", "y"}, "type": {"text"}})
    return None
'''


def _install_fake_package(site: Path) -> None:
    """What `pip install --target site acme-vlrouter` leaves behind: the module and its dist-info."""
    (site / "acme_vlrouter").mkdir(parents=True)
    (site / "acme_vlrouter" / "__init__.py").write_text(PLUGIN_MODULE)
    info = site / "acme_vlrouter-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vlrouter\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[vlrouter]\nacme = acme_vlrouter\n")
    (info / "RECORD").write_text("")
    (info / "top_level.txt").write_text("acme_vlrouter\n")


def _router(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlrouter.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_installed_entry_point_plugin_is_listed_and_its_adapter_added(ws, tmp_path):
    site = tmp_path / "site"
    _install_fake_package(site)
    (ws / "data" / "invoice-form").mkdir()
    (ws / "data" / "invoice-form" / "train.jsonl").write_text(SAMPLE * 5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="200")
    env.pop("VLROUTER_NO_ENTRY_POINTS", None)  # this process loads installed entry points

    res = _router(["plugins", "--json"], ws, env)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["plugins"]}
    assert rows["acme"]["distribution"] == "acme-vlrouter 0.3.0"
    assert rows["acme"]["adapters"] == ["invoice-form"]
    assert rows["acme"]["hooks"] == ["parse_action", "register_adapters"]
    table = _router(["plugins"], ws, env)
    assert "acme-vlrouter 0.3.0" in table.stdout and "invoice-form" in table.stdout

    res = _router(["add-adapter", "invoice-form", "--no-retrain"], ws, env)
    assert res.returncode == 0, res.stderr
    assert "label 2" in res.stdout
    text = (ws / "registry.yaml").read_text()
    assert ("  - name: invoice-form\n    plugin: acme_vlrouter\n    dataset: data/invoice-form/train.jsonl\n"
            "    checkpoint: checkpoints/invoice-form\n") in text

    res = _router(["status", "--json"], ws, env)
    assert [a["name"] for a in json.loads(res.stdout)["adapters"]] == ["calendar", "claim-window", "invoice-form"]

    # registry.yaml's `plugin:` imports the module even with entry-point loading switched off.
    res = _router(["plugins", "--json"], ws, dict(env, VLROUTER_NO_ENTRY_POINTS="1"))
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["plugins"]}
    assert "acme" not in rows
    assert rows["acme_vlrouter"]["adapters"] == ["invoice-form"]

    # Without the package, the same registry is one clear error naming the field.
    gone = dict(env, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    res = _router(["plugins"], ws, gone)
    assert res.returncode == 1
    assert "adapters[2].plugin" in res.stderr and "acme_vlrouter" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ---- the retrain contract (with a stand-in training backend) --------------------------------

# 10 validation samples of two classes: a head that always says 0 scores 0.6.
_VAL_Y = [0] * 6 + [1] * 4


def _candidate(registry, *, always: int | None = None, acc: float):
    """A real candidate router for ``registry``'s labels whose head predicts class ``always`` -- or, without
    ``always``, reads feature 0 of the validation features, which tells the labels apart (the gate promotes
    only routers that beat chance)."""
    import torch

    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.recipe import Candidate
    from vlrouter.core.store import RouterMeta, new_version_dir, save_router

    k = len(registry.adapter_names)
    shape = HeadShape(in_dim=4, num_labels=k)
    head = build_head(shape)
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.zero_()
        if always is not None:
            head[-1].bias[always] = 1.0
        else:
            head[-1].weight[0, 0], head[-1].weight[1, 0] = -1.0, 1.0
    meta = RouterMeta(adapters=registry.adapter_names, base_model="Qwen/Qwen3-VL-8B-Instruct", pooling=["mean"],
                      layer=2, num_layers=2, hidden_size=4, head=shape, metrics={"val_acc": acc, "n_val": len(_VAL_Y)},
                      encoder_fingerprint="enc", embedded_new=4, reused_cached=5)
    out = save_router(new_version_dir(registry.router_dir), head, meta)
    feats = torch.zeros(len(_VAL_Y), 4)
    feats[:, 0] = torch.tensor([1.0 if y else -1.0 for y in _VAL_Y])
    return Candidate(dir=out, dataset_dir=out, meta=meta, val_views={"mean@2": feats}, val_labels=_VAL_Y)


def _fake_train(monkeypatch, behaviour):
    """Replace the training backend the CLI looks up; ``behaviour(request)`` returns a Candidate or raises."""
    calls = []

    def backend(request):
        calls.append({"registry": request.registry, "options": request.options,
                      "file_at_call": request.registry.path.read_text()})
        return behaviour(request)

    def get_backend(pm, name):
        calls.append({"backend": name})
        return backend

    monkeypatch.setattr("vlrouter.cli.registry_cmds.get_backend", get_backend)
    return calls


def test_add_adapter_retrains_before_saving(ws, monkeypatch):
    calls = _fake_train(monkeypatch, lambda req: _candidate(req.registry, acc=0.9))
    res = run("add-adapter", "provider-select", "--epochs", "3", "--lr", "0.01", "--force", "--backend", "local",
              ws=ws)
    assert res.exit_code == 0, res.output
    lookup, call = calls
    assert lookup == {"backend": "local"}
    assert call["registry"].adapter_names == ["calendar", "claim-window", "provider-select"]
    assert (call["options"].epochs, call["options"].lr) == (3, 0.01)
    assert "provider-select" not in call["file_at_call"]  # not written before training succeeded
    assert "name: provider-select" in (ws / "registry.yaml").read_text()
    assert "val acc 0.900" in res.stdout and "embedded 4 new, reused 5 cached" in res.stdout


@pytest.mark.parametrize("outcome", ["raises", "gate-refuses"])
def test_failed_retrain_leaves_registry_untouched(ws, monkeypatch, outcome):
    from vlrouter.core.errors import PromotionRefused
    from vlrouter.core.store import promote

    def behaviour(req):
        if outcome == "raises":
            raise PromotionRefused("runs/router: new router scored 0.50 < live 0.90 (fix: pass --force)")
        promote(_candidate(req.registry, always=0, acc=0.6).dir, req.registry.router_dir)  # live: 0.6 on val
        return _candidate(req.registry, acc=0.4)  # says 0.4 on the same samples

    _fake_train(monkeypatch, behaviour)
    before = (ws / "registry.yaml").read_bytes()
    for args in (["add-adapter", "provider-select"], ["remove-adapter", "calendar"]):
        if args[0] == "remove-adapter":
            assert run("add-adapter", "provider-select", "--no-retrain", ws=ws).exit_code == 0
            before = (ws / "registry.yaml").read_bytes()
        res = run(*args, ws=ws)
        assert res.exit_code == 1
        assert len(res.stderr.strip().splitlines()) == 1
        assert ("0.50 < live 0.90" if outcome == "raises" else "new router 0.400 < live 0.600") in res.stderr
        assert (ws / "registry.yaml").read_bytes() == before


def test_registry_edited_during_retrain_is_not_overwritten(ws, monkeypatch):
    def behaviour(req):
        req.registry.path.write_text(req.registry.path.read_text() + "# edited meanwhile\n")
        return _candidate(req.registry, acc=0.9)

    _fake_train(monkeypatch, behaviour)
    res = run("add-adapter", "provider-select", ws=ws)
    assert res.exit_code == 1
    assert "changed on disk" in res.stderr and "already live" in res.stderr
    text = (ws / "registry.yaml").read_text()
    assert "# edited meanwhile" in text and "provider-select" not in text


def test_status_base_model_local_folder_written_or_resolved_is_not_stale(ws):
    (ws / "models" / "tiny").mkdir(parents=True)
    (ws / "registry.yaml").write_text(REGISTRY.replace("Qwen/Qwen3-VL-8B-Instruct", "models/tiny"))
    names = ["calendar", "claim-window"]
    for recorded in ("models/tiny", str(ws / "models" / "tiny")):
        _write_router(ws, names, base_model=recorded)
        assert status_json(ws)["router"]["state"] == "ok", recorded
    _write_router(ws, names, base_model="Qwen/Qwen3-VL-2B-Instruct")
    st = status_json(ws)["router"]
    assert st["state"] == "stale" and "base_model" in st["reason"] and "Qwen3-VL-2B" in st["reason"]


def _module_plugin(monkeypatch, modname: str, declares: str | None):
    import types

    from vlrouter import AdapterSpec, hookimpl

    mod = types.ModuleType(modname)
    if declares:
        @hookimpl
        def register_adapters(register):
            register(AdapterSpec(name=declares, dataset=f"data/{declares}/train.jsonl",
                                 checkpoint=f"checkpoints/{declares}"))

        mod.register_adapters = register_adapters

    @hookimpl
    def parse_action(adapter, text):
        return None

    mod.parse_action = parse_action
    monkeypatch.setitem(sys.modules, modname, mod)
    return mod


def test_plugin_option_declaring_the_adapter_gives_its_defaults(ws, monkeypatch):
    _module_plugin(monkeypatch, "tests_cli_forms_plugin", "invoice-form")
    (ws / "data" / "invoice-form").mkdir()
    (ws / "data" / "invoice-form" / "train.jsonl").write_text(SAMPLE)
    res = run("add-adapter", "invoice-form", "--plugin", "tests_cli_forms_plugin", "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    assert ("  - name: invoice-form\n    plugin: tests_cli_forms_plugin\n"
            "    dataset: data/invoice-form/train.jsonl\n") in (ws / "registry.yaml").read_text()
    # The written `plugin:` is what later commands load.
    rows = {r["name"]: r for r in json.loads(run("plugins", "--json", ws=ws).stdout)["plugins"]}
    assert rows["tests_cli_forms_plugin"]["adapters"] == ["invoice-form"]


def test_plugin_option_for_a_generic_adapter_is_written(ws, monkeypatch):
    _module_plugin(monkeypatch, "tests_cli_parser_only", None)
    res = run("add-adapter", "notes", "--plugin", "tests_cli_parser_only", "--dataset",
              str(ws / "data/calendar/train.jsonl"), "--checkpoint", str(ws / "ck"), "--no-retrain", ws=ws)
    assert res.exit_code == 0, res.output
    assert "plugin: tests_cli_parser_only" in (ws / "registry.yaml").read_text()


@pytest.mark.parametrize("args,expected", [
    (["add-adapter", "invoice-form", "--plugin", "no_such_vlrouter_plugin_mod", "--no-retrain"],
     ["--plugin", "no_such_vlrouter_plugin_mod"]),
    (["add-adapter", "notes", "--dataset", "data/calendar/train.jsonl", "--no-retrain"],
     ["adapters[2].name", "--dataset and --checkpoint", "add --checkpoint"]),
], ids=["plugin-does-not-import", "generic-needs-both-paths"])
def test_more_add_adapter_errors(ws, args, expected):
    before = (ws / "registry.yaml").read_bytes()
    res = run(*args, ws=ws)
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == 1
    for s in expected:
        assert s in res.stderr, (s, res.stderr)
    assert (ws / "registry.yaml").read_bytes() == before
