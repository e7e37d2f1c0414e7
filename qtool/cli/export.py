"""Write a checkpoint in a format other serving stacks load: compressed-tensors (vLLM, transformers),
GPTQ (gptq_v2; vLLM, GPTQModel) or bitsandbytes NF4 (transformers + bitsandbytes). docs/interop.md.

Examples:
  qtool export smollm2-w4g64/ --format compressed-tensors -o smollm2-w4g64-ct/
  qtool export smollm2-w4g64/ --format compressed-tensors --delta bbc-news.safetensors -o bbc-news-ct/
  qtool export smollm2-w4g128/ --format gptq -o smollm2-w4g128-gptq/
  qtool export smollm2-nf4/ --format bnb-nf4 --adapter bbc-topic-qlora/ -o smollm2-nf4-bnb/
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o


def export(
    model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory (or a GPTQ, AWQ, "
                                              "compressed-tensors one)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="compressed-tensors | gptq | bnb-nf4")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model directory")],
    delta: Annotated[Path | None, typer.Option(help="export with this task's PEQA scales (Δs file)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="copy this LoRA adapter dir beside the model, as "
                                                 "OUTPUT/adapter/ (checked against vLLM's LoRA loader)")] = None,
    gptq_v1: Annotated[bool, typer.Option("--gptq-v1", help="gptq: write the v1 zero-points (z − 1) instead "
                                          "of gptq_v2")] = False,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from qtool.interop.export import export_checkpoint

    rep = export_checkpoint(o.checkpoint_dir(model_dir), fmt, output, delta, adapter, overwrite, gptq_v1)
    con = o.console(quiet)
    task = f" with task {rep.task!r}" if rep.task else ""
    con.print(f"wrote {rep.path}/: {rep.layers} quantized layers as {rep.format}{task}"
              f"{' + adapter/' if rep.adapter else ''} in {rep.seconds:.1f} s; dense: {', '.join(rep.dense) or '-'}")
    for r in rep.runtimes:
        con.print(f"  loads in: {r}")
    o.write_json(json_out, {"path": str(rep.path), "format": rep.format, "layers": rep.layers, "dense": rep.dense,
                            "task": rep.task, "adapter": rep.adapter, "runtimes": rep.runtimes,
                            "seconds": rep.seconds})
