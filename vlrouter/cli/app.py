"""The typer app every command module attaches to, and its one error boundary.

Command modules (``registry_cmds``, ``train_cmds``, ``engine_cmds``, …) decorate
functions with ``@app.command()``; :mod:`vlrouter.cli.main` imports them all. Every
command runs inside :meth:`RouterGroup.invoke`: a :class:`RouterError` becomes one red
line and exit 1 (2 for a bug), Ctrl-C exit 130; tracebacks only with ``VLROUTER_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from vlrouter import __version__
from vlrouter.cli.ui import err_console, fail, fail_json, mode
from vlrouter.core.errors import RouterError
from vlrouter.core.paths import as_os_error, storage_error


def _debug() -> bool:
    return os.environ.get("VLROUTER_DEBUG", "") not in ("", "0")


def _is_cli_exception(e: BaseException) -> bool:
    """typer's/click's own exits and usage errors (typer may vendor click, so match by module)."""
    return isinstance(e, (typer.Exit, typer.Abort)) or type(e).__module__.split(".")[0] in ("click", "typer")


class RouterGroup(TyperGroup):
    """The ``router`` group: runs a command and turns what it raises into one line and an exit code."""

    def invoke(self, ctx: Any):
        mode.json = False  # set again by --json while this command's options are parsed
        previous_hook = threading.excepthook
        threading.excepthook = _thread_hook
        try:
            return super().invoke(ctx)
        except RouterError as e:
            if _debug():
                raise
            _fail(e, str(e), e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: nothing half-written was kept")
            raise typer.Exit(130) from None
        except SystemExit:
            raise
        except Exception as e:
            if _is_cli_exception(e) or _debug():
                raise  # usage errors, --help and exits: click/typer print and exit themselves
            os_err = as_os_error(e)
            if os_err is not None and os_err.errno is not None:
                # disk full, read-only, permission denied … wherever it came from: one located line, exit 1
                err = storage_error(os_err)
                _fail(err, str(err), err.exit_code)
            # a bug: still one line, with the hint to get the traceback
            _fail(e, f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (run again with VLROUTER_DEBUG=1 "
                     "for the traceback; please report it)", 2)
        finally:
            threading.excepthook = previous_hook


def _fail(err: BaseException, message: str, code: int) -> None:
    if mode.json:
        fail_json(err, message, code)
    fail(message, code)


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    """A library's background thread (TensorBoard's event writer on a full disk) dying: one line, no traceback.

    The main flow then fails (or finishes) on its own; with VLROUTER_DEBUG=1 the traceback is shown.
    """
    if _debug():
        sys.__excepthook__(args.exc_type, args.exc_value, args.exc_traceback)
        return
    exc = args.exc_value
    os_err = as_os_error(exc) if exc is not None else None
    what = str(storage_error(os_err)) if os_err is not None and os_err.errno is not None else \
        f"{args.exc_type.__name__}: {' '.join(str(exc).split())}"
    name = args.thread.name if args.thread is not None else "a background thread"
    err_console.print(f"[yellow]warning:[/] {name} stopped: {what}", highlight=False, soft_wrap=True, markup=True)



app = typer.Typer(
    name="router",
    cls=RouterGroup,
    help="vlrouter: route a GUI agent's screenshot + instruction to the right LoRA adapter, then act.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlrouter {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print vlrouter's version and exit.")] = False) -> None:
    """vlrouter: route a GUI agent's screenshot + instruction to the right LoRA adapter, then act."""
