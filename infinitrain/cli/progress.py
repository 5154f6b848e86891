"""Progress of a long evaluation: rich bars in a terminal, plain lines elsewhere.

Where stderr is a file (a SLURM log, CI), rich draws nothing, so an evaluation that runs for hours
would look hung; there, one line every few seconds says how far it is, how fast it goes and when
it will end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 5.0
"""Seconds between plain lines: often enough to see a job move, rarely enough to keep logs short."""


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, as rich's bars show time."""
    return str(timedelta(seconds=round(seconds)))


class PlainProgress:
    """Counts work towards ``total`` and prints one line at most every ``every_s`` seconds, and
    one when the work is done."""

    def __init__(self, console: Console, description: str, total: int, unit: str,
                 every_s: float = PLAIN_EVERY_S) -> None:
        self.console = console
        self.description = description
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self.finished = False
        self.started = self.printed = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.finished:
            return
        self.finished = self.done >= self.total
        if self.finished or now - self.printed >= self.every_s:
            self.printed = now
            self.console.print(self.line(now - self.started), markup=False, highlight=False)

    def line(self, elapsed: float) -> str:
        """``what: 42%  420/1,000 tokens  35 tokens/s  ETA 0:00:17``."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(self.total - self.done, 0)
        eta = format_duration(left / rate) if rate > 0 else "?"
        percent = 100 * self.done // self.total if self.total else 100  # 100% only when done
        return (f"{self.description}: {percent}%  {self.done:,}/{self.total:,} {self.unit}  "
                f"{rate:,.0f} {self.unit}/s  ETA {eta}")


@contextlib.contextmanager
def progress(console: Console, description: str, total: int,
             unit: str = "tokens") -> Iterator[Callable[[int], None]]:
    """An ``advance(n)`` for the evaluations' ``on_progress``: a transient rich bar where
    ``console`` is a terminal, plain lines on it otherwise."""
    if not console.is_terminal:
        yield PlainProgress(console, description, total, unit).advance
        return
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
