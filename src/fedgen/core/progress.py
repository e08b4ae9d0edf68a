"""Progress bars for long work (training rounds, client steps, sampling), on a rich console."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def task(progress: Progress | None, description: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A bar for one piece of work, removed when it ends; yields `advance(k)`, or None without a Progress."""
    if progress is None:
        yield None
        return
    task_id = progress.add_task(description, total=total)
    try:
        yield lambda k=1: progress.advance(task_id, k)
    finally:
        progress.remove_task(task_id)
