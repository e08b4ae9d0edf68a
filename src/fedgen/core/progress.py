"""Progress of long work (training rounds, client steps, sampling): a live bar on a terminal, plain lines with
an ETA anywhere else (a pipe, a log file, CI), where a live bar would show only at the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console) -> Progress | PlainProgress:
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class _PlainTask:
    description: str
    total: int
    completed: int
    started: float
    first: int = field(init=False)  # completed when the task was added (a resumed run's rounds)
    said: float = field(init=False)

    def __post_init__(self) -> None:
        self.first, self.said = self.completed, self.started


class PlainProgress:
    """The part of rich's Progress that fedgen uses (add_task, advance, remove_task), as one plain line per task
    at most every `every_s` seconds and one when a task that has spoken ends: `rounds: 12/30 (40%), 0:02:10
    elapsed, ETA 0:03:15`. The ETA is the rate since the task was added applied to what is left."""

    def __init__(self, console: Console, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.console, self.every_s, self.clock = console, every_s, clock
        self.tasks: dict[int, _PlainTask] = {}
        self._next_id = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.tasks.clear()

    def add_task(self, description: str, total: int, completed: int = 0) -> int:
        self._next_id += 1
        self.tasks[self._next_id] = _PlainTask(description, int(total), int(completed), self.clock())
        return self._next_id

    def advance(self, task_id: int, advance: int = 1) -> None:
        t = self.tasks[task_id]
        t.completed += advance
        now = self.clock()
        if now - t.said >= self.every_s or (t.completed >= t.total and t.said > t.started):
            self._say(t, now)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def _say(self, t: _PlainTask, now: float) -> None:
        t.said = now
        elapsed = now - t.started
        done = t.completed - t.first
        if t.completed >= t.total:
            eta = "done"
        elif done > 0:
            eta = f"ETA {clock_text(elapsed / done * (t.total - t.completed))}"
        else:
            eta = "ETA unknown"
        pct = 100 * t.completed // max(t.total, 1)
        self.console.print(f"{t.description.strip()}: {t.completed}/{t.total} ({pct}%), {clock_text(elapsed)} "
                           f"elapsed, {eta}", highlight=False, markup=False)


@contextmanager
def task(progress: Progress | PlainProgress | None, description: str,
         total: int) -> Iterator[Callable[[int], None] | None]:
    """A bar for one piece of work, removed when it ends; yields `advance(k)`, or None without a Progress."""
    if progress is None:
        yield None
        return
    task_id = progress.add_task(description, total=total)
    try:
        yield lambda k=1: progress.advance(task_id, k)
    finally:
        progress.remove_task(task_id)
