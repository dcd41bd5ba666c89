"""The README's CLI reference table, generated from the typer app (``python -m vlrouter.cli.reference``)."""

from __future__ import annotations

import typer

from vlrouter.cli.main import app

COMMON = {"registry", "json_out", "as_json", "help"}  # said once above the table, not on every row


METAVARS = {"<int>": "N", "<int range>": "N", "<float>": "X", "<float range>": "X", "<path>": "PATH",
            "<str>": "TEXT"}


def _usage(cmd, ctx) -> str:
    """``router NAME ARG… [--opt X]…``: arguments, then the options a user types (common ones left out)."""
    parts = [f"router {cmd.name}"]
    for p in cmd.params:
        if p.name in COMMON:
            continue
        if p.param_type_name == "argument":
            parts.append(p.name.upper() if p.required else f"[{p.name.upper()}]")
            continue
        record = p.get_help_record(ctx)[0].split(", ")[-1]  # "--epochs <int range>"
        flag, _, kind = record.partition(" ")
        kind = METAVARS.get(kind, kind.strip("<>"))
        parts.append(f"[{flag} {kind}]" if kind else f"[{flag}]")
    return " ".join(parts)


def _summary(cmd) -> str:
    """The help's first paragraph, on one line."""
    first = (cmd.help or "").strip().split("\n\n")[0]
    return " ".join(first.split())


def cli_reference() -> str:
    """One Markdown row per command: its usage and the first line of its help."""
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    rows = ["| command | what it does |", "|---|---|"]
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        usage = _usage(cmd, typer.Context(cmd, info_name=name, parent=ctx)).replace("|", "\\|")
        rows.append(f"| `{usage}` | {_summary(cmd).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(cli_reference(), end="")
