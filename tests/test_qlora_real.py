"""QLoRA on the real default model (SmolLM2-135M-Instruct): NF4 + double quantization, LoRA on
every block linear, a few steps on the CPU lower the task's validation loss; the written
PEFT-format adapter, applied by `eval --adapter`'s code path, reproduces the kept loss."""

from __future__ import annotations

import pytest
import torch

from qtool.artifact.adapter import read_adapter
from qtool.artifact.checkpoint import load_checkpoint
from qtool.data.tasks import load_task
from qtool.methods.lora import LoraOptions, attach_adapter, finetune_checkpoint
from qtool.train import TrainConfig
from qtool.train.data import tokenize_task
from qtool.train.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    from qtool.pipeline import QuantizeConfig, quantize
    from qtool.quant.grid import QuantSpec

    out = tmp_path_factory.mktemp("real") / "smollm2-nf4"
    quantize(QuantizeConfig("smollm2-135m", out, "nf4", QuantSpec(4, 64), quiet=True))
    return out


def test_qlora_lowers_validation_loss_on_real_model(nf4_checkpoint, tmp_path):
    # QLoRA's recipe (r 64, α 16, dropout 0.05, constant lr, clip 0.3) at a CPU-sized scale;
    # lr 1e-3 instead of 2e-4 so that 8 steps move the adapter measurably.
    cfg = TrainConfig(lr=1e-3, max_steps=8, batch_size=2, seqlen=64, eval_samples=8, eval_every=0,
                      warmup_ratio=0.0, schedule="constant", device="cpu", quiet=True)
    out = tmp_path / "bbc-news-qlora"
    res = finetune_checkpoint(nf4_checkpoint, "qlora", "bbc-news", out, cfg, LoraOptions())
    r = res.train
    assert r.final["loss"] < r.initial["loss"] - 0.02, (r.initial, r.final)
    ad = read_adapter(out)
    assert len(ad.tensors) == 30 * 7 and ad.spec.rank == 64  # every linear of the 30 blocks
    assert res.trainable == sum(t.numel() for p in ad.tensors.values() for t in p.values())

    ck = load_checkpoint(nf4_checkpoint)
    attach_adapter(ck.model, out, ck.info["fingerprint"], dropout=0.0)
    tt = tokenize_task(load_task("bbc-news"), ck.tokenizer, 64)
    m = evaluate(ck.model, tt, 8, torch.device("cpu"), 8)
    assert m["loss"] == pytest.approx(r.best["loss"], abs=2e-3)
