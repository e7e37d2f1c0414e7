"""One rich progress bar style for every loop over blocks, layers and batches."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class _Progress(Progress):
    def add_task(self, description: str, **kw) -> TaskID:  # type: ignore[override]
        kw.setdefault("info", "")  # the trailing column shows task.fields["info"]
        return super().add_task(description, **kw)


def progress_bar(quiet: bool = False) -> Progress:
    """A context manager; `info=` on add_task/update shows loss, tokens/s and the like."""
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                     console=Console(file=sys.stderr), disable=quiet)
