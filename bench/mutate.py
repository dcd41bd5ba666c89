#!/usr/bin/env python
"""Mutation testing of vlrouter: put one small bug at a time into the code and see whether a test fails.

    .venv/bin/python bench/mutate.py run   [--files F ...] [--sample N] [--max-minutes 26] [--jobs 2]
                                           [--budget 30] [--survivors-of bench/results/mutate.json]
    .venv/bin/python bench/mutate.py known [--runs 3] [--only NAME ...]
    .venv/bin/python bench/mutate.py list  [--files F ...]          (the mutants; nothing runs)

``run`` (``make mutate``): the mutants of every module under ``--paths`` (default vlrouter/core and
vlrouter/plugins; operators in ``bench/mutate_ops.py``) in a seeded random order -- so the mutants done
when ``--max-minutes`` runs out are a uniform sample -- each against the tests that execute its lines.
Writes ``bench/results/mutate.json`` and ``mutate.md``: mutants, killed, timeouts, survived (covered, no
test failed) and not covered, per package and module, and every survivor's file:line and diff.
``--survivors-of REPORT`` re-runs an earlier report's survivors (after adding tests for them). A mutant
shown not to change behaviour goes into ``bench/mutants/equivalent.txt`` with the reason; it is then
reported as equivalent, not run, and left out of the surviving percentage.

``known`` (``make mutate-known``): the realistic bugs kept as patches in ``bench/mutants/known/*.patch``
(a ``# bug:`` line says what it is, a ``# tests:`` line which tests must catch it), each applied and its
tests run ``--runs`` times: every run must fail. Writes ``bench/results/mutate-known.json``; exit status
1 when a bug survives a run, its tests fail without it, or its patch no longer applies.

How it stays fast on 2 cores and never touches the working tree:

* Everything runs in a copy of the tree (git's tracked and untracked-not-ignored files) in a temp folder,
  one copy per job; a mutant is written there and put back after its run; the folder is deleted at the
  end, Ctrl-C included.
* One process imports torch/transformers/peft once and ``fork``s a child per pytest run, which imports
  vlrouter and runs ``pytest.main`` in the copy: no 5-10 s interpreter start-up per mutant. Every write
  of a module gets a fresh modification time, so a cached ``.pyc`` never stands in for a mutant. Torch
  runs one thread per job (tiny tensors; two threads per process on 2 busy cores are 10-40x slower).
* A first traced run of the suite (``sys.settrace`` limited to the mutated packages) records which tests
  execute each line (lines run only at import -- constants, defaults, decorators -- map to every test
  that runs the module). Per mutant only those tests run, fastest first, with ``-x``, under a timeout of
  ``--timeout-factor`` x their traced time + ``--timeout-slack`` seconds. ``--budget`` caps the traced
  seconds of tests per mutant (fastest first; a survivor records how many covering tests were left
  out: re-run it with ``--budget 0 --survivors-of``). The line map is cached under
  ``bench/.mutate-cache/`` until a .py file changes.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate_ops import Mutant, mutants_of  # noqa: E402

DEFAULT_PATHS = ["vlrouter/core", "vlrouter/plugins"]
# vlrouter/core/tiny.py builds the random test model itself: a mutant changes the fixture every test is
# measured with (its size, its random weights), not a behaviour of the library; it is left out.
DEFAULT_EXCLUDE = ["vlrouter/core/tiny.py"]
KNOWN_DIR = ROOT / "bench" / "mutants" / "known"
EQUIVALENT = ROOT / "bench" / "mutants" / "equivalent.txt"
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".mutate-cache"
# What conftest.py sets before anything imports huggingface_hub: set here too, since this process
# imports transformers before conftest runs (in the forked children).
# One torch thread per job: the tests' tensors are tiny, and on 2 shared cores a second thread per
# process makes a 300-step head fit take seconds instead of a fraction of one (measured: 8 s vs 0.2 s).
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLROUTER_NO_ENTRY_POINTS": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREIMPORT = ["torch", "numpy", "PIL.Image", "pydantic", "pluggy", "safetensors.torch", "transformers", "peft",
             "transformers.models.qwen3_vl.modeling_qwen3_vl", "tokenizers", "typer", "rich", "ruamel.yaml",
             "filelock", "hypothesis", "matplotlib", "_pytest", "pytest", "anyio.pytest_plugin",
             "_hypothesis_pytestplugin"]
PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "--no-header", "-m", "not gpu", "-p", "no:unraisableexception",
               "-W", "ignore::pytest.PytestAssertRewriteWarning"]


# ---- the copy of the tree ----------------------------------------------------------------------

def tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def copy_tree(dest: Path) -> Path:
    for rel in tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return dest


def fingerprint(files: list[str]) -> str:
    """What the line map depends on: the package, the tests and pytest's configuration."""
    h = hashlib.sha256()
    for rel in files:
        if rel.startswith(("vlrouter/", "tests/")) and rel.endswith(".py") or rel == "pyproject.toml":
            h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---- running pytest in a forked child ------------------------------------------------------------

def preimport() -> None:
    os.environ.update(ENV)
    for name in PREIMPORT:
        try:
            __import__(name)
        except Exception:
            pass
    gc.freeze()  # children's garbage collections skip the imported libraries' objects


_stamp = [int(time.time()) - 10_000_000]


def write_source(path: Path, text: str) -> None:
    """Write a module with a modification time never used before, so no stale ``.pyc`` can match it
    (bytecode caches check the source's size and whole-second mtime; a mutant can keep the size)."""
    path.write_text(text)
    _stamp[0] += 1
    os.utime(path, (_stamp[0], _stamp[0]))


def fork_pytest(tree: Path, args: list[str], log: Path, plugin=None) -> int:
    """Start ``pytest.main(args)`` in a forked child working in ``tree``; return the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        os.setsid()  # its own process group: a timeout kills the tests' subprocesses too
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(tree)
        sys.path.insert(0, str(tree))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        code = int(pytest.main(args, plugins=[plugin] if plugin is not None else []))
        if plugin is not None:
            plugin.dump()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_child(pid: int, timeout: float | None) -> tuple[int | None, float]:
    """``(exit code or None on timeout, seconds)``."""
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - t0
        if timeout is not None and time.monotonic() - t0 > timeout:
            kill_group(pid)
            os.waitpid(pid, 0)
            return None, time.monotonic() - t0
        time.sleep(0.02)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- which tests run which lines -----------------------------------------------------------------

class LineMap:
    """A pytest plugin (used in the traced child): per test, the (file, line) pairs it executes."""

    def __init__(self, tree: Path, targets: list[str], out: Path) -> None:
        self.prefix = {str(tree / t): t for t in targets}  # absolute path in the copy -> repo-relative
        self.out = out
        self.hits: set[tuple[str, int]] = set()
        self.lines: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.tests: list[str] = []
        self.durations: list[float] = []
        self.failed: list[str] = []

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.prefix:
            self.hits.add((frame.f_code.co_filename, frame.f_lineno))
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "line":
            self.hits.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _start(self) -> None:
        self.hits = set()
        threading.settrace(self._global)
        sys.settrace(self._global)

    def _stop(self, index: int) -> None:
        sys.settrace(None)
        threading.settrace(None)
        for f, line in self.hits:
            self.lines[self.prefix[f]][line].add(index)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        self._start()
        yield
        self._stop(-1)  # -1: lines run at import (module constants, defaults, decorators)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        index = len(self.tests)
        self.tests.append(item.nodeid)
        t0 = time.perf_counter()
        self._start()
        yield
        self._stop(index)
        self.durations.append(time.perf_counter() - t0)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)

    def dump(self) -> None:
        data = {"tests": self.tests, "durations": self.durations, "failed": self.failed,
                "lines": {f: {str(k): sorted(v) for k, v in lines.items()} for f, lines in self.lines.items()}}
        self.out.write_text(json.dumps(data))


def collect_line_map(tree: Path, targets: list[str], test_args: list[str], cache_key: str) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / f"linemap-{cache_key}.json"
    if cached.is_file():
        print(f"line map: cached ({cached.relative_to(ROOT)})", flush=True)
        return json.loads(cached.read_text())
    print(f"line map: tracing {' '.join(test_args)} (once; cached until a .py file changes) ...", flush=True)
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    lm = LineMap(tree, targets, out)
    log = CACHE / "linemap.log"
    pid = fork_pytest(tree, ["-q", "-p", "no:cacheprovider", "-m", "not gpu", *test_args], log,
                      plugin=lm)
    code, seconds = wait_child(pid, None)
    data = json.loads(out.read_text())
    out.unlink()
    if code not in (0, 5) or data["failed"]:
        sys.exit(f"the unmutated suite fails (exit {code}; {data['failed'][:5]}): fix it first; log: {log}")
    data["seconds"] = seconds
    cached.write_text(json.dumps(data))
    print(f"line map: {len(data['tests'])} tests in {seconds:.0f} s", flush=True)
    return data


def select_tests(mutant: Mutant, lmap: dict, budget: float | None,
                 killers: dict[int, int] | None = None) -> tuple[list[str], float, int]:
    """The tests that run the mutant's lines: ``(node ids, traced seconds, left out)``. Tests that already
    killed mutants of the same module in this run go first (most kills first), then the fastest."""
    lines = lmap["lines"].get(mutant.file, {})
    idx: set[int] = set()
    for line in range(mutant.line, mutant.end_line + 1):
        idx.update(lines.get(str(line), []))
    if idx == {-1}:  # run at import only (a constant, a default, a decorator): every test that runs this module
        idx = {i for v in lines.values() for i in v}
    idx.discard(-1)
    killers = killers or {}
    order = sorted(idx, key=lambda i: (-killers.get(i, 0), lmap["durations"][i]))
    chosen, total = [], 0.0
    for i in order:
        d = lmap["durations"][i]
        if budget and chosen and total + d > budget:
            break
        chosen.append(i)
        total += d
    return [lmap["tests"][i] for i in chosen], total, len(order) - len(chosen)


# ---- the campaign ----------------------------------------------------------------------------------

@dataclass
class Result:
    mutant: Mutant
    status: str  # killed | timeout | survived | not covered
    seconds: float = 0.0
    tests: int = 0
    left_out: int = 0
    diff: str = ""
    extra: dict = field(default_factory=dict)


def target_files(paths: list[str], exclude: list[str], only: list[str] | None) -> list[str]:
    files = []
    for p in paths:
        for f in sorted((ROOT / p).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            if rel in exclude or (only and rel not in only):
                continue
            files.append(rel)
    return files


def all_mutants(files: list[str]) -> list[Mutant]:
    out = []
    for rel in files:
        out += mutants_of(rel, (ROOT / rel).read_text())
    return out


def read_equivalent(path: Path = EQUIVALENT) -> dict[tuple[str, str, str], str]:
    """Mutants shown not to change behaviour: ``file :: mutated line (stripped) :: replacement :: why``.
    Keyed by the line's text, not its number, so an entry survives edits elsewhere in the file."""
    out = {}
    if path.is_file():
        for raw in path.read_text().splitlines():
            if raw.strip() and not raw.startswith("#"):
                file, line, replacement, why = (part.strip() for part in raw.split(" :: ", 3))
                out[(file, line, replacement)] = why
    return out


def equivalent_key(m: Mutant, source: str) -> tuple[str, str, str]:
    return m.file, source.splitlines()[m.line - 1].strip(), m.replacement


def campaign_order(args, files: list[str]) -> tuple[list[Mutant], int]:
    """The mutants to run, in a seeded random order (so any prefix is a uniform sample), and how many exist."""
    mutants = all_mutants(files)
    total = len(mutants)
    random.Random(args.seed).shuffle(mutants)
    if args.survivors_of:
        wanted = {s["id"] for s in json.loads(Path(args.survivors_of).read_text())["survivors"]}
        mutants = [m for m in mutants if m.id in wanted]
    if args.match:
        mutants = [m for m in mutants if re.search(args.match, m.id)]
    if args.sample:
        mutants = mutants[:args.sample]
    return mutants, total


def run_campaign(args) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.max_minutes * 60 if args.max_minutes else None
    files = target_files(args.paths, args.exclude, args.files)
    mutants, total_generated = campaign_order(args, files)
    print(f"{total_generated} mutants in {len(files)} files; {len(mutants)} to run in a random order (seed {args.seed})"
          + (f", starting new ones for {args.max_minutes:g} min" if deadline else ""), flush=True)
    preimport()
    tmp = Path(tempfile.mkdtemp(prefix="vlrouter-mutate-"))
    running: dict[int, tuple] = {}
    try:
        trees = [copy_tree(tmp / f"tree{j}").resolve() for j in range(args.jobs)]
        key = fingerprint(tree_files()) + "-" + hashlib.sha256(" ".join(args.tests).encode()).hexdigest()[:6]
        lmap = collect_line_map(trees[0], files, args.tests, key)
        originals = {f: (ROOT / f).read_text() for f in files}
        equivalent = read_equivalent()
        index = {t: i for i, t in enumerate(lmap["tests"])}
        killers: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # file -> test -> kills
        results: list[Result] = []
        queue = list(mutants)
        free = list(range(args.jobs))
        t_run = time.monotonic()
        while queue or running:
            while queue and free and (deadline is None or time.monotonic() < deadline):
                m = queue.pop(0)
                why = equivalent.get(equivalent_key(m, originals[m.file]))
                if why:
                    results.append(Result(m, "equivalent", diff=m.diff(originals[m.file]), extra={"why": why}))
                    continue
                tests, traced, left = select_tests(m, lmap, args.budget, killers[m.file])
                if not tests:
                    results.append(Result(m, "not covered", diff=m.diff(originals[m.file])))
                    continue
                j = free.pop()
                write_source(trees[j] / m.file, m.source)
                timeout = args.timeout_factor * traced + args.timeout_slack
                pid = fork_pytest(trees[j], [*PYTEST_ARGS, *tests], tmp / f"job{j}.log")
                running[pid] = (m, len(tests), left, j, time.monotonic(), timeout)
            if not running:
                break  # the deadline passed with nothing in flight
            time.sleep(0.05)
            for pid in list(running):
                m, n_tests, left, j, t0, timeout = running[pid]
                finished, status = os.waitpid(pid, os.WNOHANG)
                elapsed = time.monotonic() - t0
                if not finished and elapsed <= timeout:
                    continue
                if finished:
                    verdict = "survived" if os.waitstatus_to_exitcode(status) in (0, 5) else "killed"
                else:
                    kill_group(pid)
                    os.waitpid(pid, 0)
                    verdict = "timeout"
                write_source(trees[j] / m.file, originals[m.file])
                free.append(j)
                del running[pid]
                killed_by = (_failing_tests(tmp / f"job{j}.log") or [""])[0] if verdict == "killed" else ""
                if killed_by in index:
                    killers[m.file][index[killed_by]] += 1
                results.append(Result(m, verdict, round(elapsed, 2), n_tests, left, m.diff(originals[m.file]),
                                      extra={"killed_by": killed_by} if killed_by else {}))
                ran = sum(r.status != "not covered" for r in results)
                rate = ran / max(time.monotonic() - t_run, 1e-9) * 60
                print(f"[{len(results)}/{len(mutants)}] {verdict:8s} {m.file}:{m.line} {m.operator:9s} "
                      f"{m.original[:40]!r} -> {m.replacement[:40]!r} ({n_tests} tests, {elapsed:.1f} s; "
                      f"{rate:.1f} run/min)", flush=True)
        report = build_report(results, queue, files, total_generated, time.monotonic() - t_start,
                              time.monotonic() - t_run, lmap, args)
        write_report(report, Path(args.out))
        print(summary_line(report), flush=True)
        print(f"report: {args.out} and {Path(args.out).with_suffix('.md')}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted: the working tree was never changed; temp copies removed", file=sys.stderr)
        return 130
    finally:
        for pid in running:
            kill_group(pid)
        shutil.rmtree(tmp, ignore_errors=True)


def build_report(results: list[Result], not_run: list[Mutant], files, generated: int, seconds: float,
                 run_seconds: float, lmap: dict, args) -> dict:
    per: dict[str, dict[str, int]] = {f: defaultdict(int) for f in files}
    for r in results:
        per[r.mutant.file][r.status] += 1
        per[r.mutant.file]["mutants"] += 1

    def totals(rows) -> dict:
        t = defaultdict(int)
        for row in rows:
            for k, v in row.items():
                t[k] += v
        t = {k: t.get(k, 0) for k in ("mutants", "killed", "timeout", "survived", "not covered", "equivalent")}
        counted = t["mutants"] - t["equivalent"]  # an equivalent mutant is no bug: not in the score
        t["surviving_pct"] = round(100 * (t["survived"] + t["not covered"]) / counted, 1) if counted else 0.0
        return t

    packages = sorted({str(Path(f).parent) for f in files})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "vlrouter", "tests"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    survivors = [r for r in results if r.status in ("survived", "not covered")]
    ran = [r for r in results if r.status != "not covered"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit + ("+changes" if dirty else ""),
        "command": "bench/mutate.py " + " ".join(sys.argv[1:]),
        "paths": args.paths,
        "excluded": args.exclude,
        "mutants_generated": generated,
        "mutants_done": len(results),
        "mutants_not_run": len(not_run),
        "seed": args.seed,
        "jobs": args.jobs,
        "budget_s": args.budget,
        "seconds": round(seconds, 1),
        "line_map_seconds": round(lmap.get("seconds", 0.0), 1),
        "tests_traced": len(lmap["tests"]),
        "mutants_per_minute": round(len(ran) / max(run_seconds, 1e-9) * 60, 2),
        "totals": totals(per.values()),
        "per_package": {p: totals(v for f, v in per.items() if str(Path(f).parent) == p) for p in packages},
        "per_module": {f: totals([v]) for f, v in per.items() if v},
        "survivors": [{"id": r.mutant.id, "file": r.mutant.file, "line": r.mutant.line, "operator": r.mutant.operator,
                       "status": r.status, "tests": r.tests, "tests_left_out": r.left_out, "diff": r.diff}
                      for r in sorted(survivors, key=lambda r: (r.mutant.file, r.mutant.line))],
        "timeouts": [{"file": r.mutant.file, "line": r.mutant.line, "diff": r.diff}
                     for r in results if r.status == "timeout"],
        "equivalent": [{"file": r.mutant.file, "line": r.mutant.line, "why": r.extra["why"], "diff": r.diff}
                       for r in results if r.status == "equivalent"],
    }


def summary_line(report: dict) -> str:
    t = report["totals"]
    return (f"{t['mutants']} mutants: {t['killed']} killed, {t['timeout']} timeouts, {t['survived']} survived, "
            f"{t['not covered']} not covered, {t['equivalent']} equivalent ({t['surviving_pct']}% surviving) in "
            f"{report['seconds'] / 60:.1f} min")


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    done, gen = report["mutants_done"], report["mutants_generated"]
    md = [f"# Mutation testing: {report['date']}, commit {report['commit']}", "",
          f"`{report['command']}` over {', '.join(report['paths'])} "
          f"(left out: {', '.join(report['excluded']) or 'none'}). {summary_line(report)}; "
          f"line map of {report['tests_traced']} tests in "
          f"{report['line_map_seconds'] / 60:.1f} min; {report['mutants_per_minute']} mutants run per minute with "
          f"{report['jobs']} job(s)."]
    if done < gen:
        md.append(f"{done} of {gen} mutants, the first ones of a random order (seed {report['seed']}): a uniform "
                  "sample" + (f"; {report['mutants_not_run']} not run when the time ran out." if
                              report["mutants_not_run"] else "."))
    md += ["", "| where | mutants | killed | timeouts | survived | not covered | equivalent | surviving % |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("**" + p + "**", t) for p, t in report["per_package"].items()] + list(report["per_module"].items())
    for name, t in rows:
        md.append(f"| {name} | {t['mutants']} | {t['killed']} | {t['timeout']} | {t['survived']} | {t['not covered']} "
                  f"| {t['equivalent']} | {t['surviving_pct']} |")
    md += ["", "## Survivors", ""]
    for s in report["survivors"]:
        md += [f"- `{s['file']}:{s['line']}` {s['operator']} ({s['status']}; {s['tests']} tests run"
               + (f", {s['tests_left_out']} left out by the budget" if s["tests_left_out"] else "") + ")",
               "", "```diff", s["diff"].rstrip(), "```", ""]
    if report["equivalent"]:
        md += ["## Equivalent (bench/mutants/equivalent.txt)", ""]
        md += [f"- `{e['file']}:{e['line']}`: {e['why']}" for e in report["equivalent"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


# ---- known bugs ------------------------------------------------------------------------------------

def _restamp(tree: Path, patch: Path) -> None:
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            f = tree / line[6:].strip()
            write_source(f, f.read_text())


def read_patch(path: Path) -> tuple[str, list[str]]:
    bug, tests = "", []
    for line in path.read_text().splitlines():
        if line.startswith("# bug:"):
            bug = line[6:].strip()
        elif line.startswith("# tests:"):
            tests += line[8:].split()
    return bug, tests


def run_known(args) -> int:
    patches = sorted(KNOWN_DIR.glob("*.patch"))
    if args.only:
        patches = [p for p in patches if p.stem in args.only]
    preimport()
    tmp = Path(tempfile.mkdtemp(prefix="vlrouter-known-"))
    rows: list[dict] = []
    every = [a for a in PYTEST_ARGS if a != "-x"]  # run all of a bug's tests: the report names each that fails
    try:
        tree = copy_tree(tmp / "tree").resolve()
        for patch in patches:
            bug, tests = read_patch(patch)
            row = {"bug": patch.stem, "what": bug, "tests": tests, "verdict": "", "runs": args.runs, "caught": 0,
                   "failing": []}
            rows.append(row)
            if not tests:
                row["verdict"] = "no '# tests:' line"
            elif wait_child(fork_pytest(tree, [*PYTEST_ARGS, *tests], tmp / "clean.log"), None)[0] != 0:
                row["verdict"] = "its tests fail without the bug"
            elif subprocess.run(["git", "apply", str(patch)], cwd=tree, capture_output=True).returncode:
                row["verdict"] = "the patch no longer applies: update it to the code"
            else:
                _restamp(tree, patch)
                try:
                    for run in range(args.runs):
                        log = tmp / f"{patch.stem}-{run}.log"
                        code, _ = wait_child(fork_pytest(tree, [*every, *tests], log), None)
                        row["caught"] += code not in (0, 5)
                        row["failing"] = sorted(set(row["failing"]) | set(_failing_tests(log)))
                finally:
                    subprocess.run(["git", "apply", "-R", str(patch)], cwd=tree, check=True, capture_output=True)
                    _restamp(tree, patch)
                row["verdict"] = ("caught" if row["caught"] == args.runs else "SURVIVED" if row["caught"] == 0
                                  else "FLAKY")
            print(f"{patch.stem}: {row['verdict']} {row['caught']}/{args.runs} -- {bug}", flush=True)
            for t in row["failing"]:
                print(f"    {t}", flush=True)
        good = sum(r["verdict"] == "caught" for r in rows)
        print(f"{good} of {len(rows)} known bugs caught on every one of {args.runs} runs", flush=True)
        if not args.only:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "mutate-known.json").write_text(json.dumps(
                {"date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs, "bugs": rows}, indent=2) + "\n")
        return 0 if good == len(rows) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _failing_tests(log: Path) -> list[str]:
    return [line.split(" - ")[0].split(" ", 1)[1] for line in log.read_text(errors="replace").splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


# ---- entry point -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "list"):
        s = sub.add_parser(name)
        s.add_argument("--paths", nargs="+", default=DEFAULT_PATHS)
        s.add_argument("--exclude", nargs="*", default=DEFAULT_EXCLUDE)
        s.add_argument("--files", nargs="*", help="only these modules (repo-relative paths)")
        s.add_argument("--sample", type=int, help="only the first N mutants of the random order")
        s.add_argument("--match", help="only mutants whose id (file:line:col:operator:replacement) matches this regex")
        s.add_argument("--seed", type=int, default=0)
    r = sub.choices["run"]
    r.add_argument("--tests", nargs="*", default=["tests"], help="what the line map traces (default: tests)")
    r.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once")
    r.add_argument("--budget", type=float, default=30.0,
                   help="traced seconds of tests per mutant, fastest first (0: every covering test)")
    r.add_argument("--timeout-factor", type=float, default=3.0)
    r.add_argument("--timeout-slack", type=float, default=20.0)
    r.add_argument("--max-minutes", type=float, default=26.0,
                   help="start no mutant after this many minutes from the start (0: run them all)")
    r.add_argument("--survivors-of", metavar="REPORT", help="run only the survivors of an earlier report (mutate.json)")
    r.add_argument("--out", default=str(RESULTS / "mutate.json"))
    k = sub.add_parser("known")
    k.add_argument("--runs", type=int, default=3)
    k.add_argument("--only", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "list":
        files = target_files(args.paths, args.exclude, args.files)
        ms = [m for m in all_mutants(files) if not args.match or re.search(args.match, m.id)]
        for m in ms:
            print(f"{m.file}:{m.line} {m.operator:9s} {m.original!r} -> {m.replacement!r}")
        counts = defaultdict(int)
        for m in ms:
            counts[m.file] += 1
        for f, c in counts.items():
            print(f"{c:5d}  {f}")
        print(f"{len(ms)} mutants")
        return 0
    if args.cmd == "known":
        return run_known(args)
    return run_campaign(args)


if __name__ == "__main__":
    sys.exit(main())
