"""The one rich progress bar look (training, evaluation, test, predict), and one that can be switched off
(tests, logs redirected to files)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


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
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; with ``enabled`` False it does nothing."""
    if not enabled:
        yield lambda n: None
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
