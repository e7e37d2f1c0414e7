"""`qtool bench train` end to end on a tiny model on the CPU (a smoke run: speed is measured
on the GPU, never asserted here): every variant trains the parameters it should, in one report
with the bf16-LoRA baseline."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qtool.cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bench_train_reports_every_variant_against_the_baseline(tiny_model_dir):
    r = invoke("bench", "train", tiny_model_dir, "--device", "cpu", "--batch", 2, "--seqlen", 16, "--steps", 2,
               "--warmup", 1, "--rank", 4, "--bits", 3, "--group-size", 32, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    rows = {row["variant"]: row for row in rep["rows"]}
    assert list(rows) == ["bf16-lora", "peqa", "lora", "qlora"]
    hidden, inter, layers = 96, 160, 2  # tests/tiny_models.py
    lin_out = [hidden, 48, 48, hidden, inter, inter, hidden]  # q k v o gate up down (2 of 4 heads for k, v)
    lin_in = [hidden, hidden, hidden, hidden, hidden, hidden, inter]
    lora = layers * sum(4 * (i + o) for i, o in zip(lin_in, lin_out, strict=True))
    groups = [(i + 31) // 32 for i in lin_in]
    assert rows["peqa"]["trainable"] == layers * sum(o * g for o, g in zip(lin_out, groups, strict=True))
    assert rows["lora"]["trainable"] == rows["qlora"]["trainable"] == rows["bf16-lora"]["trainable"] == lora
    assert rows["bf16-lora"]["vs_bf16_lora"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["peak_gb"] is None for row in rows.values())


def test_bench_train_refusals(tiny_model_dir):
    r = invoke("bench", "train", tiny_model_dir, "--device", "cpu", "--variants", "bf16-lora,full")
    assert "unknown variant 'full'" in str(r.exception)
    r = invoke("bench", "train", tiny_model_dir, "--device", "cpu", "--steps", 0)
    assert "--steps must be ≥ 1" in str(r.exception)
