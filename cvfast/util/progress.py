"""One look for every rich progress bar (conversion, training epochs, prediction, heatmaps): the floor of the house."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def bars_wanted() -> bool:
    """Whether progress bars may be drawn: on a terminal or in Jupyter, never into a file or a pipe (a log is no place for bar frames)."""
    console = Console(stderr=True)
    return console.is_terminal or console.is_jupyter


def progress_bar(enabled: bool = True) -> Progress:
    """A transient rich Progress (description, bar, n of N, elapsed, ETA) on stderr; draws nothing when enabled=False or when
    stderr is a file or a pipe."""
    console = Console(stderr=True)
    enabled = enabled and bars_wanted()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), transient=True, disable=not enabled, console=console)
