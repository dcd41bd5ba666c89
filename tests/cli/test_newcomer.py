"""A newcomer's first minutes: --version, refusals that protect their files, errors as JSON, valid JSON only."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
from typer.testing import CliRunner

import vlrouter
import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests.helpers import make_registry
from vlrouter.cli.app import app
from vlrouter.cli.ui import print_json

ENV = {"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": "0"}


def router(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def one_error_line(res, code: int = 1) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and "unexpected" not in lines[0]
    return lines[0]


def test_version():
    res = router("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"vlrouter {vlrouter.__version__}"


@pytest.mark.parametrize("what", ["files", "a-file"])
def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, what):
    target = tmp_path / "mine"
    if what == "files":
        target.mkdir()
        (target / "notes.md").write_text("keep me")
        (target / "data").mkdir()
    else:
        target.write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    msg = one_error_line(router("demo", str(target)))
    assert ("is not empty" if what == "files" else "is not a folder") in msg and "(fix: choose a new" in msg
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # was: data/ and registry.yaml overwritten


def test_add_adapter_refuses_a_reserved_name(tmp_path):
    reg = make_registry(tmp_path, "Qwen/Qwen3-VL-8B-Instruct", ["calendar", "claim-window"], n=2)
    before = reg.read_bytes()
    msg = one_error_line(router("add-adapter", "base", "--dataset", "d.jsonl", "--checkpoint", "ck",
                                "--no-retrain", "--registry", str(reg)))
    assert "adapter name 'base' is reserved" in msg and reg.read_bytes() == before


def test_a_prompt_that_is_not_text_is_one_line_before_anything_loads(tmp_path):
    msg = one_error_line(router("act", "shot.png", "Click \udc80", "--registry", str(tmp_path / "none.yaml")))
    assert "PROMPT: prompt is not valid Unicode text (a lone surrogate at character 6)" in msg


def test_errors_are_json_on_stdout_with_json(tmp_path):
    res = router("status", "--json", "--registry", str(tmp_path / "none.yaml"))
    assert res.exit_code == 1 and len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1
    err = json.loads(res.stdout)["error"]
    assert err == {"type": "RegistryError", "exit_code": 1, "message": err["message"]}
    assert "registry file not found" in err["message"]
    assert router("status", "--registry", str(tmp_path / "none.yaml")).stdout == ""  # without --json: stderr only


def test_json_output_is_always_valid_json():
    buf = io.StringIO()
    with redirect_stdout(buf):
        print_json({"p": float("nan"), "q": [float("inf"), 1.5]})
    assert json.loads(buf.getvalue()) == {"p": None, "q": [None, 1.5]}


def test_a_fifo_as_dataset_is_one_located_error(tmp_path):
    from vlrouter.core.data import read_adapter_dataset
    from vlrouter.core.errors import DatasetError

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match="FIFO"):  # was: blocked forever in open()
        read_adapter_dataset(fifo, adapter="calendar")


def test_tiny_model_and_seed_import_never_overwrite_or_block(tmp_path):
    real = tmp_path / "Qwen3-VL-8B"
    real.mkdir()
    (real / "config.json").write_text("{}")
    msg = one_error_line(router("tiny-model", str(real)))
    assert "already exists and is not an empty folder; nothing was written" in msg
    assert (real / "config.json").read_text() == "{}" and sorted(p.name for p in real.iterdir()) == ["config.json"]
    fifo = tmp_path / "router-head.pt"
    os.mkfifo(fifo)
    msg = one_error_line(router("import-seed-head", str(fifo), "--out", str(tmp_path / "out"), "--pooling", "mean"))
    assert "is a FIFO" in msg and not (tmp_path / "out").exists()
