"""The `qtool` Typer app: registers one module per command and maps errors to exit codes.

Exit codes: 0 success, 2 bad usage or input (QtoolError, Typer usage errors, a full disk),
1 unexpected failure (a one-line message; set QTOOL_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from qtool.errors import QtoolError

app = typer.Typer(
    name="qtool",
    help="Quantize a Hugging Face causal LM to packed 2/3/4/8-bit integers and fine-tune it per task.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("qtool")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        from qtool import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"qtool {_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="print the version and exit")] = False,
) -> None:
    """Quantize a Hugging Face causal LM to packed 2/3/4/8-bit integers and fine-tune it per task."""


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


def _is_click_error(e: BaseException) -> bool:
    """A click ClickException (UsageError, BadParameter, NoSuchOption, MissingParameter...).

    Recognised by its interface, not its class: typer >= 0.2x vendors click as `typer._click`,
    whose exceptions are not `click.exceptions.ClickException`, and older typer uses click itself."""
    return (isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "format_message", None))
            and callable(getattr(e, "show", None)))


def _one_line(e: BaseException) -> str:
    """click's message on one line, pointing at the command's --help for usage errors."""
    message = " ".join(str(e.format_message()).split())
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None)
    if path and getattr(e, "exit_code", None) == 2:
        return f"error: {message} (see `{path} --help`)"
    return f"error: {message}"


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
    except Exception as e:
        if _is_click_error(e):
            if type(e).__name__ == "NoArgsIsHelpError":  # `qtool` alone: the help is the message
                help_text = str(e.format_message())  # empty where Typer already printed it with rich
                if help_text.strip():
                    typer.echo(help_text, err=True)
            else:
                typer.echo(_one_line(e), err=True)
            sys.exit(e.exit_code)
        if os.environ.get("QTOOL_DEBUG"):
            raise
        typer.echo(f"unexpected failure: {type(e).__name__}: {e} (QTOOL_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
