"""Parsed actions: a typed action keeps its coordinates and values, and the adapter's own parser answers
before the generic one (the generic parser is the fallback, ``trylast``)."""

from __future__ import annotations

import types

import pytest

from vlrouter import hookimpl
from vlrouter.core.actions import UIAction, parse_call
from vlrouter.plugins.manager import get_plugin_manager, parse_action

CLICK = UIAction(name="click", args={"x": 412, "y": 230})
BUILTIN_CLICKERS = ["calendar", "claim-window", "provider-select"]


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


@pytest.mark.parametrize("adapter", [*BUILTIN_CLICKERS, "any-generic-adapter"])
@pytest.mark.parametrize("text", ["click(x=412, y=230)", "click(y=230, x=412)", "I will click(x = 412,y=230) now."])
def test_a_click_keeps_its_coordinates(pm, adapter, text):
    a = parse_action(pm, adapter, text)
    assert a == CLICK
    assert (a.args["x"], a.args["y"]) == (412, 230)


def test_the_adapters_own_parser_answers_before_the_generic_one(pm):
    text = "scroll(dy=3) then click(x=412, y=230)"
    # calendar only knows click(x, y): it skips the scroll; the generic parser would take the first call
    assert parse_action(pm, "calendar", text) == CLICK
    assert parse_action(pm, "provider-select", text) == CLICK
    assert parse_action(pm, "claim-window", "click(x=1) type(text='AB-12')") == UIAction(name="type",
                                                                                         args={"text": "AB-12"})
    # an adapter no plugin owns gets the generic parser: the first call in the text
    assert parse_action(pm, "any-generic-adapter", text) == UIAction(name="scroll", args={"dy": 3})


def test_a_third_party_parser_answers_before_the_generic_one():
    mod = types.ModuleType("tapper_plugin")

    @hookimpl
    def parse_action_impl(adapter, text):
        return parse_call(text, {"tap": {"x"}}) if adapter == "tapper" else None

    mod.parse_action = parse_action_impl
    pm = get_plugin_manager(extra_plugins=(mod,))
    try:
        assert parse_action(pm, "tapper", "scroll(dy=1) tap(x=3)") == UIAction(name="tap", args={"x": 3})
        # when the owner cannot parse the text, the generic parser still answers (the raw call)
        assert parse_action(pm, "tapper", "scroll(dy=1)") == UIAction(name="scroll", args={"dy": 1})
    finally:
        pm.unregister(mod)
