"""Faults found by trying to break a trained project (issue #12): data loss, wrong results, unclear errors.

One cold ``router retrain`` (module fixture), run the way the README's demo does it: the
registry names its base model by a relative folder (``models/tiny``) and training runs from
the project's *parent* folder with ``--registry proj/registry.yaml``. Each test works on its
own copy of that project (so the copy is also a "moved" project).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests.helpers import make_dataset, make_registry
from vlrouter.cli.app import app

N = 20
TASKS = ["calendar", "claim-window", "provider-select"]
ENV = {"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": "0"}


def router(*args: str, project: Path | None = None, env: dict | None = None):
    tail = ["--registry", str(project / "registry.yaml")] if project is not None else []
    return CliRunner().invoke(app, [*args, *tail], env={**ENV, **(env or {})})


def error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def one_error(res, code: int = 1) -> str:
    errs = error_lines(res)
    assert res.exit_code == code and len(errs) == 1, res.output
    assert "Traceback" not in res.output and "unexpected" not in errs[0], res.output
    return errs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    parent = tmp_path_factory.mktemp("trained-rel")
    project = parent / "proj"
    make_registry(project, "models/tiny", TASKS, n=N)
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    cwd = os.getcwd()
    os.chdir(parent)  # train from another folder with a relative --registry, as `make demo` does
    try:
        res = CliRunner().invoke(app, ["retrain", "--registry", "proj/registry.yaml"], env=ENV)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return project


@pytest.fixture
def project(trained, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(trained, dst, symlinks=True)
    return dst


def _live(project: Path) -> dict:
    return json.loads((project / "runs" / "router" / "router.json").read_text())


def _snapshot(project: Path) -> tuple:
    live = project / "runs" / "router"
    return ((project / "registry.yaml").read_bytes(), os.readlink(live), (live / "router.json").read_bytes(),
            (live / "head.safetensors").read_bytes())


# ---- the README's steps: paths mean the same from any working directory ------------------------

def test_router_json_records_the_base_model_so_it_means_the_same_from_any_folder(trained, project, monkeypatch):
    meta = _live(trained)
    assert meta["base_model"] == str(trained / "models" / "tiny")  # absolute, not "proj/models/tiny"
    assert meta["model_fingerprint"]
    for cwd, reg in ((project, "registry.yaml"), (project.parent, "proj/registry.yaml"), (project / "runs", "..")):
        monkeypatch.chdir(cwd)
        res = CliRunner().invoke(app, ["status", "--json", "--registry", reg], env=ENV)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["router"]["state"] == "ok", res.stdout  # the copy is a moved project, too
    monkeypatch.chdir(project)
    res = CliRunner().invoke(app, ["eval", "--json"], env=ENV)  # was: "Repo id must be in the form…"
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["n"] == 3 * N // 5


# ---- data loss -----------------------------------------------------------------------------------

def test_train_on_an_older_dataset_for_other_labels_is_refused(project):
    old = router("build-dataset", "--json", project=project)
    old_dir = json.loads(old.stdout)["dataset_dir"]
    make_dataset(project / "data" / "settings", "settings", N)
    res = router("add-adapter", "settings", "--dataset", str(project / "data/settings/train.jsonl"),
                 "--checkpoint", str(project / "checkpoints/settings"), project=project)
    assert res.exit_code == 0, res.output
    before = _snapshot(project)
    res = router("train", "--dataset", old_dir, "--force", project=project)
    msg = one_error(res)
    assert "built for adapters ['calendar', 'claim-window', 'provider-select'], but the registry lists " \
           "['calendar', 'claim-window', 'provider-select', 'settings']" in msg and "router build-dataset" in msg
    assert _snapshot(project) == before  # the live 4-adapter router stays


def test_a_symlinked_registry_stays_a_link_and_its_target_changes(project):
    real = project / "shared-registry.yaml"
    shutil.move(project / "registry.yaml", real)
    (project / "registry.yaml").symlink_to(real.name)
    make_dataset(project / "data" / "settings", "settings", 4)
    res = router("add-adapter", "settings", "--no-retrain", "--dataset", str(project / "data/settings/train.jsonl"),
                 "--checkpoint", str(project / "checkpoints/settings"), project=project)
    assert res.exit_code == 0, res.output
    assert (project / "registry.yaml").is_symlink() and "name: settings" in real.read_text()


@pytest.mark.parametrize("setting", ["router-dir-dot", "router-dir-notes", "router-dir-registry"])
def test_router_dir_over_user_files_is_refused_by_retrain(project, setting):
    (project / "notes").mkdir()
    (project / "notes" / "plan.md").write_text("mine")
    value = {"router-dir-dot": ".", "router-dir-notes": "notes", "router-dir-registry": "registry.yaml"}[setting]
    reg = project / "registry.yaml"
    reg.write_text(reg.read_text().replace("dir: runs/router", f"dir: {value}"))
    before = sorted(p.name for p in project.parent.iterdir()), reg.read_bytes()
    msg = one_error(router("retrain", project=project))
    assert "router.dir" in msg and "(fix: set router.dir" in msg
    assert (sorted(p.name for p in project.parent.iterdir()), reg.read_bytes()) == before  # no lock file beside
    assert (project / "notes" / "plan.md").read_text() == "mine" and not reg.is_symlink()


# ---- wrong results -------------------------------------------------------------------------------

def test_a_router_that_cannot_beat_chance_is_never_promoted(tmp_path, tiny_model_dir):
    """`train.lr: 1e3` (or data that cannot be told apart) used to promote a head at chance: no live router to beat."""
    path = make_registry(tmp_path, tiny_model_dir, ["calendar", "claim-window"], n=6)
    image = tmp_path / "data" / "calendar" / "images" / "calendar-0-0000.png"
    for name in ("calendar", "claim-window"):  # every sample the same screenshot and words: nothing to learn
        rec = {"image": str(image), "conversations": [{"from": "human", "value": "<image>\nDo it"}]}
        (tmp_path / "data" / name / "train.jsonl").write_text(
            "".join(json.dumps({**rec, "id": f"{name}-{i}"}) + "\n" for i in range(6)))
    res = router("retrain", "--lr", "1000", "--force", "--registry", str(path))
    msg = one_error(res)
    assert "does not beat chance 0.500" in msg and "not even with --force" in msg
    assert not (tmp_path / "runs" / "router").exists()
    assert "train.lr" in one_error(router("retrain", "--lr", "inf", "--registry", str(path)))


def test_a_router_with_nan_temperature_is_unreadable_not_up_to_date(project):
    meta = _live(project)
    live = Path(os.path.realpath(project / "runs" / "router"))
    (live / "router.json").write_text(json.dumps({**meta, "temperature": float("nan")}))
    res = router("status", "--json", project=project)
    state = json.loads(res.stdout)["router"]  # valid JSON: no bare NaN
    assert state["state"] == "unreadable" and "temperature" in state["reason"]
    res = router("eval", "--json", project=project)
    assert res.exit_code == 1 and "temperature" in json.loads(res.stdout)["error"]["message"]


# ---- unclear errors: the OS refusing a write ----------------------------------------------------

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["feature-cache", "promotion", "tensorboard-thread", "read-only-versions"])
def test_a_full_or_read_only_disk_is_one_located_line_and_the_live_router_stays(project, monkeypatch, where):
    if where == "feature-cache":
        shutil.rmtree(project / ".features")
        import safetensors.torch

        real = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            if ".features" in str(filename):
                raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif where == "promotion":
        monkeypatch.setattr(os, "symlink", _enospc)
    elif where == "tensorboard-thread":
        from tensorboard.summary.writer import record_writer

        monkeypatch.setattr(record_writer.RecordWriter, "write", lambda self, data: _enospc())
    else:
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if ".router.versions" in str(self):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    before = _snapshot(project)
    res = router("retrain", "--force", project=project)
    msg = one_error(res)
    assert "cannot write: " in msg and ("no space left" in msg or "read-only" in msg) and "(fix: " in msg
    assert _snapshot(project) == before


@pytest.mark.parametrize("field", ["cache_dir", "datasets_dir"])
def test_a_work_folder_that_is_a_file_is_one_located_line(project, field):
    (project / "notes.txt").write_text("mine")
    reg = project / "registry.yaml"
    reg.write_text(reg.read_text().replace("train:\n", f"train:\n  {field}: notes.txt\n"))
    msg = one_error(router("retrain", project=project))
    assert f"train.{field}" in msg and "is a file" in msg
    assert (project / "notes.txt").read_text() == "mine"


# ---- newcomer rough edges ------------------------------------------------------------------------

def test_errors_are_json_on_stdout_under_json(project):
    res = router("train", "--dataset", str(project / "nope"), "--json", project=project)
    err = json.loads(res.stdout)["error"]
    assert res.exit_code == 1 and err["type"] == "DatasetError" and "routing dataset folder not found" in \
        err["message"] and len(error_lines(res)) == 1
    res = router("retrain", "--epochs", "1", "--lr", "1e-4", "--json", project=project)  # below the live router
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and out["promoted"] is False and out["error"]["type"] == "PromotionRefused"
    assert out["error"]["live_val_acc"] == 1.0 and Path(out["error"]["candidate_dir"]).is_dir()


def test_embed_says_how_many_workers_it_chose_and_why_without_progress_residue(project):
    from vlrouter.core.options import auto_workers

    reg = project / "registry.yaml"
    reg.write_text(reg.read_text().replace("  workers: 1\n", ""))  # the default: auto
    res = CliRunner().invoke(app, ["embed", "--registry", str(project / "registry.yaml")],
                             env={"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": None})
    assert res.exit_code == 0, res.output
    count, why = auto_workers()
    assert f"workers: {count} ({why})" in res.stdout
    assert not any(ch in res.stderr for ch in "━⠋⠙⠹⠸|█"), res.stderr  # no bars or spinners off a terminal


def test_status_json_shows_the_routing_settings(project):
    data = json.loads(router("status", "--json", project=project).stdout)
    assert (data["min_confidence"], data["fallback"], data["max_prompt_tokens"]) == (0.0, "base", 4096)
    assert data["router"]["temperature"] > 0 and data["base_model_present"] is True
