"""The shared action parser: literal arguments only, finite numbers, coordinates that are pixels."""

from __future__ import annotations

import json

import pytest

from vlrouter.core.actions import UIAction, parse_call


@pytest.mark.parametrize("text", [
    "click(x=1e999, y=5)",  # a literal that is infinity
    "click(x=inf, y=5)",  # a name, not a literal
    "click(x=412, y=-5)",  # off the screen
    "click(x='412', y='230')",  # string coordinates
    "click(x=True, y=3)",
    "click(x=float('nan'), y=3)",
], ids=["overflow-inf", "name-inf", "negative", "string-coordinates", "bool", "call"])
def test_coordinates_must_be_finite_non_negative_numbers(text):
    assert parse_call(text, {"click": {"x", "y"}}) is None
    assert parse_call(text) is None


def test_valid_calls_still_parse_and_serialise():
    a = parse_call("sure: click(x=412, y=230.5) then", {"click": {"x", "y"}})
    assert a == UIAction(name="click", args={"x": 412, "y": 230.5})
    assert json.loads(json.dumps(a.to_dict())) == {"name": "click", "args": {"x": 412, "y": 230.5},
                                                   "call": "click(x=412, y=230.5)"}
    assert parse_call("type(text='-5')") == UIAction(name="type", args={"text": "-5"})  # text stays text
    assert parse_call("scroll(dy=-3)") == UIAction(name="scroll", args={"dy": -3})  # only pixels are >= 0
