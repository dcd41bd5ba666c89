"""calendar: click a date in month views and date pickers. Actions: ``click(x=.., y=..)``."""

from vlrouter import AdapterSpec, hookimpl
from vlrouter.core.actions import parse_call

NAME = "calendar"
ACTIONS = {"click": {"x", "y"}}


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        name=NAME,
        description="Calendar month views and date pickers: click the requested date.",
        dataset="data/calendar/train.jsonl",
        checkpoint="checkpoints/calendar-tasks",
    ))


@hookimpl
def parse_action(adapter, text):
    if adapter == NAME:
        return parse_call(text, ACTIONS)
    return None
