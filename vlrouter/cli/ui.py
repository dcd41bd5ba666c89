"""Console helpers: the rich progress renderer, one-line errors, JSON output."""

from __future__ import annotations

import json
import math
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


class _Mode:
    """Per-invocation output mode: ``json`` is set by ``--json`` (errors then go to stdout as JSON too)."""

    json: bool = False


mode = _Mode()


def json_mode(value: bool) -> bool:
    """``--json``'s callback: remember it for the error boundary."""
    if value:
        mode.json = True
    return value


def progress_enabled(con: Console) -> bool:
    """Bars and spinners only on a terminal (none as residue in logs or pipes); VLROUTER_PROGRESS=1/0 forces."""
    forced = os.environ.get("VLROUTER_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return con.is_terminal


class RichProgress:
    """Implements :class:`vlrouter.core.progress.Progress` with rich bars on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err_console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[object]:
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False,
                      disable=not progress_enabled(self.console)) as prog:
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


def _finite(data):
    """NaN/inf (not JSON) as null, recursively."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def print_json(data) -> None:
    """Valid JSON on stdout, always (``allow_nan=False``: NaN/inf become null)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def fail_json(err: BaseException, message: str, code: int) -> None:
    """Under ``--json``: the error as one JSON object on stdout (the one line still goes to stderr)."""
    out = {"error": {"type": type(err).__name__, "message": message, "exit_code": code}}
    for key in ("candidate_dir", "val_acc", "live_val_acc"):
        if getattr(err, key, None) is not None:
            out["error"][key] = getattr(err, key)
    if getattr(err, "candidate_dir", None) is not None:
        out["promoted"] = False
    print_json(out)
