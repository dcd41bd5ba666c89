"""The plugin manager's smaller promises: loading a plugin module returns it, once."""

from __future__ import annotations

import sys
import types

from vlrouter import hookimpl
from vlrouter.plugins.manager import get_plugin_manager, load_module_plugin


def test_load_module_plugin_returns_the_module_and_registers_it_once(monkeypatch):
    mod = types.ModuleType("acme_tap_plugin")

    @hookimpl
    def parse_action(adapter, text):
        return None

    mod.parse_action = parse_action
    monkeypatch.setitem(sys.modules, "acme_tap_plugin", mod)
    pm = get_plugin_manager()
    assert load_module_plugin(pm, "acme_tap_plugin") is mod
    assert load_module_plugin(pm, "acme_tap_plugin") is mod  # again: the registered one, not a second copy
    assert [p for p in pm.get_plugins() if p is mod] == [mod]
    pm.unregister(mod)
