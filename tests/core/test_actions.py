"""The shared ``name(key=value, ...)`` parser: keyword literals only, finite numbers, pixel coordinates."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from vlrouter.core.actions import UIAction, parse_call

CLICK = UIAction(name="click", args={"x": 412, "y": 230})


def test_names_values_and_types_are_kept():
    a = parse_call("click(x=12.5, y=7)")
    assert a.name == "click" and a.args == {"x": 12.5, "y": 7}
    assert isinstance(a.args["x"], float) and isinstance(a.args["y"], int)
    assert parse_call("type(text='A-12 b')") == UIAction(name="type", args={"text": "A-12 b"})
    assert parse_call("drag(x1=1, y1=2, x2=3, y2=4)").args == {"x1": 1, "y1": 2, "x2": 3, "y2": 4}


def test_str_is_the_call_again_strings_quoted():
    assert str(CLICK) == "click(x=412, y=230)"
    typed = parse_call("type(text='AB-12', x=3)")
    assert str(typed) == "type(text='AB-12', x=3)"
    assert parse_call(str(typed)) == typed  # round trip


@pytest.mark.parametrize("bad", [
    "click(x=, y=2)",             # not Python
    "click(412, 230)",            # positional: which is x?
    "click(412, y=230)",
    "click(x=[412], y=230)",      # not a number or a string
    "toggle(on=True)",            # booleans are not accepted values
    "click(x=a, y=230)",          # a name, not a literal
    "click(**{'x': 1})",
])
def test_calls_that_are_not_keyword_literals_are_skipped_for_the_next_one(bad):
    assert parse_call(bad) is None
    assert parse_call(f"{bad} then click(x=412, y=230)") == CLICK  # the next call still parses
    assert parse_call(f"{bad} click(x=412, y=230)", {"click": {"x", "y"}}) == CLICK


def test_allowed_actions_need_exactly_their_keywords():
    allowed = {"click": {"x", "y"}, "type": {"text"}}
    assert parse_call("scroll(dy=3) click(x=412, y=230)", allowed) == CLICK
    assert parse_call("click(x=1) click(x=1, y=2, z=3) click(x=412, y=230)", allowed) == CLICK
    assert parse_call("scroll(dy=3)", allowed) is None
    assert parse_call(None) is None and parse_call(b"click(x=1, y=2)") is None


def test_an_action_is_immutable():
    with pytest.raises(ValidationError):
        CLICK.name = "type"
    assert CLICK.name == "click"

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


def test_a_call_body_of_up_to_4096_characters_parses_and_a_longer_one_is_skipped():
    def call(n: int) -> str:  # type(text='aaa…') whose body between the parentheses is n characters
        return f"type(text='{'a' * (n - 7)}')"

    assert parse_call(call(4096)) == UIAction(name="type", args={"text": "a" * 4089})
    assert parse_call(call(4097)) is None
    assert parse_call(call(4097) + " click(x=412, y=230)") == CLICK  # skipped for the next call


def test_a_parsed_action_is_immutable():
    a = parse_call("click(x=412, y=230)")
    with pytest.raises(ValidationError):
        a.name = "type"  # what the engine returned stays what the model said
    assert a == CLICK


def test_the_top_left_corner_is_a_coordinate():
    assert parse_call("click(x=0, y=0)", {"click": {"x", "y"}}) == UIAction(name="click", args={"x": 0, "y": 0})
    assert parse_call("drag(x1=0.0, y1=0, x2=5, y2=0)").args == {"x1": 0.0, "y1": 0, "x2": 5, "y2": 0}
