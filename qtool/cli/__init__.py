"""Thin Typer layer: parse -> config -> library call. One module per command."""
