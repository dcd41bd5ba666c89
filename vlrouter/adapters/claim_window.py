"""claim-window: insurance claim windows and forms. Actions: ``click(x=.., y=..)``, ``type(text=..)``."""

from vlrouter import AdapterSpec, hookimpl
from vlrouter.core.actions import parse_call

NAME = "claim-window"
ACTIONS = {"click": {"x", "y"}, "type": {"text"}}


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        name=NAME,
        description="Claim windows and forms: click fields and buttons, type values.",
        dataset="data/claim-window/train.jsonl",
        checkpoint="checkpoints/claim-window",
    ))


@hookimpl
def parse_action(adapter, text):
    if adapter == NAME:
        return parse_call(text, ACTIONS)
    return None
