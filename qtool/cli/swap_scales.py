"""Swap a checkpoint's scales for a task's Δs file (PEQA), or restore the base scales."""

from pathlib import Path
from typing import Annotated

import typer

from qtool.errors import QtoolError


def swap_scales(model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory")]) -> None:
    raise QtoolError("`qtool swap-scales` is not implemented yet")
