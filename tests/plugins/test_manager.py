"""The plugin manager: built-ins, extra plugins, registry `plugin:` modules, entry points, conflicts."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from vlrouter import AdapterSpec, hookimpl
from vlrouter.core.actions import parse_call
from vlrouter.core.errors import PluginError
from vlrouter.core.registry import Registry
from vlrouter.plugins.manager import (
    BUILTIN_PLUGINS,
    collect_adapters,
    collect_backends,
    get_plugin_manager,
    parse_action,
    plugin_table,
)


def make_plugin(modname: str, *names: str, parser: bool = False) -> types.ModuleType:
    """A plugin module built in the test: declares ``names``; optionally parses ``tap(x=..)`` for them."""
    mod = types.ModuleType(modname)

    @hookimpl
    def register_adapters(register):
        for n in names:
            register(AdapterSpec(name=n, description=f"{n} from {modname}", dataset=f"data/{n}.jsonl",
                                 checkpoint=f"checkpoints/{n}"))

    mod.register_adapters = register_adapters
    if parser:
        @hookimpl
        def parse_action(adapter, text):
            if adapter in names:
                return parse_call(text, {"tap": {"x"}})
            return None

        mod.parse_action = parse_action
    return mod


def test_builtins_register_like_third_party_plugins():
    pm = get_plugin_manager()
    for name in BUILTIN_PLUGINS:
        assert pm.get_plugin(name) is sys.modules[name]
    specs = collect_adapters(pm)
    assert set(specs) == {"calendar", "claim-window", "provider-select"}
    cal = specs["calendar"]
    assert cal.plugin == "vlrouter.adapters.calendar"
    assert (cal.dataset, cal.checkpoint) == ("data/calendar/train.jsonl", "checkpoints/calendar-tasks")
    assert set(collect_backends(pm)) == {"local", "modal"}


def test_managers_are_independent():
    extra = make_plugin("tests_extra_plugin", "invoice-form")
    with_extra = get_plugin_manager(extra_plugins=(extra,))
    assert "invoice-form" in collect_adapters(with_extra)
    assert "invoice-form" not in collect_adapters(get_plugin_manager())


def test_collected_specs_are_values_a_consumer_cannot_alter_for_the_others():
    """collect_adapters labels a copy with its plugin; the plugin's own spec and the copies stay as declared."""
    import dataclasses

    declared = AdapterSpec(name="invoice-form", dataset="data/invoice-form.jsonl")
    mod = types.ModuleType("tests_frozen_spec_plugin")
    mod.register_adapters = hookimpl(lambda register: register(declared))
    spec = collect_adapters(get_plugin_manager(extra_plugins=(mod,)))["invoice-form"]
    assert (spec.plugin, declared.plugin) == ("tests_frozen_spec_plugin", "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dataset = "elsewhere.jsonl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        declared.plugin = "someone-else"

def test_two_plugins_declaring_one_adapter_is_an_error_naming_both():
    a = make_plugin("acme_forms", "invoice-form")
    b = make_plugin("globex_forms", "invoice-form")
    pm = get_plugin_manager(extra_plugins=(a, b))
    with pytest.raises(PluginError) as exc:
        collect_adapters(pm)
    msg = str(exc.value)
    assert "'invoice-form'" in msg and "'acme_forms'" in msg and "'globex_forms'" in msg
    assert "fix:" in msg


def test_a_plugin_redeclaring_a_builtin_adapter_names_the_builtin():
    pm = get_plugin_manager(extra_plugins=(make_plugin("my_calendar", "calendar"),))
    with pytest.raises(PluginError) as exc:
        collect_adapters(pm)
    assert "vlrouter.adapters.calendar" in str(exc.value) and "my_calendar" in str(exc.value)


def test_registering_something_other_than_an_adapterspec_is_a_plugin_error():
    mod = types.ModuleType("sloppy_plugin")

    @hookimpl
    def register_adapters(register):
        register({"name": "x"})

    mod.register_adapters = register_adapters
    with pytest.raises(PluginError, match="sloppy_plugin.*AdapterSpec"):
        collect_adapters(get_plugin_manager(extra_plugins=(mod,)))


def test_duplicate_backend_is_an_error():
    mod = types.ModuleType("other_local")

    @hookimpl
    def register_backends(register):
        register("local", object())

    mod.register_backends = register_backends
    with pytest.raises(PluginError, match="'local'.*two plugins"):
        collect_backends(get_plugin_manager(extra_plugins=(mod,)))


def test_parse_action_specific_plugin_first_generic_last():
    pm = get_plugin_manager(extra_plugins=(make_plugin("tap_plugin", "tapper", parser=True),))
    act = parse_action(pm, "calendar", "click(x=412, y=230)")
    assert act is not None and act.name == "click"
    assert parse_action(pm, "tapper", "tap(x=3)").name == "tap"
    # An adapter no plugin claims falls to the generic parser.
    generic = parse_action(pm, "anything", "scroll(dy=-3)")
    assert generic is not None and generic.name == "scroll"


def test_a_crashing_parser_does_not_lose_the_text():
    mod = types.ModuleType("crashy")

    @hookimpl(tryfirst=True)
    def parse_action(adapter, text):
        raise RuntimeError("boom")

    mod.parse_action = parse_action
    # The manager swallows a plugin's crash and returns None; the engine keeps the raw text.
    assert _parse(get_plugin_manager(extra_plugins=(mod,)), "calendar", "click(x=1, y=2)") is None


_parse = parse_action  # the manager's function (the test above shadows the name with a hook impl)


def _registry(tmp_path: Path, plugin: str) -> Registry:
    p = tmp_path / "registry.yaml"
    p.write_text("base_model: m\nadapters:\n"
                 "  - name: calendar\n    dataset: d.jsonl\n    checkpoint: c\n"
                 f"  - name: invoice-form\n    plugin: {plugin}\n    dataset: d.jsonl\n    checkpoint: c\n")
    return Registry.load(p)


def test_registry_plugin_module_is_imported_and_registered(tmp_path, monkeypatch):
    mod = make_plugin("tests_registry_plugin_mod", "invoice-form")
    monkeypatch.setitem(sys.modules, "tests_registry_plugin_mod", mod)
    pm = get_plugin_manager(_registry(tmp_path, "tests_registry_plugin_mod"))
    assert pm.get_plugin("tests_registry_plugin_mod") is mod
    assert collect_adapters(pm)["invoice-form"].plugin == "tests_registry_plugin_mod"
    # A built-in named by `plugin:` is not registered twice.
    pm2 = get_plugin_manager(_registry(tmp_path, "vlrouter.adapters.provider_select"))
    assert sum(p is sys.modules["vlrouter.adapters.provider_select"] for p in pm2.get_plugins()) == 1


def test_registry_plugin_that_does_not_import_names_the_field(tmp_path):
    reg = _registry(tmp_path, "no_such_vlrouter_plugin")
    with pytest.raises(PluginError) as exc:
        get_plugin_manager(reg)
    msg = str(exc.value)
    assert str(reg.path) in msg and "adapters[1].plugin" in msg and "no_such_vlrouter_plugin" in msg
    assert "fix:" in msg


def test_plugin_table_rows():
    pm = get_plugin_manager(extra_plugins=(make_plugin("tests_table_plugin", "invoice-form", parser=True),))
    rows = {r["name"]: r for r in plugin_table(pm)}
    assert rows["vlrouter.adapters.claim_window"] == {
        "name": "vlrouter.adapters.claim_window", "hooks": ["parse_action", "register_adapters"],
        "adapters": ["claim-window"], "distribution": "built-in"}
    assert rows["vlrouter.backends.modal"]["hooks"] == ["register_backends"]
    assert rows["tests_table_plugin"]["adapters"] == ["invoice-form"]
    assert rows["tests_table_plugin"]["distribution"] == "module"


ENTRY_MODULE = '''\
from vlrouter import AdapterSpec, hookimpl

@hookimpl
def register_adapters(register):
    register(AdapterSpec(name="shipping-label", dataset="data/shipping.jsonl", checkpoint="checkpoints/shipping"))
'''


@pytest.fixture
def installed_entry_point(tmp_path, monkeypatch):
    """An installed distribution with an entry point in group `vlrouter` (on sys.path for this test only)."""
    site = tmp_path / "site"
    (site / "shipco_vlrouter").mkdir(parents=True)
    (site / "shipco_vlrouter" / "__init__.py").write_text(ENTRY_MODULE)
    info = site / "shipco_vlrouter-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shipco-vlrouter\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[vlrouter]\nshipco = shipco_vlrouter\n")
    monkeypatch.syspath_prepend(str(site))
    yield "shipco_vlrouter"
    sys.modules.pop("shipco_vlrouter", None)


def test_entry_points_load_only_when_enabled(installed_entry_point, monkeypatch):
    # conftest sets VLROUTER_NO_ENTRY_POINTS=1: tests never see installed plugins by default.
    assert "shipping-label" not in collect_adapters(get_plugin_manager())

    pm = get_plugin_manager(entry_points=True)
    spec = collect_adapters(pm)["shipping-label"]
    assert spec.plugin == "shipco"  # the entry point's name
    row = next(r for r in plugin_table(pm) if r["name"] == "shipco")
    assert row["distribution"] == "shipco-vlrouter 1.2.0"

    monkeypatch.delenv("VLROUTER_NO_ENTRY_POINTS")
    assert "shipping-label" in collect_adapters(get_plugin_manager())


def test_entry_point_plugin_named_again_by_registry_is_registered_once(installed_entry_point, tmp_path):
    reg = _registry(tmp_path, installed_entry_point)
    reg.path.write_text(reg.path.read_text().replace("invoice-form", "shipping-label"))
    pm = get_plugin_manager(Registry.load(reg.path), entry_points=True)
    assert collect_adapters(pm)["shipping-label"].plugin == "shipco"  # no duplicate-declaration error


def test_a_broken_installed_plugin_is_one_plugin_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "broken_vlrouter-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-vlrouter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlrouter]\nbroken = broken_vlrouter_missing_module\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="entry-point group 'vlrouter'.*broken_vlrouter_missing_module"):
        get_plugin_manager(entry_points=True)


def test_a_misspelt_hook_in_a_registry_plugin_is_refused_naming_the_plugin(tmp_path, monkeypatch):
    mod = types.ModuleType("tests_misspelt_hook_mod")

    @hookimpl
    def register_adaptors(register):  # not a hook: would be ignored silently
        pass

    mod.register_adaptors = register_adaptors
    monkeypatch.setitem(sys.modules, "tests_misspelt_hook_mod", mod)
    with pytest.raises(PluginError) as exc:
        get_plugin_manager(_registry(tmp_path, "tests_misspelt_hook_mod"), entry_points=False)
    msg = str(exc.value)
    assert msg.startswith("plugin 'tests_misspelt_hook_mod': ") and "register_adaptors" in msg, msg
    assert "(fix: rename the function to a hook in vlrouter/plugins/hookspecs.py)" in msg


def test_add_adapter_says_where_the_entry_came_from(tmp_path, monkeypatch):
    from vlrouter.plugins.manager import new_adapter_entry

    monkeypatch.setitem(sys.modules, "tests_source_mod", make_plugin("tests_source_mod", "invoice-form", "tax-form"))
    reg = _registry(tmp_path, "tests_source_mod")
    monkeypatch.chdir(tmp_path)
    entry, source = new_adapter_entry(reg, "tax-form")
    assert (entry.plugin, entry.dataset) == ("tests_source_mod", "data/tax-form.jsonl")
    assert source == "plugin tests_source_mod"
    entry, source = new_adapter_entry(reg, "my-form", dataset="my.jsonl", checkpoint="ck")
    assert (entry.plugin, entry.dataset, source) == (None, "my.jsonl", "generic JSONL adapter")
