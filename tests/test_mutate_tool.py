"""bench/mutate_ops.py: the mutation operators make one small, compilable change each, and leave messages,
annotations and logging alone."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ops():
    name = "_bench_mutate_ops"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "mutate_ops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


SOURCE = '''"""A docstring: never mutated."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LIMIT = 3


def f(x: int, items: list[int], prog) -> int:
    """Another docstring."""
    prog.log(f"x is {x + 1}")
    if x < LIMIT and items:
        raise ValueError(f"too small: {x - 1}")
    for i in items[:2]:
        if i == 0:
            continue
        x += i * 2
    save(x, items)
    return -x if not items else x


def g():  # pragma: no mutate -- cosmetic
    return 1 + 2
'''


def test_each_mutant_changes_one_thing_and_compiles(ops):
    mutants = ops.mutants_of("m.py", SOURCE)
    got = {(m.line, m.operator, m.original, m.replacement) for m in mutants}
    expected = {
        (7, "const", "3", "4"),
        (13, "compare", "x < LIMIT", "(x <= LIMIT)"),
        (13, "boolop", "x < LIMIT and items", "(x < LIMIT or items)"),
        (15, "slice", ":2", ":2 + 1"),
        (16, "compare", "i == 0", "(i != 0)"),
        (17, "loop", "continue", "break"),
        (18, "arith", "x += i * 2", "x -= i * 2"),
        (18, "arith", "i * 2", "(i / 2)"),
        (19, "drop-call", "save(x, items)", "pass"),
        (19, "swap-args", "save(x, items)", "(save(items, x))"),
        (20, "return", "return -x if not items else x", "return None"),
        (20, "not", "-x", "x"),
        (20, "not", "not items", "items"),
    }
    assert expected <= got, expected - got
    for m in mutants:
        ast.parse(m.source)
        assert m.source != SOURCE
        assert len(m.diff(SOURCE).splitlines()) >= 4  # ---, +++, @@, one - and one + line at least


def test_messages_annotations_type_checking_and_pragmas_are_left_alone(ops):
    lines = SOURCE.splitlines()
    for m in ops.mutants_of("m.py", SOURCE):
        text = lines[m.line - 1]
        assert "prog.log" not in text and "raise" not in text and '"""' not in text, m
        assert "TYPE_CHECKING" not in text and "import" not in text and "def f" not in text, m
        assert m.line < 22, m  # g() carries "# pragma: no mutate"
