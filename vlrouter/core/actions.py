"""Typed UI actions parsed from generated text, e.g. ``click(x=412, y=230)``.

Adapter plugins turn model output into a :class:`UIAction` through the ``parse_action``
hook; :func:`parse_call` is the shared parser for the ``name(key=value, ...)`` call
syntax the seed's adapters emit. The raw text is always kept by the engine.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_CALL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\((.*?)\)", re.S)
# Screen coordinates: a number of pixels from the top-left corner, never a string, negative or infinite.
COORDINATE_KEYS = frozenset({"x", "y", "x1", "y1", "x2", "y2", "start_x", "start_y", "end_x", "end_y"})
MAX_CALL_CHARS = 4096  # a generated action is one short call; longer bodies are not parsed


class UIAction(BaseModel):
    """One parsed action: ``name`` plus keyword arguments (ints, floats or strings)."""

    model_config = ConfigDict(frozen=True)

    name: str
    args: dict[str, Any] = {}

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.args.items())
        return f"{self.name}({inner})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"name", "args", "call"}``."""
        return {"name": self.name, "args": dict(self.args), "call": str(self)}


def _value_ok(key: str, value: Any) -> bool:
    """Literals only (int, finite float, str); coordinates are non-negative finite numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if key in COORDINATE_KEYS:
        return not isinstance(value, str) and value >= 0
    return True


def parse_call(text: str, allowed: dict[str, set[str]] | None = None) -> UIAction | None:
    """The first ``name(k=v, ...)`` call in ``text`` whose arguments are literals.

    ``allowed`` maps action names to their required keyword set; calls that do not
    match are skipped. Numbers must be finite (``1e999`` is infinity); coordinates
    (:data:`COORDINATE_KEYS`) must be non-negative numbers, never strings. Returns None
    when nothing parses (never raises).
    """
    if not isinstance(text, str):
        return None
    for m in _CALL_RE.finditer(text):
        name, body = m.group(1), m.group(2)
        if allowed is not None and name not in allowed:
            continue
        if len(body) > MAX_CALL_CHARS:
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
                if not _value_ok(kw.arg, value):
                    raise ValueError
                args[kw.arg] = value
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if allowed is not None and set(args) != allowed[name]:
            continue
        return UIAction(name=name, args=args)
    return None
