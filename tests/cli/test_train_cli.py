"""`router build-dataset | embed | train | eval | retrain` and add-adapter's retrain, as a user runs them.

One cold `router retrain` over three synthetic adapters (module fixture); each test works
on its own copy of that project (datasets, feature cache and live router included).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests.helpers import corrupt_file, make_dataset, make_registry
from vlrouter.cli.app import app
from vlrouter.core.registry import Registry

N = 20  # samples per adapter: 16 train + 4 val
TASKS = ["calendar", "claim-window", "provider-select"]


def router(*args: str, project: Path):
    return CliRunner().invoke(app, [*args, "--registry", str(project / "registry.yaml")],
                              env={"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": "0"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A project after one cold `router retrain`: (project folder, that run's result)."""
    project = tmp_path_factory.mktemp("trained") / "proj"
    make_registry(project, tiny_model_dir, TASKS, n=N)
    res = router("retrain", project=project)
    assert res.exit_code == 0, res.output
    return project, res


@pytest.fixture
def project(trained, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(trained[0], dst, symlinks=True)
    return dst


def _live(project: Path) -> dict:
    return json.loads((project / "runs" / "router" / "router.json").read_text())


def _snapshot(project: Path) -> tuple:
    live = project / "runs" / "router"
    return ((project / "registry.yaml").read_bytes(), os.readlink(live), (live / "router.json").read_bytes(),
            (live / "head.safetensors").read_bytes())


def test_cold_retrain_learns_the_adapters_and_router_json_follows_the_registry(trained):
    project, res = trained
    assert "embedded 60 new, reused 0 cached" in res.stdout and "promoted" in res.stdout
    meta = _live(project)
    assert meta["adapters"] == Registry.load(project / "registry.yaml").adapter_names == TASKS
    assert meta["metrics"]["val_acc"] >= 0.8 and f"{meta['metrics']['val_acc']:.3f}" in res.stdout
    assert meta["embedded_new"] == 3 * N and meta["reused_cached"] == 0
    assert {"per_class", "confusion", "ece", "ece_calibrated"} <= set(meta["metrics"])
    assert list((project / "runs" / "router" / "tensorboard").glob("events.out.tfevents.*"))

    # reloading the head reproduces its logits exactly, on the cached features of the val split
    from vlrouter.core.data import load_routing_dataset
    from vlrouter.core.encoder import Encoder
    from vlrouter.core.features import embed_dataset
    from vlrouter.core.head import head_logits
    from vlrouter.core.store import load_router

    head, loaded = load_router(project / "runs" / "router")
    enc = Encoder.load(loaded.base_model, device="cpu")
    val = load_routing_dataset(meta["metrics"]["dataset_dir"]).split("val")
    views, stats = embed_dataset(enc, val, project / ".features", layers=[loaded.layer])
    assert stats["embedded_new"] == 0
    feats = loaded.representation().features(views)
    logits = head_logits(head, feats)
    again, _ = load_router(project / "runs" / "router")
    assert torch.equal(head_logits(again, feats), logits)
    acc = float((logits.argmax(1) == torch.tensor([s.label for s in val])).float().mean())
    assert acc == pytest.approx(meta["metrics"]["val_acc"])


def test_embed_again_embeds_nothing(project):
    res = router("embed", project=project)
    assert res.exit_code == 0, res.output
    assert f"embedded 0 new, reused {3 * N} cached" in res.stdout


def test_add_adapter_embeds_only_the_new_adapters_samples(project):
    ds = make_dataset(project / "data" / "settings", "settings", N)
    res = router("add-adapter", "settings", "--dataset", str(ds), "--checkpoint", str(project / "ck" / "settings"),
                 project=project)
    assert res.exit_code == 0, res.output
    meta = _live(project)
    assert meta["adapters"] == [*TASKS, "settings"] and meta["head"]["num_labels"] == 4
    assert meta["embedded_new"] == N and meta["reused_cached"] == 3 * N
    assert meta["metrics"]["val_acc"] >= 0.8
    assert Registry.load(project / "registry.yaml").adapter_names == [*TASKS, "settings"]


@pytest.mark.parametrize("failure", ["images-missing", "images-corrupt", "lock-held"])
def test_a_failed_add_adapter_retrain_leaves_registry_and_router_byte_identical(project, failure):
    ds = make_dataset(project / "data" / "settings", "settings", 4)
    for img in (ds.parent / "images").iterdir():
        if failure == "images-missing":
            img.unlink()
        elif failure == "images-corrupt":
            corrupt_file(img)
    before = _snapshot(project)
    args = ["add-adapter", "settings", "--dataset", str(ds), "--checkpoint", str(project / "ck")]
    if failure == "lock-held":
        from vlrouter.core.store import RouterLock

        with RouterLock(Registry.load(project / "registry.yaml").router_dir):
            res = router(*args, project=project)
        assert "another retrain holds the lock" in res.stderr
    else:
        res = router(*args, project=project)
        assert str(ds) in res.stderr and "'settings'" in res.stderr
        assert ("missing image" if failure == "images-missing" else "corrupt image") in res.stderr
    assert res.exit_code == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output  # one error line (after any skip notes)
    assert _snapshot(project) == before


def test_eval_gate_keeps_the_live_router_and_force_promotes(project):
    before = _snapshot(project)
    live_acc = _live(project)["metrics"]["val_acc"]
    # one epoch at a small lr: worse than the live router (1.0), still better than chance (the gate's floor)
    worse = ["retrain", "--epochs", "1", "--lr", "1e-4"]
    res = router(*worse, project=project)
    assert res.exit_code == 1, res.output
    assert f"< live {live_acc:.3f} on the same {3 * N // 5} validation samples" in res.stderr
    assert "--force" in res.stderr
    assert _snapshot(project) == before

    res = router(*worse, "--force", project=project)
    assert res.exit_code == 0, res.output
    assert "promoted by --force" in res.stdout
    meta = _live(project)
    assert meta["metrics"]["val_acc"] < live_acc and meta["metrics"]["live_val_acc"] == live_acc
    assert meta["embedded_new"] == 0  # same samples: every feature came from the cache


def test_train_eval_and_build_dataset_commands(project, tmp_path):
    res = router("train", project=project)  # newest dataset, same seed: same head, a tie promotes
    assert res.exit_code == 0, res.output
    assert ">= live" in res.stdout and "embedded 0 new" in res.stdout

    png = tmp_path / "confusion.png"
    res = router("eval", "--png", str(png), project=project)
    assert res.exit_code == 0, res.output
    for word in ("precision", "recall", "F1", "confusion matrix", "ECE", "embedded 0 new"):
        assert word in res.stdout, word
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = router("eval", "--json", "--png", str(png), project=project)
    report = json.loads(res.stdout)
    assert report["metrics"]["class_names"] == TASKS and len(report["metrics"]["confusion"]) == 3
    assert report["metrics"]["accuracy"] == pytest.approx(_live(project)["metrics"]["val_acc"])

    res = router("build-dataset", "--train-samples", "10", "--eval-samples", "5", project=project)
    assert res.exit_code == 0, res.output
    res = router("eval", "--split", "eval", "--json", "--png", str(png), project=project)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["n"] == 15


def test_bad_dataset_line_is_one_error_naming_file_and_line(tmp_path, tiny_model_dir):
    project = tmp_path / "proj"
    reg = make_registry(project, tiny_model_dir, TASKS[:2], n=3)
    path = project / "data" / "claim-window" / "train.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    before = reg.read_bytes()
    res = router("retrain", project=project)
    assert res.exit_code == 1
    assert f"{path}:4: not valid JSON" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert reg.read_bytes() == before and not (project / "runs" / "router").exists()
