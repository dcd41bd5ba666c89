"""Console helpers: the rich progress renderer and the one-line error boundary."""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vlrouter.core.errors import RouterError

console = Console()
err_console = Console(stderr=True)


class RichProgress:
    """Implements :class:`vlrouter.core.progress.Progress` with rich bars on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err_console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[object]:
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False, disable=not self.console.is_terminal
                      and os.environ.get("VLROUTER_PROGRESS", "1") == "0") as prog:
            tid = prog.add_task(description, total=total)

            class _Handle:
                def advance(self, n: int = 1) -> None:
                    prog.advance(tid, n)

            yield _Handle()
            if total is not None:
                prog.update(tid, completed=total)

    def log(self, message: str) -> None:
        self.console.print(message)


def quiet_libraries() -> None:
    """Silence transformers/hub chatter and their own progress bars; we draw ours."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:
        pass
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning)


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    # escape: messages hold brackets (`adapters[2]`, `[a-z0-9]`) that rich would eat as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn RouterError into one red line and exit 1; tracebacks only with VLROUTER_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("VLROUTER_DEBUG", "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except RouterError as e:
            if debug:
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: nothing half-written was kept")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: still one line, with the hint to get the traceback
            if debug:
                raise
            fail(f"unexpected {type(e).__name__}: {e} (run again with VLROUTER_DEBUG=1 for the traceback; "
                 "please report it)", 2)

    return wrapper


def print_json(data) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
