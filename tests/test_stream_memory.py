"""Streaming quantization keeps host memory to one block: a ≥ 3 GiB bf16 model is quantized in a
subprocess whose peak RSS must stay under 1.5 GB (the model in fp32, as qtool loaded it before
streaming, would be 6 GB; in bf16, 3 GB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.memory

LIMIT_GB = 1.5
# Few wide blocks (122 MB of bf16 each): the peak is one block, whatever their number.
SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 27, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 256}

# Runs the CLI in a fresh interpreter and reports that interpreter's own peak RSS (ru_maxrss of a
# process that ran only the command: the test process's RUSAGE_CHILDREN would also count every other
# test's subprocesses). One process, so a timeout kills all of it.
RUNNER = """
import resource, sys
from qtool.cli.app import main
sys.argv = ["qtool", *sys.argv[1:]]
try:
    main()
    rc = 0
except SystemExit as e:
    rc = e.code or 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, rc)
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    from qtool.models.synthetic import llama_config, write_model

    out = tmp_path_factory.mktemp("stream") / "big"
    return write_model(out, llama_config(**SHAPE))


def run_limited(*args) -> tuple[float, int]:
    # A user's environment, not the test run's (tests/kernels/conftest.py sets TRITON_INTERPRET,
    # other tests knobs of their own), and a working directory outside the repository.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "QTOOL_CACHE", "PYTHONPATH", "TMPDIR") if k in os.environ}
    res = subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], capture_output=True, text=True,
                         timeout=1200, env=env, cwd=tempfile.gettempdir())
    peak, rc = res.stdout.split()[-2:]
    assert int(rc) == 0, res.stderr[-2000:]
    return float(peak), int(rc)


def test_synthetic_model_is_big_enough(big_model):
    size = sum(f.stat().st_size for f in big_model.glob("*.safetensors"))
    assert size >= 3 * 1024**3, size


@pytest.mark.parametrize("method", ["rtn"])
def test_quantize_streams_under_memory_limit(big_model, tmp_path, method):
    out = tmp_path / method
    peak, _ = run_limited("quantize", "--method", method, "--model", big_model, "-o", out, "-q",
                          "--calib-n", "2", "--calib-seqlen", "16")
    info = json.loads((out / "qtool.json").read_text())
    assert len(info["modules"]) == 7 * SHAPE["num_hidden_layers"]  # every Linear of every block
    size = sum(f.stat().st_size for f in big_model.glob("*.safetensors")) / 1e9
    print(f"{method}: peak RSS {peak:.3f} GB for {size:.2f} GB of bf16 shards")
    assert peak < LIMIT_GB, f"{method}: peak RSS {peak:.2f} GB ≥ {LIMIT_GB} GB"
