"""`router route` and `router act`, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests import engine_helpers as H
from vlrouter.cli.app import app


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_encoder):
    root = tmp_path_factory.mktemp("cli-engine")
    reg = H.make_project(root, tiny_model_dir, encoder=tiny_encoder)
    for img, _, name in H.samples():
        if not (root / f"{name}.png").exists():
            img.save(root / f"{name}.png")
    return reg


def run(*args: str, registry: Path):
    return CliRunner().invoke(app, [*args, "--registry", str(registry), "--device", "cpu"],
                              env={"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": "0"})


def test_route_json(project):
    res = run("route", str(project.parent / "claim-window.png"), "Type the claim number into the form", "--json",
              registry=project)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["adapter"] == "claim-window"
    assert list(data["probs"]) == H.NAMES
    assert data["confidence"] == max(data["probs"].values())


def test_route_table(project):
    res = run("route", str(project.parent / "calendar.png"), "Click March 29 in the calendar", registry=project)
    assert res.exit_code == 0, res.output
    assert "adapter: calendar" in res.stdout and "router probabilities" in res.stdout
    for name in H.NAMES:
        assert name in res.stdout


def test_act_json(project):
    res = run("act", str(project.parent / "provider-select.png"), "Select Dr. Smith from the provider list",
              "--json", "--max-new-tokens", "4", registry=project)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["adapter"] == data["routed"] == "provider-select" and data["fallback"] is False
    assert isinstance(data["text"], str) and "action" in data
    assert set(data["timings"]) >= {"route_ms", "generate_ms", "total_ms"}


def test_act_table(project):
    res = run("act", str(project.parent / "calendar.png"), "Click March 29 in the calendar", "--max-new-tokens", "4",
              registry=project)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "adapter: calendar" in out and "text:" in out and "action:" in out and "timings: route" in out


def test_missing_image_is_one_line_error(project):
    res = run("act", str(project.parent / "nope.png"), "Click", registry=project)
    assert res.exit_code == 1
    assert "error:" in res.output and "nope.png" in res.output and "not found" in res.output
    assert "Traceback" not in res.output


def test_empty_prompt_is_one_line_error(project):
    res = run("route", str(project.parent / "calendar.png"), "  ", registry=project)
    assert res.exit_code == 1 and "prompt is empty" in res.output


def test_stale_router_says_retrain(project, tmp_path):
    shutil.copytree(project.parent, tmp_path / "p", symlinks=True)
    reg = tmp_path / "p" / "registry.yaml"
    with reg.open("a") as f:
        f.write("  - name: new-task\n    dataset: data/new/train.jsonl\n    checkpoint: checkpoints/calendar\n")
    res = run("route", str(project.parent / "calendar.png"), "Click", registry=reg)
    assert res.exit_code == 1
    assert "stale router" in res.output and "router retrain" in res.output and "Traceback" not in res.output


def test_bad_max_new_tokens_is_refused(project):
    res = run("act", str(project.parent / "calendar.png"), "Click", "--max-new-tokens", "0", registry=project)
    assert res.exit_code == 2


def test_act_shows_the_fallback(project, tmp_path):
    shutil.copytree(project.parent, tmp_path / "p", symlinks=True)
    root = tmp_path / "p"
    reg = root / "registry.yaml"
    reg.write_text(reg.read_text().replace("min_confidence: 0.0", "min_confidence: 0.9"))
    meta_path = root / "runs" / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta["temperature"] = 1000.0  # every probability near 1/3: below min_confidence
    meta_path.write_text(json.dumps(meta))
    res = run("act", str(root / "calendar.png"), "Click March 29 in the calendar", "--max-new-tokens", "2",
              registry=reg)
    assert res.exit_code == 0, res.output
    assert "adapter: base" in res.stdout and "router chose calendar, below router.min_confidence" in res.stdout
    data = json.loads(run("act", str(root / "calendar.png"), "Click March 29 in the calendar", "--json",
                          "--max-new-tokens", "2", registry=reg).stdout)
    assert (data["adapter"], data["routed"], data["fallback"]) == ("base", "calendar", True)
