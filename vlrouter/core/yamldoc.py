"""Round-trip YAML documents people write: bounded loading, line numbers of fields, comment-keeping edits.

ruamel's round-trip mode keeps comments and key order, so an edit (``router add-adapter``)
rewrites only what changed. Aliases are counted before anything expands them (no "billion
laughs"): ruamel shares aliased nodes, so *loading* a 1 KB alias bomb is cheap, but
walking or validating it would expand it into billions of values. :func:`check_expansion`
counts the expanded size with memoisation -- linear in the file, whatever the expansion --
and refuses documents over :data:`MAX_YAML_NODES` values or whose aliases refer to themselves.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

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


def yaml_rt() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


def line_of(doc: Any, loc: tuple) -> int | None:
    """1-based line of the deepest node on ``loc`` that ruamel knows a position for."""
    node, line = doc, None
    for key in loc:
        try:
            if isinstance(node, CommentedMap) and key not in node:  # YAML's `1:` / `true:` keys, named as text
                key = next((k for k in node if str(k) == key), key)
            if isinstance(node, CommentedMap) and key in node:
                line = node.lc.key(key)[0] + 1
                node = node[key]
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                line = node.lc.item(key)[0] + 1
                node = node[key]
            else:
                break
        except Exception:
            break
    return line


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the CLI prints every error as one line)."""
    return " ".join(str(err).split())


def plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def move_trailing_comment(src: Any, dst: Any) -> None:
    """Move the full-line comments that follow mapping ``src`` onto the end of mapping ``dst``.

    ruamel attaches the comment lines after a block mapping to its last key's end-of-line
    slot (``"  # eol\n\n# next\n"``); the end-of-line part stays, the rest moves.
    """
    if not (isinstance(src, CommentedMap) and isinstance(dst, CommentedMap) and len(src) and len(dst)):
        return
    slot = src.ca.items.get(list(src.keys())[-1])
    if not slot or len(slot) < 3 or slot[2] is None:
        return
    tok = slot[2]
    eol, _, rest = tok.value.partition("\n")
    if not rest.strip():
        return
    tok.value = eol + "\n"
    dkey = list(dst.keys())[-1]
    dslot = dst.ca.items.setdefault(dkey, [None, None, None, None])
    while len(dslot) < 4:
        dslot.append(None)
    if dslot[2] is None:
        dslot[2] = CommentToken("\n" + rest, CommentMark(0), None)
    else:
        dslot[2].value = dslot[2].value.rstrip("\n") + "\n" + rest


def copy_doc(doc: CommentedMap) -> CommentedMap:
    return yaml_rt().load(dump_yaml(doc))


def dump_yaml(doc: Any) -> str:
    buf = io.StringIO()
    yaml_rt().dump(doc, buf)
    return buf.getvalue()
