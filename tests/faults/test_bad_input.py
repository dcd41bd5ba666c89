"""Bad input the other test files did not cover yet, one case each (see docs/faults.md for the full catalogue).

Every case ends in one error line (file, line or field, and a fix) or a counted skip, and
writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests import engine_helpers as H
from tests.helpers import make_dataset, make_registry
from vlrouter.cli.app import app
from vlrouter.core.data import read_adapter_dataset
from vlrouter.core.errors import CheckpointError, DatasetError, ImageError, InputError, RegistryError, StaleRouterError
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.images import open_image
from vlrouter.core.registry import Registry
from vlrouter.core.store import RouterMeta, load_router, save_router

BASE = "Qwen/Qwen3-VL-8B-Instruct"  # never loaded in the tests that use it


def router(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={"VLROUTER_DEBUG": "", "COLUMNS": "200", "VLROUTER_PROGRESS": "0",
                                                    **env})


def one_error_line(res, code: int = 1) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


# ---- registry.yaml ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    (b"base_model: m\nrouter:\n  dir: a\x00b\n", "r.yaml:3: YAML error: unacceptable character #x0000"),
    (b"base_model: m\n# caf\xe9\n", "r.yaml: not UTF-8 text (byte 19)"),
], ids=["nul-character", "latin-1-bytes"])
def test_registry_control_characters_and_non_utf8_are_one_located_line(tmp_path, raw, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    with pytest.raises(RegistryError) as e:
        Registry.load(path)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / expected)) and "\n" not in msg and "(fix: " in msg
    assert path.read_bytes() == raw


# ---- adapter datasets ---------------------------------------------------------------------------

def _dataset_with_line(tmp_path: Path, bad: bytes) -> Path:
    path = make_dataset(tmp_path / "cal", "calendar", 2)
    path.write_bytes(path.read_bytes() + bad + b"\n")
    return path


@pytest.mark.parametrize("bad,expected", [
    (b'{"id": "x", "image": "caf\xe9.png"}', ":3: not UTF-8 text (invalid continuation byte at byte 25 of the line)"),
    (b'{"id": ' + b"9" * 5000 + b"}", ":3: JSON that cannot be read: Exceeds the limit (4300 digits)"),
    (b"[" * 100_000, ":3: JSON that cannot be read: maximum recursion depth exceeded"),
], ids=["not-utf8", "integer-over-digit-limit", "nesting-too-deep"])
def test_dataset_lines_that_cannot_be_decoded_name_file_and_line(tmp_path, bad, expected):
    path = _dataset_with_line(tmp_path, bad)
    with pytest.raises(DatasetError) as e:
        read_adapter_dataset(path, adapter="calendar")
    assert str(e.value).startswith(f"{path}{expected}") and "\n" not in str(e.value)


def test_an_image_path_of_an_unknown_users_home_counts_as_missing(tmp_path):
    rec = {"id": "tilde", "image": "~no-such-user-vlrouter/x.png",
           "conversations": [{"from": "human", "value": "<image>\nClick"}]}
    path = _dataset_with_line(tmp_path, json.dumps(rec).encode())
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert len(samples) == 2 and skipped.missing == ["tilde"]


# ---- images -------------------------------------------------------------------------------------

def test_a_truncated_image_and_a_folder_are_image_errors(tmp_path):
    img = tmp_path / "shot.png"
    H.screen("calendar").save(img)
    img.write_bytes(img.read_bytes()[:-200])  # header intact, pixel data cut short
    with pytest.raises(ImageError, match=r"shot.png: corrupt image data .*\(fix: re-export the file\)"):
        open_image(img)
    with pytest.raises(ImageError, match="is a folder, not an image"):
        open_image(tmp_path)


# ---- router checkpoints -------------------------------------------------------------------------

@pytest.fixture
def router_dir(tmp_path) -> Path:
    shape = HeadShape(in_dim=8, num_labels=2)
    return save_router(tmp_path / "router", build_head(shape), RouterMeta(
        adapters=["calendar", "claim-window"], base_model=BASE, pooling="mean", layer=-1, hidden_size=8, head=shape))


def _edit_meta(router_dir: Path, **changes) -> None:
    meta = json.loads((router_dir / "router.json").read_text())
    meta.update(changes)
    (router_dir / "router.json").write_text(json.dumps(meta))


CHECKPOINT_CASES = {
    "router-json-not-json": (lambda d: (d / "router.json").write_text("{not json"), "router.json:1: not valid JSON"),
    "newer-format-version": (lambda d: _edit_meta(d, format_version=99),
                             "format 99 is newer than this vlrouter understands"),
    "names-vs-outputs": (lambda d: _edit_meta(d, adapters=["a", "b", "c"]),
                         "3 adapter names for a head with 2 outputs"),
    "weights-vs-shape": (lambda d: _edit_meta(d, head={"kind": "linear", "in_dim": 16, "num_labels": 2},
                                              hidden_size=16), "weights do not match router.json's head shape"),
    "head-missing": (lambda d: (d / "head.safetensors").unlink(), "head.safetensors not found"),
    "head-truncated": (lambda d: (d / "head.safetensors").write_bytes((d / "head.safetensors").read_bytes()[:50]),
                       "refusing to load it"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES), ids=list(CHECKPOINT_CASES))
def test_a_damaged_router_checkpoint_is_one_checkpoint_error(router_dir, case):
    damage, expected = CHECKPOINT_CASES[case]
    damage(router_dir)
    with pytest.raises(CheckpointError) as e:
        load_router(router_dir)
    assert expected in str(e.value) and "\n" not in str(e.value) and "(fix: " in str(e.value)


def test_status_reports_an_unreadable_router_instead_of_crashing(tmp_path):
    reg = make_registry(tmp_path / "p", BASE, ["calendar", "claim-window"], n=2)
    live = tmp_path / "p" / "runs" / "router"
    live.mkdir(parents=True)
    (live / "router.json").write_text("{not json")
    res = router("status", "--json", "--registry", str(reg))
    assert res.exit_code == 0, res.output
    state = json.loads(res.stdout)["router"]
    assert state["state"] == "unreadable" and "not valid JSON" in state["reason"]


def test_a_router_for_another_hidden_size_is_stale(engine_project, tmp_path):
    from vlrouter.core.engine import Engine

    root = tmp_path / "p"
    shutil.copytree(engine_project.parent, root, symlinks=True)
    live = root / "runs" / "router"
    meta = json.loads((live / "router.json").read_text())
    shape = HeadShape(in_dim=4096, num_labels=len(meta["adapters"]))  # a whole router, made for 4096 features
    shutil.rmtree(live)
    save_router(live, build_head(shape), RouterMeta(**{**meta, "hidden_size": 4096, "head": shape}))
    with pytest.raises(StaleRouterError, match=r"hidden_size: stale router: trained on features of size 4096.*"
                                               r"router retrain"):
        Engine.from_registry(root / "registry.yaml", device="cpu")


# ---- CLI arguments and the error boundary ----------------------------------------------------------

def test_out_of_range_flags_are_usage_errors_and_write_nothing(tmp_path):
    reg = make_registry(tmp_path / "p", BASE, ["calendar", "claim-window"], n=2)
    before = sorted(p.name for p in reg.parent.iterdir())
    for flag in (["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "-0.1"], ["--eval-samples", "-2"]):
        res = router("retrain", *flag, "--registry", str(reg))
        assert res.exit_code == 2 and flag[0] in res.output, res.output
    assert sorted(p.name for p in reg.parent.iterdir()) == before


def test_an_unknown_backend_suggests_the_close_one_and_writes_nothing(tmp_path):
    reg = make_registry(tmp_path / "p", BASE, ["calendar", "claim-window"], n=2)
    line = one_error_line(router("retrain", "--backend", "modall", "--registry", str(reg)))
    assert "unknown training backend 'modall'; did you mean 'modal'" in line and "(fix: " in line
    assert not (reg.parent / "datasets").exists() and not (reg.parent / "runs" / "router").exists()


def test_a_bug_is_one_line_with_exit_2_and_the_traceback_only_with_vlrouter_debug(tmp_path, monkeypatch):
    reg = make_registry(tmp_path / "p", BASE, ["calendar", "claim-window"], n=2)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(Registry, "load", classmethod(boom))
    line = one_error_line(router("status", "--registry", str(reg)), code=2)
    assert "unexpected RuntimeError: boom" in line and "VLROUTER_DEBUG=1" in line
    res = router("status", "--registry", str(reg), VLROUTER_DEBUG="1")
    assert isinstance(res.exception, RuntimeError)


def test_ctrl_c_exits_130_and_says_nothing_half_written_was_kept(tmp_path, monkeypatch):
    reg = make_registry(tmp_path / "p", BASE, ["calendar", "claim-window"], n=2)
    before = reg.read_bytes()

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlrouter.cli.train_cmds.run_retrain", interrupt)
    res = router("retrain", "--registry", str(reg))
    assert res.exit_code == 130 and "interrupted" in res.stderr and "Traceback" not in res.output
    assert reg.read_bytes() == before


# ---- engine inputs ------------------------------------------------------------------------------

def test_engine_argument_errors_come_before_the_model_runs(engine):
    with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
        engine.act(H.screen("calendar"), "Click", max_new_tokens=-1)
    with pytest.raises(InputError, match=r"no \(image, prompt\) items given"):
        engine.act_batch([])
    with pytest.raises(InputError, match="got 1 images for 2 prompts"):
        engine.embed([H.screen("calendar")], ["a", "b"])
    with pytest.raises(InputError, match="item 1: prompt is empty"):
        engine.act_batch([(H.screen("calendar"), "Click"), (H.screen("calendar"), " ")])
