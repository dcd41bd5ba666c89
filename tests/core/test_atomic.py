"""Atomic writes leave no file descriptors open (a long-running server writes many routers and caches)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlrouter.core.atomic import atomic_write_bytes


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_atomic_writes_do_not_leak_file_descriptors(tmp_path):
    atomic_write_bytes(tmp_path / "warm", b"x")
    before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        atomic_write_bytes(tmp_path / f"f{i % 5}", b"data %d" % i)
    assert len(os.listdir("/proc/self/fd")) <= before
    assert (tmp_path / "f4").read_bytes() == b"data 49"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2", "f3", "f4", "warm"]  # no temp files
