"""provider-select: pick a provider from a list. Actions: ``click(x=.., y=..)``."""

from vlrouter import AdapterSpec, hookimpl
from vlrouter.core.actions import parse_call

NAME = "provider-select"
ACTIONS = {"click": {"x", "y"}}


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        name=NAME,
        description="Provider lists: select the requested doctor or facility.",
        dataset="data/provider-select/train.jsonl",
        checkpoint="checkpoints/provider-select",
    ))


@hookimpl
def parse_action(adapter, text):
    if adapter == NAME:
        return parse_call(text, ACTIONS)
    return None
