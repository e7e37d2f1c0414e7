"""`qtool finetune` end to end on a tiny checkpoint: the Alpaca example of the design card,
the delta artifact's metadata, --resume, and the refusals (NF4-like modules, bad data)."""

from __future__ import annotations

import json

import pytest
from peqa_util import saved_tiny_checkpoint
from safetensors import safe_open
from typer.testing import CliRunner

from qtool.artifact.delta import check_delta, read_delta
from qtool.cli.app import app
from qtool.data.tasks import rotten_tomatoes_reviews
from qtool.errors import QtoolError


def alpaca_file(path, n: int = 40):
    reviews = rotten_tomatoes_reviews("validation")[:n]
    recs = [{"instruction": "Classify the sentiment of this movie review.", "input": r.text[:120],
             "output": r.label} for r in reviews]
    path.write_text(json.dumps(recs, indent=1))
    return path


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ck"
    return d, saved_tiny_checkpoint(d, 4, 32)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_finetune_alpaca_cli(ckpt, tmp_path):
    d, info = ckpt
    data = alpaca_file(tmp_path / "reviews.json")
    out = tmp_path / "alpaca.safetensors"
    common = ["finetune", d, "--task", "alpaca", "--data", data, "-o", out, "--max-steps", 6,
              "--batch-size", 4, "--seqlen", 384, "--lr", 5e-3, "--eval-every", 3, "--device", "cpu"]
    r = invoke(*common, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"wrote {out}" in text and "KiB" in text and "validation loss:" in text
    delta = read_delta(out)
    check_delta(delta, info)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["qtool.kind"] == "scale-delta"
    assert meta["qtool.base_fingerprint"] == info["fingerprint"]
    assert meta["qtool.bits"] == "4" and meta["qtool.group_size"] == "32"
    assert meta["qtool.task"] == "alpaca" and meta["qtool.lr"] == "0.005" and meta["qtool.seed"] == "0"
    assert meta["qtool.metric_name"] == "loss" and float(meta["qtool.metric"]) > 0
    assert all(isinstance(v, str) for v in meta.values())
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["kept"]["loss"] <= res["initial"]["loss"]
    assert [h["step"] for h in res["history"]] == [0, 3, 6]
    assert (tmp_path / "alpaca.train" / "state.safetensors").is_file()  # periodic training state
    # --resume after completion continues from step 6 of 6: nothing left, same result
    r = invoke(*common, "-q", "--resume", "--overwrite")
    assert r.exit_code == 0, r.output


def test_finetune_refusals(ckpt, tmp_path):
    d, info = ckpt
    r = invoke("finetune", d, "--method", "sft", "--task", "bbc-news")
    assert "unknown --method" in str(r.exception)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    r = invoke("finetune", d, "--task", "alpaca", "--data", bad)
    assert isinstance(r.exception, QtoolError) and "bad.jsonl:2" in str(r.exception)
    # a checkpoint whose modules are not integer-grid (e.g. NF4 later) is refused before loading
    manifest = json.loads((d / "qtool.json").read_text())
    name = next(iter(manifest["modules"]))
    entry = manifest["modules"][name]
    manifest["modules"][name] = {"kind": "nf4", "block_size": 64, "double_quant": True, "bias": entry["bias"],
                                 "in_features": entry["in_features"], "out_features": entry["out_features"]}
    (d / "qtool.json").write_text(json.dumps(manifest))
    good = alpaca_file(tmp_path / "ok.json", 12)
    r = invoke("finetune", d, "--task", "alpaca", "--data", good, "-o", tmp_path / "x.safetensors")
    assert isinstance(r.exception, QtoolError) and "integer-grid scales only" in str(r.exception)
    assert name in str(r.exception)


def test_finetune_and_swap_help_show_examples():
    for cmd in ("finetune", "swap-scales"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and f"qtool {cmd}" in r.output
