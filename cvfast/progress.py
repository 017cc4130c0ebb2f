"""One look for every rich progress bar (conversion, training epochs, prediction, heatmaps): a leaf any layer may use."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool = True) -> Progress:
    """A transient rich Progress (description, bar, n of N, elapsed, ETA); enabled=False draws nothing."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), transient=True, disable=not enabled)
