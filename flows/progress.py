"""Rich progress bars for terminal runs (``umg build``, the build flow started from a shell)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console or Console(stderr=True),
    )


@contextmanager
def shard_progress(total: int, completed: int = 0) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``; draws a shard bar on stderr when it is a terminal, else does nothing."""
    if not sys.stderr.isatty():
        yield lambda: None
        return
    with progress_bar() as bar:
        task = bar.add_task("shards", total=total, completed=completed)
        yield lambda: bar.advance(task)
