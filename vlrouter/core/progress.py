"""Progress reporting without printing: the library reports, the CLI renders rich bars.

Library functions take ``progress: Progress | None`` and use::

    with progress_or_null(progress).task("embedding", total=n) as t:
        ...; t.advance(k)
    progress.log("embedded 12 new, reused 88")   # a one-line status message

The CLI passes its rich renderer (``RichProgress`` in ``cli/ui.py``); tests pass :class:`RecordingProgress`
or nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class TaskHandle(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None): ...  # context manager -> TaskHandle

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NullProgress:
    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[_NullTask]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


class RecordingProgress:
    """Keeps what was reported (tests assert on it)."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None, int]] = []
        self.messages: list[str] = []

    @contextmanager
    def task(self, description: str, total: int | None = None):
        rec = [0]

        class _T:
            def advance(self, n: int = 1) -> None:
                rec[0] += n

        try:
            yield _T()
        finally:
            self.tasks.append((description, total, rec[0]))

    def log(self, message: str) -> None:
        self.messages.append(message)


def progress_or_null(progress: Progress | None) -> Progress:
    return progress if progress is not None else NullProgress()
