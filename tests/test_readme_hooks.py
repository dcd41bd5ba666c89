"""README's plugin guide stays true: every hook documented, the example package works."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pluggy
import pytest

from vlrouter.plugins import hookspecs

README = Path(__file__).resolve().parent.parent / "README.md"


def section(text: str, heading: str) -> str:
    """The body under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        pytest.fail(f"README.md has no {heading!r} heading")
    body = []
    for line in lines[start + 1:]:
        m = re.match(r"^(#{1,6}) ", line)
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def hookspec_names() -> list[str]:
    """Hook names as pluggy sees them in vlrouter/plugins/hookspecs.py (no hard-coded list)."""
    pm = pluggy.PluginManager("vlrouter")
    pm.add_hookspecs(hookspecs)
    names = sorted(name for name, caller in vars(pm.hook).items()
                   if isinstance(caller, pluggy.HookCaller) and caller.spec is not None)
    marked = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
                    if hasattr(fn, "vlrouter_spec"))
    assert names == marked and names, (names, marked)
    return names


def plugin_guide() -> str:
    return section(README.read_text(), "## Writing an adapter plugin")


def test_every_hookspec_is_documented_in_the_hooks_subsection():
    hooks = section(plugin_guide(), "### Hooks")
    missing = [name for name in hookspec_names() if not re.search(rf"`{name}\(", hooks)]
    assert not missing, f"README.md '### Hooks' does not document: {missing}"


def test_the_hooks_subsection_documents_no_hook_that_does_not_exist():
    hooks = section(plugin_guide(), "### Hooks")
    documented = re.findall(r"^- `([a-z_]+)\(", hooks, re.M)
    assert documented
    assert sorted(documented) == hookspec_names()


def test_documented_signatures_match_the_hookspecs():
    hooks = section(plugin_guide(), "### Hooks")
    for name in hookspec_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in hooks, name


def _code_block(guide: str, lang: str, after: str) -> str:
    tail = guide[guide.index(after):]
    m = re.search(rf"```{lang}\n(.*?)```", tail, re.S)
    assert m, f"no ```{lang} block after {after!r}"
    return m.group(1)


def test_example_pyproject_declares_the_entry_point_group():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    guide = plugin_guide()
    data = tomllib.loads(_code_block(guide, "toml", "pyproject.toml"))
    eps = data["project"]["entry-points"]["vlrouter"]
    module_file = re.search(r"^`(\w+)\.py`:", guide, re.M).group(1)
    assert module_file in eps.values()


def test_example_plugin_module_works(monkeypatch):
    from vlrouter.plugins.manager import collect_adapters, get_plugin_manager, parse_action, plugin_table

    guide = plugin_guide()
    source = _code_block(guide, "python", "acme_vlrouter.py`:")
    mod = types.ModuleType("acme_vlrouter")
    exec(compile(source, "README.md:acme_vlrouter.py", "exec"), mod.__dict__)
    monkeypatch.setitem(sys.modules, "acme_vlrouter", mod)
    pm = get_plugin_manager(extra_plugins=(mod,), entry_points=False)
    spec = collect_adapters(pm)["invoice-form"]
    assert spec.plugin == "acme_vlrouter" and spec.dataset == "data/invoice-form/train.jsonl"
    assert str(parse_action(pm, "invoice-form", "select(row=3)")) == "select(row=3)"
    assert parse_action(pm, "calendar", "click(x=1, y=2)").name == "click"  # not claimed by the example
    row = next(r for r in plugin_table(pm) if r["name"] == "acme_vlrouter")
    assert row["hooks"] == ["parse_action", "register_adapters"]


def test_guide_states_that_registry_plugin_imports_code():
    guide = plugin_guide()
    assert "trusted config" in guide and "plugin:" in guide and "[project.entry-points.vlrouter]" in guide
