"""Benchmarks on a CUDA GPU, each against its baseline measured in the same run."""

import typer

from qtool.errors import QtoolError

app = typer.Typer(no_args_is_help=True)


@app.command("kernels")
def kernels() -> None:
    """Packed-weight matmul kernels vs fp16 cuBLAS."""
    raise QtoolError("`qtool bench kernels` is not implemented yet")
