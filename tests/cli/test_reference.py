"""README's CLI reference is generated from the typer app: a command or option added without it fails here."""

from __future__ import annotations

import re
from pathlib import Path

from vlrouter.cli.reference import cli_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_cli_table_is_the_generated_one():
    text = README.read_text()
    m = re.search(r"<!-- cli:start -->\n(.*?)<!-- cli:end -->", text, re.S)
    assert m, "README.md has no <!-- cli:start --> … <!-- cli:end --> block"
    assert m.group(1) == cli_reference(), "README's CLI table drifted: paste `python -m vlrouter.cli.reference`"


def test_every_command_and_its_options_appear_in_the_table():
    table = cli_reference()
    for cmd in ("retrain", "add-adapter", "act", "route", "eval", "tiny-model", "demo"):
        assert f"`router {cmd}" in table
    assert "[--max-new-tokens N]" in table and "[--preset tiny\\|demo\\|100m]" in table
