"""The plugin manager: built-ins, the ``vlrouter`` entry-point group, and ``plugin:`` modules.

:func:`get_plugin_manager` builds a fresh ``pluggy.PluginManager`` (never a global), so
tests and embedded engines do not leak plugins into each other. Discovery order:

1. built-in modules (:data:`BUILTIN_PLUGINS`), registered like any third-party plugin;
2. installed packages' entry points in group ``vlrouter`` (skipped with
   ``entry_points=False`` or ``VLROUTER_NO_ENTRY_POINTS=1``);
3. modules named by ``plugin:`` in registry.yaml (imported: trusted config).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from vlrouter.core.errors import PluginError, located
from vlrouter.plugins import hookspecs

if TYPE_CHECKING:
    from vlrouter.core.actions import UIAction
    from vlrouter.core.registry import Registry

BUILTIN_PLUGINS = (
    "vlrouter.adapters.calendar",
    "vlrouter.adapters.claim_window",
    "vlrouter.adapters.provider_select",
    "vlrouter.adapters.generic",
    "vlrouter.backends.local",
    "vlrouter.backends.modal",
)
ENTRY_POINT_GROUP = "vlrouter"


@dataclass(frozen=True)
class AdapterSpec:
    """What a plugin declares about one adapter (the router label ``name``)."""

    name: str
    description: str = ""
    dataset: str | None = None  # default dataset path for `router add-adapter NAME`
    checkpoint: str | None = None  # default PEFT checkpoint folder
    plugin: str = ""  # filled in by the manager: the declaring plugin's name
    extra: dict[str, Any] = field(default_factory=dict)


def _plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return name


def get_plugin_manager(registry: Registry | None = None, *, entry_points: bool | None = None,
                       extra_plugins: tuple[ModuleType | object, ...] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with built-ins, entry points and the registry's ``plugin:`` modules."""
    pm = pluggy.PluginManager("vlrouter")
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if entry_points is None:
        entry_points = os.environ.get("VLROUTER_NO_ENTRY_POINTS", "") not in ("1", "true", "yes")
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # a broken third-party package must not hide which one
            raise PluginError(f"an installed plugin in entry-point group {ENTRY_POINT_GROUP!r} failed to load: "
                              f"{type(e).__name__}: {e} (fix: upgrade or uninstall it; `pip list` shows it)") from None
    for plugin in extra_plugins:
        pm.register(plugin)
    if registry is not None:
        for i, entry in enumerate(registry.adapters):
            if entry.plugin and not pm.has_plugin(entry.plugin) and pm.get_plugin(entry.plugin) is None:
                load_module_plugin(pm, entry.plugin, where=(registry.path, f"adapters[{i}].plugin"))
    return pm


def load_module_plugin(pm: pluggy.PluginManager, modname: str, *, where: tuple | None = None) -> ModuleType:
    """Import ``modname`` and register it (once)."""
    existing = pm.get_plugin(modname)
    if existing is not None:
        return existing
    try:
        module = importlib.import_module(modname)
    except Exception as e:
        file, fieldpath = where if where else (None, None)
        raise PluginError(located(file, fieldpath, f"cannot import plugin module {modname!r}: "
                                  f"{type(e).__name__}: {e}",
                                  fix="install the package that provides it, or fix the module name")) from None
    for plugin in pm.get_plugins():
        if plugin is module:
            return module
    pm.register(module, name=modname)
    return module


def collect_adapters(pm: pluggy.PluginManager) -> dict[str, AdapterSpec]:
    """Every adapter any plugin declares, by name. Duplicates are an error naming both plugins."""
    found: dict[str, AdapterSpec] = {}
    for impl in pm.hook.register_adapters.get_hookimpls():
        label = _plugin_label(pm, impl.plugin)
        collected: list[AdapterSpec] = []

        def register(spec: AdapterSpec, _out=collected) -> None:
            if not isinstance(spec, AdapterSpec):
                raise PluginError(f"plugin {label!r}: register_adapters passed {type(spec).__name__}, "
                                  "not an AdapterSpec (fix: `from vlrouter import AdapterSpec`)")
            _out.append(spec)

        impl.function(register=register)
        for spec in collected:
            spec = AdapterSpec(**{**spec.__dict__, "plugin": label})
            if spec.name in found:
                raise PluginError(f"adapter {spec.name!r} is declared by two plugins: {found[spec.name].plugin!r} "
                                  f"and {label!r} (fix: uninstall one, or rename the adapter in one of them)")
            found[spec.name] = spec
    return found


def collect_backends(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Training backends by name (``local``, ``modal``, and any a plugin adds)."""
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.register_backends.get_hookimpls():
        label = _plugin_label(pm, impl.plugin)

        def register(name: str, backend: Any, _label=label) -> None:
            if name in found:
                raise PluginError(f"backend {name!r} is declared by two plugins: {owners[name]!r} and {_label!r} "
                                  "(fix: uninstall one)")
            found[name] = backend
            owners[name] = _label

        impl.function(register=register)
    return found


def parse_action(pm: pluggy.PluginManager, adapter: str, text: str) -> UIAction | None:
    """The plugins' parse of ``text`` generated by ``adapter`` (None when nothing parses)."""
    try:
        return pm.hook.parse_action(adapter=adapter, text=text)
    except Exception:
        return None  # a plugin's parser failing must not lose the raw text


def plugin_table(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """For ``router plugins``: each plugin, its hooks, and the adapters it declares."""
    adapters = collect_adapters(pm)
    rows = []
    for plugin in pm.get_plugins():
        name = _plugin_label(pm, plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = None
        for p, d in pm.list_plugin_distinfo():
            if p is plugin:
                dist = f"{d.project_name} {d.version}"
        rows.append({
            "name": name,
            "hooks": hooks,
            "adapters": sorted(a.name for a in adapters.values() if a.plugin == name),
            "distribution": dist or ("built-in" if name in BUILTIN_PLUGINS else "module"),
        })
    return rows
