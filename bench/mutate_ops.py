"""Mutation operators over the AST: one small, realistic bug per mutant, as a source-text replacement.

:func:`mutants_of` parses a module and yields :class:`Mutant` records. Each mutant replaces one node's
source segment (located by the AST's line/column positions) with the ``ast.unparse`` of a mutated copy,
so the rest of the file -- comments, formatting, line numbers above it -- stays as it was and the diff
is one line. Operators:

* ``compare``    ``<``↔``<=``, ``>``↔``>=``, ``==``↔``!=``, ``is``↔``is not``, ``in``↔``not in``
* ``arith``      ``+``↔``-``, ``*``↔``/``, ``//``→``/``, ``**``→``*``, ``|``↔``&`` (also in ``+=`` etc.)
* ``boolop``     ``and``↔``or``
* ``not``        ``not x`` → ``x``; ``-x`` → ``x``
* ``negate``     ``if x:`` → ``if not (x):`` (conditions that are not comparisons already)
* ``const``      ``True``↔``False``; ``0``→``1``, ``1``→``0``, other ints ``n``→``n+1``; floats ``0.0``→``1.0``,
                 ``x``→``2x`` when ``|x| >= 1``, else ``x``→``x+1``
* ``return``     ``return x`` → ``return None``
* ``drop-call``  a call statement → ``pass``
* ``swap-args``  the first two positional (or keyword) arguments of a call swapped, both plain names
* ``slice``      ``a[i:j]`` → ``a[i:j + 1]`` (or ``a[i + 1:]``)
* ``loop``       ``break``↔``continue``

Not mutated: strings (docstrings, messages), f-strings, type annotations, ``if TYPE_CHECKING:`` blocks,
``raise`` statements (error messages), logging/progress/warning calls, ``located(...)`` messages,
``__repr__``, ``__all__``, presentation only (matplotlib drawing calls such as ``set_xlabel``, keyword
arguments such as ``dpi=`` or ``rotation=``, the decimals of ``round()``), the length a hash is cut to
(``hexdigest()[:16]``), and any line carrying
``# pragma: no mutate`` (on a ``def``/``class`` line: all of it; say why in the comment). A mutant whose
source parses to the same AST as the original is dropped.
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Iterator
from dataclasses import dataclass

COMPARE_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
ARITH_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Pow: ast.Mult, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr}
# calls whose only effect is a message, a progress bar or a log line
PRAGMA = "pragma: no mutate"
QUIET_CALLS = {"log", "debug", "info", "warning", "warn", "exception", "advance", "add_scalar", "located", "print",
               "set_description", "update"}
# matplotlib calls that only draw (labels, ticks, colours, layout): what a plot shows, not whether it is written
PLOT_CALLS = {"subplots", "imshow", "set_xticks", "set_yticks", "set_xlabel", "set_ylabel", "set_title", "text",
              "colorbar", "tight_layout", "legend", "grid"}
# keyword arguments that only change how something looks (a plot, a printed number), not what it is
COSMETIC_KWARGS = {"rotation", "ha", "va", "dpi", "fraction", "figsize", "fontsize", "color", "cmap", "indent",
                   "labelsize", "alpha"}
# argument order does not matter (or a swap is a TypeError, not a bug)
SYMMETRIC_CALLS = {"max", "min", "isinstance", "issubclass", "hasattr", "getattr", "setattr", "zip", "dict", "set"}


@dataclass
class Mutant:
    file: str  # path relative to the repository root
    line: int
    end_line: int
    col: int
    operator: str
    original: str  # the replaced source segment
    replacement: str
    source: str = ""  # the whole mutated module

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.col}:{self.operator}:{self.replacement}"

    def diff(self, original_source: str) -> str:
        return "".join(difflib.unified_diff(original_source.splitlines(True), self.source.splitlines(True),
                                            f"a/{self.file}", f"b/{self.file}", n=0))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _skipped(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated (their whole subtrees)."""
    skip: set[int] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            drop(node.returns)
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg,
                      node.args.kwarg]:
                if a is not None:
                    drop(a.annotation)
            if node.name == "__repr__":
                drop(node)
        elif isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        elif isinstance(node, ast.keyword) and node.arg in COSMETIC_KWARGS:
            drop(node)
        elif isinstance(node, ast.Call) and _call_name(node) == "round" and len(node.args) == 2:
            drop(node.args[1])  # the number of decimals shown
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) \
                and _call_name(node.value) in ("hexdigest", "hex"):
            drop(node.slice)  # how many hex digits an identifier keeps: any fixed length identifies alike
        elif _never_mutated(node):
            drop(node)
    return skip


def _never_mutated(node: ast.AST) -> bool:
    """Messages (raise, f-strings, logging/progress calls), type-checking imports, ``__all__``."""
    if isinstance(node, (ast.Raise, ast.JoinedStr)):
        return True
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    if isinstance(node, ast.Call):
        return _call_name(node) in QUIET_CALLS | PLOT_CALLS
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
    return False


def _plain(node: ast.AST) -> bool:
    return isinstance(node, (ast.Name, ast.Attribute))


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, (ast.JoinedStr,)) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _expr_mutations(node: ast.AST, parents: dict) -> Iterator[tuple[str, ast.AST]]:
    """(operator, mutated copy of node) for an expression node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = COMPARE_SWAP.get(type(op))
            if new:
                m = copy.deepcopy(node)
                m.ops[i] = new()
                yield "compare", m
    elif isinstance(node, ast.BinOp):
        new = ARITH_SWAP.get(type(node.op))
        if new and not (_is_str(node.left) or _is_str(node.right)):
            m = copy.deepcopy(node)
            m.op = new()
            yield "arith", m
    elif isinstance(node, ast.BoolOp):
        m = copy.deepcopy(node)
        m.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "boolop", m
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield "not", copy.deepcopy(node.operand)
    elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None \
            and node.value is not Ellipsis:
        v = node.value
        if isinstance(v, bool):
            new_v = not v
        elif isinstance(v, int):
            new_v = 1 if v == 0 else 0 if v == 1 else v + 1
        elif isinstance(v, float):
            new_v = 1.0 if v == 0 else v * 2 if abs(v) >= 1 else v + 1.0  # 1e3 -> 2e3, not 1001
        else:
            return
        parent = parents.get(node)
        if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub) and isinstance(v, int) and v == 1:
            new_v = 2  # -1 -> -2 (not -0)
        yield "const", ast.Constant(new_v)
    elif isinstance(node, ast.Call):
        args = [a for a in node.args if not isinstance(a, ast.Starred)]
        if _call_name(node) not in SYMMETRIC_CALLS:
            if len(node.args) >= 2 and len(args) == len(node.args) and _plain(args[0]) and _plain(args[1]) \
                    and ast.dump(args[0]) != ast.dump(args[1]):
                m = copy.deepcopy(node)
                m.args[0], m.args[1] = m.args[1], m.args[0]
                yield "swap-args", m
            kws = [k for k in node.keywords if k.arg is not None]
            if len(kws) >= 2 and _plain(kws[0].value) and _plain(kws[1].value) \
                    and ast.dump(kws[0].value) != ast.dump(kws[1].value):
                m = copy.deepcopy(node)
                mk = [k for k in m.keywords if k.arg is not None]
                mk[0].value, mk[1].value = mk[1].value, mk[0].value
                yield "swap-args", m
    elif isinstance(node, ast.Slice):
        m = copy.deepcopy(node)
        if node.upper is not None:
            m.upper = ast.BinOp(m.upper, ast.Add(), ast.Constant(1))
        elif node.lower is not None:
            m.lower = ast.BinOp(m.lower, ast.Add(), ast.Constant(1))
        else:
            return
        yield "slice", m


def _negatable(node: ast.AST, parents: dict) -> bool:
    """A condition of if/while/ternary/assert that no other operator already flips."""
    parent = parents.get(node)
    if not isinstance(parent, (ast.If, ast.While, ast.IfExp, ast.Assert)) or parent.test is not node:
        return False
    return not isinstance(node, (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Constant))


def _stmt_mutations(node: ast.stmt) -> Iterator[tuple[str, str]]:
    """(operator, replacement source) for a statement node."""
    if isinstance(node, ast.Return) and node.value is not None and not isinstance(node.value, ast.Constant):
        yield "return", "return None"
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) \
            and _call_name(node.value) not in QUIET_CALLS | PLOT_CALLS:
        yield "drop-call", "pass"
    elif isinstance(node, ast.AugAssign) and type(node.op) in ARITH_SWAP and not _is_str(node.value):
        m = copy.deepcopy(node)
        m.op = ARITH_SWAP[type(node.op)]()
        yield "arith", ast.unparse(m)
    elif isinstance(node, ast.Break):
        yield "loop", "continue"
    elif isinstance(node, ast.Continue):
        yield "loop", "break"


def _line_starts(src: bytes) -> list[int]:
    starts, pos = [0], 0
    for line in src.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def mutants_of(path: str, source: str) -> list[Mutant]:
    """Every mutant of one module (``path`` is how reports name the file)."""
    tree = ast.parse(source)
    original_dump = ast.dump(tree)
    skip = _skipped(tree)
    lines = source.splitlines()
    for node in ast.walk(tree):  # "# pragma: no mutate" on a line: nothing on it; on a def/class line: the body
        if hasattr(node, "lineno") and PRAGMA in lines[node.lineno - 1]:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                skip.update(id(n) for n in ast.walk(node))
            else:
                skip.add(id(node))
    parents = _parents(tree)
    raw = source.encode()
    starts = _line_starts(raw)
    out: list[Mutant] = []
    seen: set[str] = set()

    def emit(node: ast.AST, operator: str, replacement: str, wrap: bool) -> None:
        if getattr(node, "end_lineno", None) is None:
            return
        a = starts[node.lineno - 1] + node.col_offset
        b = starts[node.end_lineno - 1] + node.end_col_offset
        text = f"({replacement})" if wrap else replacement
        new = (raw[:a] + text.encode() + raw[b:]).decode()
        try:
            new_dump = ast.dump(ast.parse(new))
        except SyntaxError:
            return
        if new_dump == original_dump or new in seen:
            return
        seen.add(new)
        out.append(Mutant(path, node.lineno, node.end_lineno, node.col_offset, operator,
                          raw[a:b].decode(), text, new))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.stmt):
            for op, text in _stmt_mutations(node):
                emit(node, op, text, wrap=False)
        elif isinstance(node, ast.Slice):
            for op, m in _expr_mutations(node, parents):
                emit(node, op, ast.unparse(m), wrap=False)
        elif isinstance(node, ast.expr):
            if isinstance(parents.get(node), ast.Expr) and isinstance(node, ast.Constant):
                continue  # a bare constant statement (docstring)
            for op, m in _expr_mutations(node, parents):
                emit(node, op, ast.unparse(m), wrap=not isinstance(m, (ast.Constant, ast.Name, ast.Attribute)))
            if _negatable(node, parents):
                emit(node, "negate", f"not ({ast.unparse(node)})", wrap=True)
    out.sort(key=lambda m: (m.line, m.col, m.operator))
    return out
