"""YAML people write, bounded: aliases counted before anything expands them (no "billion laughs").

ruamel shares aliased nodes, so *loading* a 1 KB alias bomb is cheap; walking or
validating it would expand it into billions of values. :func:`check_expansion` counts
the expanded size with memoisation -- linear in the file, whatever the expansion -- and
refuses documents over :data:`MAX_YAML_NODES` values or whose aliases refer to themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlrouter.core.errors import RegistryError, located

MAX_YAML_NODES = 100_000  # registry.yaml has tens of values; an alias bomb expands to billions


def check_expansion(doc: Any, p: str | Path) -> None:
    """Refuse a document whose YAML aliases expand past :data:`MAX_YAML_NODES` nodes, or refer to themselves.

    ruamel shares aliased nodes, so loading a 1 KB "alias bomb" is cheap; validating it
    would expand it into billions of nodes. Sizes are counted with memoisation (linear
    in the file, whatever the expansion).
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise RegistryError(located(p, None, "a YAML alias refers to itself (a recursive structure)",
                                        fix="remove the recursive anchor/alias (&x … *x)"))
        active.add(key)
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += size(child)
            if total > MAX_YAML_NODES:
                raise RegistryError(located(p, None, f"YAML aliases expand to more than {MAX_YAML_NODES:,} values "
                                            "(an alias bomb?)", fix="write the values out instead of nesting "
                                                                    "aliases (&x … *x)"))
        active.discard(key)
        memo[key] = total
        return total

    try:
        size(doc)
    except RecursionError:
        raise RegistryError(located(p, None, "YAML nested too deeply", fix="flatten the file")) from None
