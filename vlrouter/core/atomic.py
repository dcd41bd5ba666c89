"""Atomic file writes: readers see the old file or the new one, never half of either.

Write to a temp file in the target's folder, fsync, then ``os.replace`` (atomic on POSIX).
Used for registry.yaml, feature-cache entries and anything else a crash must not tear.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on normal exit it replaces ``target`` atomically.

    The caller writes the temp file (by any means); on an exception it is removed and
    ``target`` is untouched. An existing target's permission bits are kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o777 if target.exists() else None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_target(target) as tmp:
        tmp.write_bytes(data)
