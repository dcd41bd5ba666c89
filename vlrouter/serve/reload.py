"""Reload without restart: watch the live router symlink (and registry.yaml) and swap a promoted router in.

``router retrain`` and ``router add-adapter`` promote a router by swapping the
``router.dir`` symlink; ``add-adapter`` saves registry.yaml right after. A thread checks,
every ``interval_s``, the symlink's resolved target and registry.yaml's size and mtime;
when either changed it calls :meth:`vlrouter.core.engine.Engine.reload`, which loads the
new head, loads new adapters' LoRA weights into the running model and drops removed
ones, under the engine's lock: a batch in flight finishes on the router it started with,
and requests arriving meanwhile wait for the swap instead of being refused.

A router that does not match registry.yaml yet (``add-adapter`` between its promotion and
its registry save) is a :class:`~vlrouter.core.errors.StaleRouterError`: the old router
keeps serving and the next change of registry.yaml triggers another try. Any other
failure is logged and the old router keeps serving too.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from vlrouter.core.engine import Engine
from vlrouter.core.errors import InputError, RouterError, StaleRouterError
from vlrouter.core.registry import Registry
from vlrouter.core.results import ReloadResult

log = logging.getLogger("vlrouter.serve")


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        return ()


class RouterWatcher:
    """Polls the live router of ``engine.registry_path`` and reloads the engine when it changes."""

    def __init__(self, engine: Engine, interval_s: float = 1.0, *,
                 on_result: Callable[[ReloadResult | None, RouterError | None], None] | None = None) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._on_result = on_result or (lambda result, error: None)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one reload at a time (the watcher's, or POST /admin/reload)
        self._thread: threading.Thread | None = None
        self._router_dir: Path | None = None
        self._registry_key: tuple = ()
        self._seen = self._key()
        if engine.router_version is not None and self._seen:  # what the engine loaded, even if the symlink moved since
            self._seen = (engine.router_version, self._seen[1])
        self.last_error: str | None = None

    @property
    def registry_path(self) -> Path | None:
        return self.engine.registry_path

    def _key(self) -> tuple:
        """(live router target, registry.yaml stat): a reload is due when it changes."""
        reg = self.registry_path
        if reg is None:
            return ()
        rkey = _stat_key(Path(reg))
        if rkey != self._registry_key or self._router_dir is None:
            try:
                self._router_dir = Registry.load(reg).router_dir
            except RouterError:
                pass  # an invalid registry.yaml: keep the old router dir; reload() will say what is wrong
            self._registry_key = rkey
        target = os.path.realpath(self._router_dir) if self._router_dir is not None else None
        return (target, rkey)

    def start(self) -> None:
        if self.registry_path is None:
            log.info("router reload: the engine was not loaded from a registry; not watching")
            return
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vlrouter-router-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the watcher die: log and keep watching
                log.exception("router reload: unexpected error")

    def check(self) -> ReloadResult | None:
        """Reload if the live router or registry.yaml changed since the last try; None when nothing changed."""
        key = self._key()
        if key == self._seen:
            return None
        try:
            return self.reload_now(key)
        except RouterError:
            return None  # logged and reported by reload_now; the old router keeps serving

    def reload_now(self, key: tuple | None = None) -> ReloadResult:
        """Reload the engine from registry.yaml now (POST /admin/reload); raises the engine's RouterError."""
        if self.registry_path is None:
            raise InputError("this server's engine was not loaded from a registry.yaml, so there is nothing to reload "
                             "(fix: start it with `router serve --registry PATH`)")
        with self._lock:
            key = key if key is not None else self._key()
            self._seen = key  # tried: the next try waits for the next change (or a forced reload)
            try:
                result = self.engine.reload()
            except RouterError as e:
                self.last_error = str(e)
                level = logging.INFO if isinstance(e, StaleRouterError) else logging.WARNING
                log.log(level, "router reload: keeping the current router: %s", e)
                self._on_result(None, e)
                raise
            self.last_error = None
            log.info("router reload: now %s (adapters %s; added %s, removed %s)", result.router,
                     ", ".join(result.adapters), result.added or "none", result.removed or "none")
            self._on_result(result, None)
            return result
