"""Progress shown when the output is not a terminal (a log file): plain lines, not a bar drawn at the end."""

from __future__ import annotations

import io

from rich.console import Console

from oilleak.progress import PlainProgress, progress_bar


def file_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out  # a file: not a terminal


def test_plain_lines_for_the_first_step_the_last_and_when_due():
    console, out = file_console()
    lines = PlainProgress(console, 5, "predicting", every_s=3600)
    for done in range(1, 6):
        lines.update(done)
    printed = out.getvalue().splitlines()
    assert len(printed) == 2
    assert printed[0].startswith("predicting 1/5 (20%), 0:00 elapsed, ~0:00 left")
    assert printed[1].startswith("predicting 5/5 (100%)") and "left" not in printed[1]

    console, out = file_console()
    lines = PlainProgress(console, 3, "evaluating", every_s=0)  # every update is due
    for done in range(1, 4):
        lines.update(done)
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        "evaluating 1/3 (33%)", "evaluating 2/3 (67%)", "evaluating 3/3 (100%)"]


def test_progress_bar_writes_lines_to_a_file_and_nothing_when_disabled():
    console, out = file_console()
    with progress_bar(True, 4, "drawing", console=console, every_s=3600) as advance:
        advance(1)
        assert out.getvalue().startswith("drawing 1/4 (25%)")  # at once, not at the end
        advance(2)
        advance(1)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["drawing 1/4", "drawing 4/4"]
    console, out = file_console()
    with progress_bar(False, 4, "drawing", console=console) as advance:
        advance(4)
    assert out.getvalue() == ""
