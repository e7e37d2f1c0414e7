"""Fine-tune a quantized checkpoint on a task (PEQA scales, or LoRA)."""

from pathlib import Path
from typing import Annotated

import typer

from qtool.errors import QtoolError


def finetune(model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory")]) -> None:
    raise QtoolError("`qtool finetune` is not implemented yet")
