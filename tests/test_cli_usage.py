"""The installed `qtool` console script, run as a user runs it: usage errors exit 2 with one line.

In-process tests (tests/cli_util.py) call `main()` with the click that the test imports; a
Typer that vendors its own click (typer._click) slipped past them. These start the real
entry point in subprocesses, all at once so the suite pays for one start-up, not eight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

QTOOL = Path(sys.executable).parent / "qtool"

# (name, args, exit code, a substring of the one stderr line (None: stderr empty), stdout check)
CASES = [
    ("unknown option", ["quantize", "--method", "rtn", "--bogus-option", "-o", "out"], 2, "--bogus-option", None),
    ("wrong type", ["quantize", "--method", "rtn", "--bits", "x", "-o", "out"], 2, "'--bits'", None),
    ("missing option", ["quantize", "--bits", "4", "-o", "out"], 2, "--method", None),
    ("missing argument", ["swap-scales"], 2, "MODEL_DIR", None),
    ("help", ["--help"], 0, None, "swap-scales"),
    ("version", ["--version"], 0, None, f"qtool {metadata.version('qtool')}\n"),
    ("bad value", ["quantize", "--method", "rtn", "--bits", "5", "-o", "out", "-q"], 2, "bits must be one of", None),
    ("missing model", ["quantize", "--method", "rtn", "--model", "/nonexistent/model", "-o", "out", "-q"], 2,
     "not found", None),
]


@pytest.mark.skipif(not QTOOL.exists(), reason="qtool is not installed next to this Python (pip install -e .)")
def test_installed_script_usage_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QTOOL_DEBUG"} | {"QTOOL_CACHE": str(tmp_path / "cache")}
    procs = {}
    for name, args, *_ in CASES:
        cwd = tmp_path / name.replace(" ", "-")
        cwd.mkdir()
        procs[name] = (cwd, subprocess.Popen([str(QTOOL), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
    for name, _args, code, err_part, out_part in CASES:
        cwd, p = procs[name]
        out, err = p.communicate(timeout=120)
        assert p.returncode == code, (name, p.returncode, err)
        if err_part is None:
            assert err == "", (name, err)
        else:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
            assert err_part.lower() in lines[0].lower(), (name, err)
            assert "unexpected failure" not in err and "Traceback" not in err
        if out_part is not None:
            assert out_part in out if not out_part.endswith("\n") else out == out_part, (name, out)
        assert list(cwd.iterdir()) == [], (name, "wrote", list(cwd.iterdir()))
    assert not (tmp_path / "cache").exists()
