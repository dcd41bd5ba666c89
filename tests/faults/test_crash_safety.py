"""kill -9 in the middle of `router retrain`, `router add-adapter` and `router embed`; two retrains at once.

No test hooks inside vlrouter: each test starts the real `router` command in a subprocess,
watches the project folder for a milestone (a feature-cache entry written, the candidate
version folder created, the candidate's router.json written, the live symlink swapped),
then sends SIGKILL. Afterwards, whatever the moment:

* the live router loads (``load_router``) and is either the one from before or one
  trained for the registry's adapter list -- never a mix, never half;
* registry.yaml holds the old bytes or the complete new file;
* every feature-cache entry on disk reads back whole;
* `router status` reports the state (ok / stale) instead of crashing;
* the retrain lock died with the process: the next retrain runs and promotes.

Setup: two adapters trained live (in-process, once); then a third adapter's dataset is
added and registry.yaml lists all three, so the live router is stale and a retrain
builds a router for a new label set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests.helpers import make_dataset, make_registry, retrain
from vlrouter.cli.app import app
from vlrouter.core.registry import Registry
from vlrouter.core.store import load_router

ROUTER = str(Path(sys.executable).with_name("router"))
OLD = ["calendar", "claim-window"]
NEW = [*OLD, "provider-select"]
# Long enough head training (about a second here) to land a kill inside it; one evaluation at the end.
TRAIN = {"epochs": 1000, "patience": 1, "eval_every": 100000, "embed_batch_size": 1}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLROUTER_")}
    env.update(VLROUTER_NO_ENTRY_POINTS="1", VLROUTER_PROGRESS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               COLUMNS="200")
    return env


@pytest.fixture(scope="module")
def base_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project whose live router knows calendar + claim-window, and whose registry lists three adapters."""
    root = tmp_path_factory.mktemp("crash") / "proj"
    reg_path = make_registry(root, tiny_model_dir, OLD, n=8, **TRAIN)
    retrain(reg_path, epochs=40)
    make_dataset(root / "data" / "provider-select", "provider-select", 30)
    text = reg_path.read_text() + ("  - name: provider-select\n    dataset: data/provider-select/train.jsonl\n"
                                   "    checkpoint: checkpoints/provider-select\n")
    reg_path.write_text(text)
    assert load_router(root / "runs" / "router")[1].adapters == OLD
    return root


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(base_project, dst, symlinks=True)
    return dst


# ---- watching and killing -----------------------------------------------------------------------

def _cache_entries(project: Path) -> list[Path]:
    return sorted(project.glob(".features/*/*/*.safetensors"))


def _versions(project: Path) -> set[Path]:
    vd = project / "runs" / ".router.versions"
    return {p for p in vd.iterdir() if p.is_dir()} if vd.is_dir() else set()


def _live_target(project: Path) -> str | None:
    live = project / "runs" / "router"
    return os.readlink(live) if live.is_symlink() else None


def _start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([ROUTER, *args, "--registry", str(project / "registry.yaml")], env=_env(), cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, milestone, *, delay: float = 0.0, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``milestone()`` first holds. False if it exited first."""
    t0 = time.monotonic()
    while not milestone():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command exited ({proc.returncode}) before the milestone:\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("milestone never reached")
        time.sleep(0.002)
    if delay:
        time.sleep(delay)
    alive = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode in (-signal.SIGKILL, 0) or not alive
    return alive


# ---- the invariants after a kill ----------------------------------------------------------------

def _status(project: Path) -> dict:
    res = CliRunner().invoke(app, ["status", "--json", "--registry", str(project / "registry.yaml")],
                             env={"VLROUTER_DEBUG": "", "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _check_consistent(project: Path, *, old_adapters: list[str], registry_before: bytes,
                      new_adapters: list[str] | None = None) -> list[str]:
    """The invariants every kill must leave; returns the live router's adapters.

    The live router must know ``old_adapters`` (the one from before) or ``new_adapters``
    (default: the registry's list, which a retrain trains for).
    """
    from safetensors.torch import load_file

    # registry.yaml: the old bytes, or a complete file that loads
    now = (project / "registry.yaml").read_bytes()
    reg = Registry.load(project / "registry.yaml")
    assert now == registry_before or reg.adapter_names[: len(old_adapters)] == old_adapters
    # the live router: loads whole, and is the old one or one for the registry's adapters
    _, meta = load_router(project / "runs" / "router")
    assert meta.adapters in (old_adapters, new_adapters or reg.adapter_names), meta.adapters
    assert meta.head.num_labels == len(meta.adapters)
    # every cache entry under its final name reads back whole (temp files are never read)
    for entry in _cache_entries(project):
        assert all(t.ndim == 1 for t in load_file(str(entry)).values()), entry
    # `router status` reports it without crashing
    status = _status(project)["router"]
    assert status["state"] == ("ok" if meta.adapters == reg.adapter_names else "stale"), status
    return list(meta.adapters)


def _finish_with_a_retrain(project: Path) -> None:
    """After any kill the lock is free and a retrain promotes a router for the registry's adapters."""
    res = subprocess.run([ROUTER, "retrain", "--registry", str(project / "registry.yaml")], env=_env(), cwd=project,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    live_adapters = load_router(project / "runs" / "router")[1].adapters
    assert live_adapters == Registry.load(project / "registry.yaml").adapter_names


# ---- kill -9 of `router retrain` at four points --------------------------------------------------

def test_kill_during_embedding_keeps_the_old_router_and_whole_cache_entries(project):
    before = (project / "registry.yaml").read_bytes()
    n_cached = len(_cache_entries(project))
    link = _live_target(project)
    proc = _start(project, "retrain")
    _kill_when(proc, lambda: len(_cache_entries(project)) >= n_cached + 3)
    assert len(_cache_entries(project)) < n_cached + 30  # killed mid-embedding: some of the 30 new ones missing
    assert _live_target(project) == link
    assert _check_consistent(project, old_adapters=OLD, registry_before=before) == OLD
    assert not [v for v in _versions(project) if (v / "router.json").exists() and v.name not in link]


def test_kill_during_head_training_keeps_the_old_router(project):
    before = (project / "registry.yaml").read_bytes()
    versions, link = _versions(project), _live_target(project)
    proc = _start(project, "retrain")
    _kill_when(proc, lambda: len(_versions(project)) > len(versions), delay=0.3)
    (candidate,) = _versions(project) - versions
    assert not (candidate / "router.json").exists()  # killed while training: the candidate never completed
    assert _live_target(project) == link  # ... and was never promoted
    assert _check_consistent(project, old_adapters=OLD, registry_before=before) == OLD
    _finish_with_a_retrain(project)


def test_kill_when_the_candidate_is_written_leaves_old_or_new_router(project):
    before = (project / "registry.yaml").read_bytes()
    versions = _versions(project)
    proc = _start(project, "retrain")
    _kill_when(proc, lambda: any((v / "router.json").exists() for v in _versions(project) - versions))
    live = _check_consistent(project, old_adapters=OLD, registry_before=before)
    assert live in (OLD, NEW)  # right before or right after the promotion


def test_kill_right_after_promotion_has_the_new_router_live(project):
    before = (project / "registry.yaml").read_bytes()
    link = _live_target(project)
    proc = _start(project, "retrain")
    _kill_when(proc, lambda: _live_target(project) != link)
    assert _check_consistent(project, old_adapters=OLD, registry_before=before) == NEW
    assert (project / "registry.yaml").read_bytes() == before  # retrain never writes it


def test_kill_of_add_adapter_after_promotion_leaves_registry_old_or_whole_and_status_says_stale(project):
    reg_path = project / "registry.yaml"
    reg_path.write_text(reg_path.read_text().split("  - name: provider-select")[0])  # back to the two live ones
    before = reg_path.read_bytes()
    link = _live_target(project)
    ds = project / "data" / "provider-select" / "train.jsonl"
    proc = _start(project, "add-adapter", "provider-select", "--dataset", str(ds), "--checkpoint",
                  str(project / "checkpoints" / "provider-select"))
    _kill_when(proc, lambda: _live_target(project) != link)
    live = _check_consistent(project, old_adapters=OLD, registry_before=before, new_adapters=NEW)
    assert live == NEW
    if reg_path.read_bytes() == before:  # killed before the save: the router is ahead of the file
        assert _status(project)["router"]["state"] == "stale"
    else:
        assert Registry.load(reg_path).adapter_names == NEW


# ---- `router embed` interrupted, then run again --------------------------------------------------

def test_an_interrupted_embed_resumes_from_the_entries_already_written(project):
    from safetensors.torch import load_file

    from vlrouter.core.data import build_routing_dataset

    reg = Registry.load(project / "registry.yaml")
    ds = build_routing_dataset(reg, project / "datasets", seed=0)
    total = sum(len(ln.strip().splitlines()) for ln in
                ((ds / f"{s}.jsonl").read_text() for s in ("train", "val")))
    start = len(_cache_entries(project))  # the two old adapters' samples are cached already
    assert total - start >= 20
    proc = _start(project, "embed", "--dataset", str(ds))
    _kill_when(proc, lambda: len(_cache_entries(project)) >= start + 5)
    kept = {p.name: load_file(str(p)) for p in _cache_entries(project)}  # each one reads back whole
    assert start + 5 <= len(kept) < total, (start, len(kept), total)

    res = subprocess.run([ROUTER, "embed", "--json", "--dataset", str(ds),
                          "--registry", str(project / "registry.yaml")],
                         env=_env(), cwd=project, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    stats = json.loads(res.stdout)
    assert stats["reused_cached"] == len(kept) and stats["embedded_new"] == total - len(kept)
    after = {p.name: load_file(str(p)) for p in _cache_entries(project)}
    assert len(after) == total  # kept entries untouched:
    assert all(after[k].keys() == v.keys() and all(after[k][n].equal(t) for n, t in v.items()) for k, v in kept.items())


# ---- two retrains at once ------------------------------------------------------------------------

def test_two_concurrent_retrains_one_runs_the_other_says_the_lock_is_held(project):
    versions, datasets = _versions(project), set((project / "datasets").iterdir())
    procs = [_start(project, "retrain") for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, _, err in results if rc == 1)
    errors = [ln for ln in loser.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another retrain holds the lock" in errors[0], loser
    # never interleaved: one routing dataset, one candidate, and it is the live router
    assert len(set((project / "datasets").iterdir()) - datasets) == 1
    (new,) = _versions(project) - versions
    assert os.path.realpath(project / "runs" / "router") == str(new.resolve())
    assert load_router(project / "runs" / "router")[1].adapters == NEW


# ---- a reader while the live router flips ---------------------------------------------------------

_LOADER = r"""
import json, sys, time
from vlrouter.core.errors import CheckpointError
from vlrouter.core.store import load_router
live, seconds = sys.argv[1], float(sys.argv[2])
counts = {"loads": 0, "mixed": 0, "errors": 0}
load_router(live)  # imports torch + safetensors before the clock starts
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        head, meta = load_router(live)
    except CheckpointError as e:  # allowed: one clear error; never a mix
        counts["errors"] += 1
        continue
    counts["loads"] += 1
    # each version's bias encodes its own tag: a head read from the other version shows up here
    if round(float(head[-1].bias[0]), 3) != meta.metrics["tag"] or meta.adapters != meta.metrics["names"]:
        counts["mixed"] += 1
print(json.dumps(counts), flush=True)
"""


def test_a_loader_during_a_flip_loop_always_gets_one_whole_version(tmp_path):
    """Promotion flips the live router between two versions as fast as it can while another process loads it:
    every load is one consistent version (router.json and head.safetensors from the same folder)."""
    import torch

    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.store import RouterMeta, new_version_dir, promote, save_router

    live = tmp_path / "runs" / "router"
    versions = []
    for tag, names in ((1.0, ["a", "b"]), (2.0, ["b", "a"])):
        shape = HeadShape(in_dim=8, num_labels=2)
        head = build_head(shape)
        with torch.no_grad():
            head[-1].bias.fill_(tag)
        meta = RouterMeta(adapters=names, base_model="m", pooling="mean", layer=-1, hidden_size=8, head=shape,
                          metrics={"tag": tag, "names": names, "val_acc": 1.0})
        versions.append(save_router(new_version_dir(live), head, meta))
    promote(versions[0], live)
    seconds = 3.0
    proc = subprocess.Popen([sys.executable, "-c", _LOADER, str(live), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "ready"
    flips, end = 0, time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        promote(versions[flips % 2 == 0], live)
        flips += 1
    out, _ = proc.communicate(timeout=30)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["mixed"] == 0, counts
    assert counts["loads"] > 20 and flips > 20, (counts, flips)
    assert sorted(p.name for p in live.parent.iterdir()) == [".router.versions", "router"]  # no temp links left
