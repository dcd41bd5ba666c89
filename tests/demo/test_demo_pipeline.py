"""The offline demo end to end, small: every step runs and reports what the README promises, and the README's
next steps then work verbatim from inside the demo folder.

One `router demo demo-run` (module fixture, through the CLI, from a scratch folder, building its own tiny
model as `make demo` does) serves both tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from vlrouter.cli.app import app
from vlrouter.core.registry import Registry
from vlrouter.core.store import read_meta
from vlrouter.demo.pipeline import EXTRA_TASK, SEED_TASKS

README = Path(__file__).resolve().parents[2] / "README.md"
SAMPLES = 12  # per task: few enough to be quick, enough for the router to beat chance (the gate's floor)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``router demo demo-run --samples 12 --lora-steps 1`` run in a scratch folder: (folder, report, output)."""
    import vlrouter.cli.demo_cmds as demo_cmds

    root = tmp_path_factory.mktemp("readme")
    reports = []
    original = demo_cmds.run_demo

    def run_and_keep(*args, **kwargs):  # the CLI prints the report; keep it for the assertions too
        reports.append(original(*args, **kwargs))
        return reports[-1]

    cwd = os.getcwd()
    os.chdir(root)  # `make demo` runs `router demo demo-run`: a path relative to where it runs
    demo_cmds.run_demo = run_and_keep
    try:
        res = CliRunner().invoke(app, ["demo", "demo-run", "--samples", str(SAMPLES), "--lora-steps", "1",
                                       "--heldout", "3"],
                                 env={"COLUMNS": "200", "VLROUTER_DEBUG": "", "VLROUTER_PROGRESS": "0"})
    finally:
        demo_cmds.run_demo = original
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return root, reports[0], res


def test_demo_runs_every_step_and_add_adapter_embeds_only_the_new_task(demo):
    root, report, res = demo
    assert [r.adapter for r in report.lora] == [*SEED_TASKS, EXTRA_TASK]
    assert all(0.0 <= r.parse_rate <= 1.0 and r.checked > 0 for r in report.lora)
    # retrain over the seed's three, then add-adapter embeds only the fourth task's samples
    assert report.retrain.adapters == list(SEED_TASKS) and report.retrain.reused_cached == 0
    assert report.add_adapter.adapters == [*SEED_TASKS, EXTRA_TASK]
    assert report.add_adapter.embedded_new == SAMPLES
    assert report.add_adapter.reused_cached == report.retrain.embedded_new
    registry = Registry.load(root / "demo-run" / "registry.yaml")
    assert registry.adapter_names == [*SEED_TASKS, EXTRA_TASK]
    assert read_meta(registry.router_dir).adapters == registry.adapter_names
    png = root / report.confusion_png  # the report's paths are as given: relative to where the demo ran
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert len(report.acts) == 8 and {a["adapter"] for a in report.acts} <= {*registry.adapter_names, "base"}
    json.dumps(report.acts)  # the act table is plain data
    for step in ("router retrain", "router add-adapter settings-toggle", "router eval", "engine.act"):
        assert step in res.stdout
    assert not re.search(r"\d+%\|", res.stderr), res.stderr  # no tqdm residue from transformers or peft


def _readme_steps() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- readme-steps:start", 1)[1].split("<!-- readme-steps:end -->", 1)[0]
    code = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip()]


def test_the_readme_steps_after_make_demo_run_verbatim(demo):
    root, _, _ = demo
    venv = root / ".venv"  # the README's commands call ../.venv/bin/router from inside demo-run
    if not venv.exists():
        prefix = Path(sys.prefix)
        if (prefix / "bin" / "router").is_file():
            venv.symlink_to(prefix)
        else:  # the console script is not installed: the same entry point through this interpreter
            (venv / "bin").mkdir(parents=True)
            (venv / "bin" / "router").write_text(f"#!/bin/sh\nexec {sys.executable} -m vlrouter.cli.main \"$@\"\n")
            (venv / "bin" / "router").chmod(0o755)
    steps = _readme_steps()
    assert steps[0] == "cd demo-run" and any(" status" in s for s in steps) and any(" act " in s for s in steps)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLROUTER_")}
    env.update(VLROUTER_NO_ENTRY_POINTS="1", COLUMNS="200")
    cwd = root
    for step in steps:
        argv = shlex.split(step)
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            continue
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{step}\n{out.stdout}\n{out.stderr}"  # was: "stale router: trained on …"
        assert "Traceback" not in out.stderr and not re.search(r"\d+%\|", out.stderr), out.stderr
        if argv[1] == "status":
            assert "up to date" in out.stdout, out.stdout
        if argv[1] == "act":
            assert "adapter:" in out.stdout and "action:" in out.stdout, out.stdout
