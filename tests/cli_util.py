"""Run the qtool CLI in-process and capture exit code and output."""

from __future__ import annotations

import sys

import pytest


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from qtool.cli.app import main

    old = sys.argv
    sys.argv = ["qtool", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
