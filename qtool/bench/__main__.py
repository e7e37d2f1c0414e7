"""`python -m qtool.bench kernels|decode|train`: the bench sub-app without the rest of the CLI."""

import sys

import typer

from qtool.cli.bench import app
from qtool.errors import QtoolError

try:
    app(standalone_mode=False)
except QtoolError as e:
    typer.echo(f"error: {e}", err=True)
    sys.exit(2)
