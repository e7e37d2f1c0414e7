"""Options shared by several commands, as Annotated aliases, and their conversions."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qtool.errors import QtoolError
from qtool.models.builtin import DEFAULT_MODEL

if TYPE_CHECKING:  # torch and rich load when a command runs, so `qtool --help` starts fast
    import torch
    from rich.console import Console

Model = Annotated[str, typer.Option("--model", "-m", help="HF model dir, .gguf file, or built-in name "
                                    "(smollm2-135m, gemma3-270m)")]
DEFAULT = DEFAULT_MODEL
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
Dtype = Annotated[str, typer.Option("--dtype", help="compute dtype: float32 | bfloat16 | float16 (auto: "
                                    "bfloat16 on CUDA, float32 on CPU)")]
Seed = Annotated[int, typer.Option("--seed", help="random seed")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="also write machine-readable results here "
                                              "('-' for stdout)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # accepted name -> torch attribute


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError("--device cuda asked for, but no CUDA GPU is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise QtoolError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise QtoolError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, DTYPES[name])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def console(quiet: bool = False) -> Console:
    from rich.console import Console

    return Console(quiet=quiet, highlight=False)


def write_json(target: Path | None, payload: Any) -> None:
    if target is None:
        return
    text = json.dumps(payload, indent=2, default=str)
    if str(target) == "-":
        sys.stdout.write(text + "\n")
    else:
        from qtool.artifact.atomic import atomic_file

        with atomic_file(Path(target)) as tmp:
            tmp.write_text(text + "\n")


def checkpoint_dir(path: Path | str) -> Path:
    """The qtool checkpoint a model path names: GPTQ, AWQ and compressed-tensors checkpoints are
    imported losslessly (once, cached; qtool.interop.community); anything else is returned as given."""
    from qtool.interop.community import as_checkpoint_dir

    return as_checkpoint_dir(Path(path))


def parse_nf4_block(value: str) -> int:
    from qtool.quant.nf4 import BLOCK_SIZES

    try:
        block = int(value)
    except ValueError:
        block = None
    if block not in BLOCK_SIZES:
        raise QtoolError(f"--group-size for nf4 is the absmax block: one of {BLOCK_SIZES}, got {value!r}")
    return block


def parse_group_size(value: str) -> int | None:
    if value in ("channel", "-1", "0", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise QtoolError(f"--group-size must be 32, 64, 128 or 'channel', got {value!r}") from None
