"""The typer app every command module attaches to, and the error boundary.

Command modules (``registry_cmds``, ``train_cmds``, ``engine_cmds``, ``demo_cmds``)
decorate functions with ``@app.command()``; :mod:`vlrouter.cli.main` imports them all.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="router",
    help="vlrouter: route a GUI agent's screenshot + instruction to the right LoRA adapter, then act.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
