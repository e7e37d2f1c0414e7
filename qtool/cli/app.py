"""The `qtool` Typer app: registers one module per command and maps errors to exit codes.

Exit codes: 0 success, 2 bad usage or input (QtoolError, Typer usage errors),
1 unexpected failure (a one-line message; set QTOOL_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys

import typer

from qtool.errors import QtoolError

app = typer.Typer(
    name="qtool",
    help="Quantize a Hugging Face causal LM to packed 2/3/4/8-bit integers and fine-tune it per task.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from qtool.cli import bench, calibrate, evaluate, export, finetune, quantize, swap_scales

    app.command("calibrate", help=calibrate.__doc__)(calibrate.calibrate)
    app.command("quantize", help=quantize.__doc__)(quantize.quantize)
    app.command("eval", help=evaluate.__doc__)(evaluate.evaluate)
    app.command("finetune", help=finetune.__doc__)(finetune.finetune)
    app.command("swap-scales", help=swap_scales.__doc__)(swap_scales.swap_scales)
    app.command("export", help=export.__doc__)(export.export)
    app.add_typer(bench.app, name="bench", help=bench.__doc__)


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except QtoolError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("QTOOL_DEBUG"):
            raise
        typer.echo(f"unexpected failure: {type(e).__name__}: {e} (QTOOL_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
