"""Typed UI actions parsed from generated text, e.g. ``click(x=412, y=230)``.

Adapter plugins turn model output into a :class:`UIAction` through the ``parse_action``
hook; :func:`parse_call` is the shared parser for the ``name(key=value, ...)`` call
syntax the seed's adapters emit. The raw text is always kept by the engine.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_CALL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\((.*?)\)", re.S)


class UIAction(BaseModel):
    """One parsed action: ``name`` plus keyword arguments (ints, floats or strings)."""

    model_config = ConfigDict(frozen=True)

    name: str
    args: dict[str, Any] = {}

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.args.items())
        return f"{self.name}({inner})"


def parse_call(text: str, allowed: dict[str, set[str]] | None = None) -> UIAction | None:
    """The first ``name(k=v, ...)`` call in ``text`` whose arguments are literals.

    ``allowed`` maps action names to their required keyword set; calls that do not
    match are skipped. Returns None when nothing parses (never raises).
    """
    if not isinstance(text, str):
        return None
    for m in _CALL_RE.finditer(text):
        name, body = m.group(1), m.group(2)
        if allowed is not None and name not in allowed:
            continue
        try:
            node = ast.parse(f"f({body})", mode="eval").body
        except SyntaxError:
            continue
        if not isinstance(node, ast.Call) or node.args:
            continue
        args: dict[str, Any] = {}
        try:
            for kw in node.keywords:
                if kw.arg is None:
                    raise ValueError
                value = ast.literal_eval(kw.value)
                if not isinstance(value, (int, float, str)) or isinstance(value, bool):
                    raise ValueError
                args[kw.arg] = value
        except ValueError:
            continue
        if allowed is not None and set(args) != allowed[name]:
            continue
        return UIAction(name=name, args=args)
    return None
