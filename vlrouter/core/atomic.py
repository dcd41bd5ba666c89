"""Atomic file writes: readers see the old file or the new one, never half of either.

Write to a temp file in the target's folder, fsync, then ``os.replace`` (atomic on POSIX).
Used for registry.yaml, feature-cache entries and anything else a crash must not tear.
A target that is a symlink is followed: the file it points at is replaced, the link stays
a link. A write the OS refuses (disk full, read-only, permission denied) is a
:class:`~vlrouter.core.errors.StorageError` naming the target, and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlrouter.core.errors import RouterError
from vlrouter.core.paths import as_os_error, ensure_dir, storage_error


@contextmanager
def atomic_target(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on normal exit it replaces ``target`` atomically.

    The caller writes the temp file (by any means); on an exception it is removed and
    ``target`` is untouched. An existing target's permission bits are kept; a symlink
    target is followed (the file it names is replaced, not the link).
    """
    target = Path(target)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    ensure_dir(target.parent)
    mode = target.stat().st_mode & 0o777 if target.exists() else None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise storage_error(e, target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_err = None if isinstance(e, RouterError) else as_os_error(e)
        if os_err is not None:
            raise storage_error(os_err, target) from None
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_target(target) as tmp:
        tmp.write_bytes(data)
