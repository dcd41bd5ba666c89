"""Paths people hand us: regular files only (never a FIFO), folders we may write, local folders vs hub ids.

Every reader of a file a user names (registry.yaml, datasets, images, router.json,
adapter configs) goes through :func:`check_regular_file` first: opening a FIFO or a
device blocks forever, and a folder gives a confusing ``IsADirectoryError``. Every
folder vlrouter writes into is checked by :func:`ensure_dir`, which names the setting
that chose it. :func:`storage_problem` turns an ``OSError`` from writing (disk full,
read-only folder, permission denied) into a one-line problem + fix.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from vlrouter.core.errors import InputError, StorageError, located


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a socket``, ``a device``, … for a non-regular ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular_file(path: str | Path, *, what: str = "file", where: str | Path | None = None,
                       field: str | None = None, error: type[Exception] = InputError,
                       fix: str = "point at a regular file", line: int | None = None) -> Path:
    """``path`` if it is a regular file (symlinks followed); else ``error`` naming what it is.

    Never opens the path, so a FIFO cannot block. A missing path is left to the caller
    (who knows the better message) -- this returns it unchanged. ``line``: the line of ``where`` to name.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return p
    except OSError as e:
        raise error(located(where if where is not None else p, field, f"cannot read {what} {p}: {e.strerror}",
                            fix="check the path and its permissions", line=line)) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(located(where if where is not None else p, field, f"{what} {p} is {file_kind(st.st_mode)}, "
                            "not a regular file", fix=fix, line=line))
    return p


def storage_problem(e: OSError) -> tuple[str, str]:
    """``(problem, fix)`` for an ``OSError`` from writing or creating files."""
    code = e.errno
    what = e.strerror or str(e)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"no space left on the device ({what})", "free disk space (or point the setting at another disk)"
    if code == errno.EROFS:
        return f"the file system is read-only ({what})", "point the setting at a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied ({what})", "make the folder writable for you, or point the setting elsewhere"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"a file stands where a folder is needed ({what})", "move that file away, or point the setting " \
                                                                   "at a folder"
    return what, "check the path, free space and permissions"


def storage_error(e: OSError, path: str | Path | None = None, *, field: str | None = None) -> StorageError:
    """A :class:`StorageError` naming the file the OS refused (or ``path``) and the fix."""
    problem, fix = storage_problem(e)
    target = e.filename if e.filename else path
    return StorageError(located(target, field, f"cannot write: {problem}", fix=fix))


def ensure_dir(path: str | Path, *, field: str | None = None, where: str | Path | None = None) -> Path:
    """Create folder ``path`` (and parents) or raise :class:`StorageError` naming ``field``.

    A file (or a FIFO, …) standing where the folder belongs is an error, not an
    ``FileExistsError`` traceback.
    """
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists() and not parent.is_dir():
            try:
                kind = file_kind(os.stat(parent).st_mode)
            except OSError:
                kind = "not a folder"
            kind = "a file" if kind == "not a regular file" else kind
            raise StorageError(located(where, field, f"{p} cannot be a folder: {parent} is {kind}",
                                       fix=f"point {field or 'the setting'} at a folder, or move {parent} away"))
        if parent.is_dir():
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, p, field=field) from None
    return p


def looks_like_local_path(value: str) -> bool:
    """True when a ``base_model`` value can only be a folder, never a hub id.

    Hub ids are ``name`` or ``org/name``; a value that starts with ``/``, ``./``,
    ``../`` or ``~``, holds a backslash, more than one ``/``, or ends with ``/`` is a
    path. (``models/tiny`` is ambiguous: callers also check whether its first part
    exists as a folder.)
    """
    v = str(value).strip()
    return (v in (".", "..") or v.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in v
            or v.count("/") > 1 or v.endswith("/"))


_OS_CODE = re.compile(r"Os \{ code: (\d+)")


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` as an ``OSError`` when it is one, or wraps one (safetensors reports ``Os { code: 28, … }``)."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception):
        return None
    m = _OS_CODE.search(str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None
