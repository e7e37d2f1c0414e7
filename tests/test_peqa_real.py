"""PEQA on the real default model (SmolLM2-135M-Instruct, W4 per channel, RTN as in PEQA):
a short run lowers the task's validation loss; the written Δs, applied in memory or swapped
on disk, reproduces that loss; swap / revert is bit-exact on the real checkpoint."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from qtool.artifact.checkpoint import load_checkpoint
from qtool.artifact.delta import read_delta
from qtool.artifact.scales import apply_delta
from qtool.data.tasks import load_task
from qtool.methods.peqa import finetune_checkpoint
from qtool.swap import restore_base_dir, swap_scales_dir
from qtool.train import TrainConfig
from qtool.train.data import tokenize_task
from qtool.train.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory):
    from qtool.pipeline import QuantizeConfig, quantize
    from qtool.quant.grid import QuantSpec

    out = tmp_path_factory.mktemp("real") / "smollm2-rtn-w4c"
    quantize(QuantizeConfig("smollm2-135m", out, "rtn", QuantSpec(4, None), quiet=True))
    return out


def test_peqa_lowers_validation_loss_on_real_model(w4_checkpoint, tmp_path):
    d = w4_checkpoint
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    # 12 steps × 2 × 64 tokens on bbc-news; lr 1e-4 so that a dozen steps move the scales
    cfg = TrainConfig(lr=1e-4, max_steps=12, batch_size=2, seqlen=64, eval_samples=24, eval_every=0,
                      device="cpu", quiet=True)
    out = tmp_path / "bbc-news.safetensors"
    res = finetune_checkpoint(d, "bbc-news", out, cfg)
    r = res.train
    assert r.final["loss"] < r.initial["loss"] - 0.02, (r.initial, r.final)
    n_scales = sum(m["out_features"] for m in load_checkpoint(d, verify=False).info["modules"].values())
    assert res.trainable == n_scales  # per channel: one Δs per output row of each Linear
    assert res.delta_bytes < 4 * n_scales + 64 * 1024  # fp32 values plus the header

    # the deployed scales (s0 + Δs rounded to fp16) give the validation loss the run reported
    ck = load_checkpoint(d)
    apply_delta(ck.model, out, ck.info)
    tt = tokenize_task(load_task("bbc-news"), ck.tokenizer, 64)
    m = evaluate(ck.model, tt, 8, torch.device("cpu"), 24)
    assert m["loss"] == pytest.approx(r.best["loss"], abs=2e-3)

    # swap / revert on the real checkpoint: bit-exact, fast
    t0 = time.perf_counter()
    swap_scales_dir(d, out)
    swapped = load_checkpoint(d)
    for name, layer in swapped.model.named_modules():
        if hasattr(layer, "qweight"):
            assert torch.equal(layer.scales, ck.model.get_submodule(name).scales)
    restore_base_dir(d)
    assert time.perf_counter() - t0 < 30
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()} == before
    assert read_delta(out).meta["qtool.task"] == "bbc-news"
