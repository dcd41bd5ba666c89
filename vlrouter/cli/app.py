"""The typer app every command module attaches to, and its one error boundary.

Command modules (``registry_cmds``, ``train_cmds``, ``engine_cmds``, …) decorate
functions with ``@app.command()``; :mod:`vlrouter.cli.main` imports them all. Every
command runs inside :meth:`RouterGroup.invoke`: a :class:`RouterError` becomes one red
line and exit 1 (2 for a bug), Ctrl-C exit 130; tracebacks only with ``VLROUTER_DEBUG=1``.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

from vlrouter.cli.ui import err_console, fail
from vlrouter.core.errors import RouterError


def _debug() -> bool:
    return os.environ.get("VLROUTER_DEBUG", "") not in ("", "0")


def _is_cli_exception(e: BaseException) -> bool:
    """typer's/click's own exits and usage errors (typer may vendor click, so match by module)."""
    return isinstance(e, (typer.Exit, typer.Abort)) or type(e).__module__.split(".")[0] in ("click", "typer")


class RouterGroup(TyperGroup):
    """The ``router`` group: runs a command and turns what it raises into one line and an exit code."""

    def invoke(self, ctx: Any):
        try:
            return super().invoke(ctx)
        except RouterError as e:
            if _debug():
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: nothing half-written was kept")
            raise typer.Exit(130) from None
        except SystemExit:
            raise
        except Exception as e:
            if _is_cli_exception(e) or _debug():
                raise  # usage errors, --help and exits: click/typer print and exit themselves
            # a bug: still one line, with the hint to get the traceback
            fail(f"unexpected {type(e).__name__}: {e} (run again with VLROUTER_DEBUG=1 for the traceback; "
                 "please report it)", 2)


app = typer.Typer(
    name="router",
    cls=RouterGroup,
    help="vlrouter: route a GUI agent's screenshot + instruction to the right LoRA adapter, then act.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
