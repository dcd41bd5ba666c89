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
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from vlrouter.core.errors import BackendError, PluginError, RegistryError, located
from vlrouter.core.registry import AdapterEntry, Registry, adapter_name_problem, suggest
from vlrouter.plugins import hookspecs

if TYPE_CHECKING:
    from vlrouter.core.actions import UIAction

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
            raise PluginError(located(None, f"entry-point group {ENTRY_POINT_GROUP!r}",
                                      f"an installed plugin failed to load: {type(e).__name__}: {e}",
                                      fix="upgrade or uninstall it; `pip list` shows it")) from None
    for plugin in extra_plugins:
        if not pm.is_registered(plugin):
            pm.register(plugin)
    if registry is not None:
        for i, entry in enumerate(registry.adapters):
            if entry.plugin and not pm.has_plugin(entry.plugin) and pm.get_plugin(entry.plugin) is None:
                load_module_plugin(pm, entry.plugin, where=(registry.path, f"adapters[{i}].plugin"))
    check_pending(pm)
    return pm


def check_pending(pm: pluggy.PluginManager) -> None:
    """Refuse a plugin whose hook functions match no hook (a misspelt name would otherwise be ignored)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) if e.plugin is not None else "?"
        raise PluginError(located(None, f"plugin {name!r}", str(e).strip(),
                                  fix="rename the function to a hook in vlrouter/plugins/hookspecs.py")) from None


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

        def register(spec: AdapterSpec, _out=collected, label=label) -> None:
            if not isinstance(spec, AdapterSpec):
                raise PluginError(located(None, f"plugin {label!r}", f"register_adapters passed "
                                          f"{type(spec).__name__}, not an AdapterSpec",
                                          fix="`from vlrouter import AdapterSpec`"))
            _out.append(spec)

        impl.function(register=register)
        for spec in collected:
            spec = AdapterSpec(**{**spec.__dict__, "plugin": label})
            if spec.name in found:
                raise PluginError(located(None, f"adapter {spec.name!r}", f"declared by two plugins: "
                                          f"{found[spec.name].plugin!r} and {label!r}",
                                          fix="uninstall one, or rename the adapter in one of them"))
            found[spec.name] = spec
    return found


def collect_backends(pm: pluggy.PluginManager) -> dict[str, Callable]:
    """Training backends by name (``local``, ``modal``, and any a plugin adds): functions
    ``RetrainRequest -> Candidate`` (see :mod:`vlrouter.core.recipe`)."""
    found: dict[str, Callable] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.register_backends.get_hookimpls():
        label = _plugin_label(pm, impl.plugin)

        def register(name: str, backend: Callable, _label=label) -> None:
            if name in found:
                raise PluginError(located(None, f"backend {name!r}", f"declared by two plugins: {owners[name]!r} "
                                          f"and {_label!r}", fix="uninstall one"))
            if not callable(backend):
                raise PluginError(located(None, f"backend {name!r}", f"plugin {_label!r} registered "
                                          f"{type(backend).__name__}, not a function",
                                          fix="register(name, fn) with fn(request) -> Candidate"))
            found[name] = backend
            owners[name] = _label

        impl.function(register=register)
    return found


def get_backend(pm: pluggy.PluginManager, name: str) -> Callable:
    """The training backend function called ``name``; :class:`BackendError` naming the known ones."""
    backends = collect_backends(pm)
    if name not in backends:
        raise BackendError(located(None, "train.backend", f"unknown training backend {name!r}"
                                   f"{suggest(name, list(backends))}",
                                   fix=f"one of {', '.join(sorted(backends))}; set train.backend or --backend"))
    return backends[name]


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


# ---- add-adapter: what to write for NAME --------------------------------------------------------

def _plugin_module_name(pm: pluggy.PluginManager, plugin_label: str) -> str | None:
    """The importable module behind a registered plugin (what ``plugin:`` in registry.yaml needs).

    Built-ins are registered under their module name, entry-point plugins under the entry
    point's name: in both cases the module's ``__name__`` is written, so registry.yaml works
    with entry-point loading switched off too. Non-module plugins (objects) get no ``plugin:``.
    """
    obj = pm.get_plugin(plugin_label)
    return obj.__name__ if isinstance(obj, ModuleType) else None


def new_adapter_entry(registry: Registry, name: str, *, dataset: str | None = None, checkpoint: str | None = None,
                      plugin: str | None = None, pm: pluggy.PluginManager | None = None) -> tuple[AdapterEntry, str]:
    """The registry entry ``router add-adapter NAME`` appends, and where it came from.

    A NAME some plugin declares takes its dataset/checkpoint defaults from that plugin
    (options override them); any other NAME uses the generic JSONL adapter and needs both
    paths. Paths given here are relative to the current directory and are stored
    relative to the registry's folder. Returns ``(entry, source)``; raises
    :class:`RegistryError` naming the field and the fix.
    """
    label = len(registry.adapter_names)
    where = f"adapters[{label}].name"
    problem = adapter_name_problem(name)
    if problem:
        raise RegistryError(located(registry.path, where, problem, fix="choose another name, e.g. 'provider-select'"))
    if name in registry.adapter_names:
        registry.add_adapter(AdapterEntry(name=name, dataset="-", checkpoint="-"))  # the registry words it
    pm = pm if pm is not None else get_plugin_manager(registry)
    if plugin:
        load_module_plugin(pm, plugin, where=(None, "--plugin"))
    specs = collect_adapters(pm)
    spec = specs.get(name)
    if spec is not None:
        plugin_value = _plugin_module_name(pm, spec.plugin)
        if plugin and plugin_value and plugin != plugin_value:
            raise RegistryError(located(None, "--plugin", f"adapter {name!r} is declared by plugin "
                                        f"{spec.plugin!r}, not {plugin!r}", fix="drop --plugin"))
        if dataset is None and spec.dataset is None:
            raise RegistryError(located(registry.path, f"adapters[{label}].dataset", f"plugin {spec.plugin!r} gives "
                                        f"no default dataset for {name!r}", fix="pass --dataset PATH"))
        if checkpoint is None and spec.checkpoint is None:
            raise RegistryError(located(registry.path, f"adapters[{label}].checkpoint", f"plugin {spec.plugin!r} "
                                        f"gives no default checkpoint for {name!r}", fix="pass --checkpoint PATH"))
        ds_value = registry.relative_path(dataset) if dataset is not None else spec.dataset
        ck_value = registry.relative_path(checkpoint) if checkpoint is not None else spec.checkpoint
    else:
        if dataset is None and checkpoint is None:
            raise RegistryError(located(registry.path, where, f"unknown adapter {name!r}"
                                        + suggest(name, sorted(set(specs) | set(registry.adapter_names))),
                                        fix="install its plugin, or pass --dataset and --checkpoint for the "
                                            "generic adapter"))
        if dataset is None or checkpoint is None:
            missing = "--dataset" if dataset is None else "--checkpoint"
            raise RegistryError(located(registry.path, where, f"no plugin declares {name!r}, so the generic adapter "
                                        "needs both --dataset and --checkpoint", fix=f"add {missing} PATH"))
        plugin_value = plugin
        ds_value, ck_value = registry.relative_path(dataset), registry.relative_path(checkpoint)
    entry = AdapterEntry(name=name, plugin=plugin_value, dataset=ds_value, checkpoint=ck_value)
    return entry, (f"plugin {plugin_value}" if plugin_value else "generic JSONL adapter")
