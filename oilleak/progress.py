"""Progress: the one rich progress bar look (training, evaluation, test, predict) on a terminal, plain lines
when the output goes to a file (CI, nohup, a scheduler), where a live bar would only appear once, at the end;
and none at all when switched off (tests)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich import get_console

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

PLAIN_EVERY_S = 30.0  # a log file gains a progress line at most this often, whatever the step time


def make_progress(*, console: Console | None = None, disable: bool = False, status: bool = False) -> Progress:
    """A rich ``Progress``: description, bar, done / total, elapsed, ETA. ``status`` adds a free-text column
    filled from each task's ``status`` field (training's lr and loss)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    return Progress(*columns, console=console, disable=disable)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str, console: Console | None = None,
                 every_s: float = PLAIN_EVERY_S) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; with ``enabled`` False it does nothing. ``console`` (default: rich's) decides:
    a live bar on a terminal, else :class:`PlainProgress` lines every ``every_s`` seconds."""
    if not enabled:
        yield lambda n: None
        return
    console = console or get_console()
    if not console.is_terminal:
        lines = PlainProgress(console, total, description, every_s=every_s)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            lines.update(done)

        yield advance
        return
    with make_progress(console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """``update(completed)`` prints ``DESCRIPTION completed/total (pct%), elapsed, ~left`` for the first
    update, then when ``every_s`` seconds have passed since the last line, and for the last step."""

    def __init__(self, console: Console, total: int, description: str, *, start: int = 0,
                 every_s: float = PLAIN_EVERY_S) -> None:
        self.console = console
        self.total = total
        self.description = description
        self.start = start  # steps already done before this run (a resumed training)
        self.every_s = every_s
        self._began = time.monotonic()
        self._last_line: float | None = None

    def touch(self) -> None:
        """Something else just printed this step's progress: the next line is due ``every_s`` from now."""
        self._last_line = time.monotonic()

    def update(self, completed: int, status: str = "") -> None:
        now = time.monotonic()
        if not (self._last_line is None or now - self._last_line >= self.every_s or completed >= self.total):
            return
        self._last_line = now
        elapsed = now - self._began
        done = completed - self.start
        left = f", ~{_duration(elapsed / done * (self.total - completed))} left" if 0 < done < self.total - self.start else ""
        percent = 100 * completed / self.total if self.total else 100.0
        self.console.print(
            f"{self.description} {completed}/{self.total} ({percent:.0f}%), {_duration(elapsed)} elapsed{left}"
            + (f"  {status}" if status else ""),
            markup=False, highlight=False, soft_wrap=True,
        )
