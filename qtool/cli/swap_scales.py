"""Swap a checkpoint's scales for a task's Δs (PEQA), or restore the base scales.

The integer codes are never rewritten: in place, the change is committed atomically; with
-o, the new directory hard-links the codes and holds only new scales.

Examples:
  qtool swap-scales smollm2-w4/ bbc-news.safetensors
  qtool swap-scales smollm2-w4/ rotten-tomatoes.safetensors -o smollm2-w4-rt/
  qtool swap-scales smollm2-w4/ --base
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o
from qtool.errors import QtoolError


def swap_scales(
    model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory")],
    delta: Annotated[Path | None, typer.Argument(help="task Δs file from `qtool finetune`")] = None,
    base: Annotated[bool, typer.Option("--base", help="restore the base scales instead")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write a new checkpoint directory "
                                                "instead of swapping in place")] = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from qtool.swap import restore_base_dir, swap_scales_dir

    if base == (delta is not None):
        raise QtoolError("give either a Δs file or --base")
    if (ckpt := o.checkpoint_dir(model_dir)) != model_dir and output is None:
        raise QtoolError(f"{model_dir} is not a qtool checkpoint; swap-scales writes the imported model with the "
                         "task's scales as a new one: give -o")
    model_dir = ckpt
    rep = (restore_base_dir(model_dir, output, overwrite) if base
           else swap_scales_dir(model_dir, delta, output, overwrite))
    what = "restored the base scales" if base else f"swapped in task {rep.task!r}"
    o.console(quiet).print(f"{rep.path}: {what} in {rep.seconds:.3f} s "
                           f"({rep.linked} files hard-linked, {rep.copied} copied)")
    o.write_json(json_out, {"path": str(rep.path), "task": rep.task, "seconds": rep.seconds,
                            "linked": rep.linked, "copied": rep.copied})
