"""The realistic bugs `make mutate-known` applies (bench/mutants/known/*.patch) still apply to the code.

A patch that no longer applies would make `make mutate-known` report an error instead of proving the
suite catches that bug; this keeps the patches in step with the code they break.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "bench" / "mutants" / "known").glob("*.patch"))


def test_the_known_bugs_are_there():
    assert len(PATCHES) >= 10  # the 7 survivors, the pruning one, and the views/layer pair


@pytest.mark.skipif(shutil.which("git") is None, reason="git applies the patches")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_each_known_bug_applies_and_names_tests_that_exist(patch):
    lines = patch.read_text().splitlines()
    assert lines[0].startswith("# bug: ") and lines[1].startswith("# tests: "), patch
    for test in lines[1].removeprefix("# tests: ").split():
        assert (ROOT / test.split("::")[0]).is_file(), f"{patch.name} names a missing test file {test}"
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{patch.name} no longer applies (regenerate it): {done.stderr.strip()}"
