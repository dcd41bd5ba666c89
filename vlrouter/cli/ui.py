"""Console helpers: the rich progress renderer, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
    # escape: messages hold brackets (`adapters[2]`, `[a-z0-9]`) that rich would eat as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
