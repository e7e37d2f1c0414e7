"""`qtool bench quantize` on CPU with the tiny shape: the command, its synthetic model cache and its
JSON report (the lead runs the 8b/70b shapes on the GPU)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qtool.cli.app import app


def test_bench_quantize_tiny_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["bench", "quantize", "--shape", "tiny", "--blocks", "2", "--methods", "rtn",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    assert rep["blocks_run"] == 2 and rep["blocks_full"] == 4
    (res,) = rep["results"]
    assert res["method"] == "rtn" and res["peak_rss_gb"] > 0 and res["quantize_s"] > 0
    # projected = fixed part + per-block time × full blocks
    fixed = res["wall_s"] - res["quantize_s"]
    assert abs(res["projected_full_s"] - (fixed + res["per_block_s"] * 4)) < 0.2
    assert (tmp_path / "cache" / "bench" / "llama-tiny-2blocks-seed0" / "model.safetensors.index.json").is_file()
    r = CliRunner().invoke(app, ["bench", "quantize", "--shape", "huge"])
    assert r.exit_code != 0
