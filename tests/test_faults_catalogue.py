"""docs/faults.md is a catalogue of bad input and faults, each row naming the test that checks it.

The catalogue stays honest: at least 30 rows, every category present, every row names at
least one test, and every named test exists (the file, ``def test_name(`` in it, and a
parametrized id after ``[`` written literally in that file).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "docs" / "faults.md"
CATEGORIES = ("registry.yaml", "Adapter datasets", "Images", "Router checkpoints", "CLI arguments", "Modal",
              "Engine inputs", "Crashes")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)(?:\[([^\]`]+)\])?`")


def _rows() -> list[tuple[str, list[str]]]:
    """``(section heading, cells)`` for every table body row."""
    rows, section = [], ""
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and not re.match(r"^\|[\s\-|:]+\|$", line):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[0] != "input or fault":  # the header row
                rows.append((section, cells))
    return rows


def test_the_catalogue_has_at_least_thirty_rows_in_every_category():
    rows = _rows()
    assert len(rows) >= 30, len(rows)
    for name in CATEGORIES:
        assert any(section.startswith(name) for section, _ in rows), f"no rows under a '## {name}…' heading"


def test_every_row_has_four_columns_and_names_a_test():
    for section, cells in _rows():
        assert len(cells) == 4, (section, cells)
        assert all(cells), (section, cells)
        assert TEST_REF.search(cells[3]), f"row without a `tests/…py::test_name` reference: {cells}"


def test_every_named_test_exists():
    missing = []
    for _, cells in _rows():
        for path, name, param in TEST_REF.findall(cells[3]):
            f = REPO / path
            if not f.is_file():
                missing.append(f"{path} (no such file)")
                continue
            text = f.read_text(encoding="utf-8")
            if not re.search(rf"^\s*def {name}\(", text, re.MULTILINE):
                missing.append(f"{path}::{name} (no such test)")
            elif param and param not in text:
                missing.append(f"{path}::{name}[{param}] (no such parametrized id in the file)")
    assert not missing, missing
