"""The generic JSONL adapter: used for registry entries that name no ``plugin:``.

It declares no adapter of its own (the registry entry supplies name, dataset and
checkpoint) and parses any ``name(key=value, ...)`` call, answering after every
other plugin (``trylast``), so a specific plugin's parser always wins.
"""

from vlrouter import hookimpl
from vlrouter.core.actions import parse_call


@hookimpl(trylast=True)
def parse_action(adapter, text):
    return parse_call(text)
