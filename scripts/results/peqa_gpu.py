"""PEQA on the GPU: throughput/memory (bench) and a learning-rate sweep (sweep). Writes $OUT/*.json.

bench: SmolLM2-135M's architecture with random weights (speed does not depend on the values),
       W4 per-channel RTN, bbc-news-like LM windows of 1024 × batch 8, bf16 autocast.
sweep: the real SmolLM2-135M-Instruct, W4 and W3 per-channel RTN (PEQA's setting), bbc-news,
       seq 512 × batch 8, 150 steps per lr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.time()
SMOKE = os.environ.get("SMOKE") == "1"  # CPU dry run with tiny sizes, to catch mistakes before a GPU call
DEV = "cpu" if SMOKE else "cuda"
SEQ, NEVAL, STEPS = (64, 4, 2) if SMOKE else (512, 64, 150)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def info_of(model, bits):
    from qtool.artifact.checkpoint import base_fingerprint, module_entry
    from qtool.nn.replace import quant_linears

    layers = quant_linears(model)
    return {"bits": bits, "group_size": None, "modules": {n: module_entry(m) for n, m in layers.items()},
            "fingerprint": base_fingerprint(model)}


def synthetic(n_train, n_val, seqlen, vocab, seed=0):
    from qtool.data.tasks import Task
    from qtool.train.data import Encoded, TokenizedTask

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_train + n_val, seqlen), generator=g).tolist()
    enc = [Encoded(r, r) for r in ids]
    return TokenizedTask(Task("synthetic", "lm", [], []), enc[:n_train], enc[n_train:], None, None, 0)


def check_grad_gpu():
    """ScaleLinearFunction vs autograd through the dense weight, bf16 on the GPU."""
    from qtool.nn.qlinear import QuantLinear
    from qtool.nn.scale_grad import ScaleLinearFunction
    from qtool.quant.grid import QuantSpec, dequantize, rtn

    out = {}
    for N, K, g in ((1536, 576, None), (576, 1536, 128), (320, 576, 128)):
        if SMOKE:
            N = 64
        W = torch.randn(N, K, device=DEV)
        layer = QuantLinear.from_quantized(rtn(W, QuantSpec(4, g)), 4, g, None).to(DEV)
        delta = (0.01 * torch.randn(layer.scales.shape, device=DEV)).requires_grad_(True)
        x = torch.randn(64 if SMOKE else 4096, K, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y = ScaleLinearFunction.apply(x, delta, layer.qweight, layer.scales, layer.zeros, None, 4, g, "auto")
        dy = torch.randn_like(y)
        y.backward(dy)
        d2 = delta.detach().double().requires_grad_(True)
        x2 = x.detach().double().requires_grad_(True)
        Wd = dequantize(layer.codes(), layer.scales.double() + d2, layer.zeros, g)
        y2 = x2 @ Wd.T
        y2.backward(dy.double())
        rel = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())  # noqa: E731
        out[f"{N}x{K}g{g}"] = {"y": rel(y, y2), "dx": rel(x.grad, x2.grad), "ds": rel(delta.grad, d2.grad)}
    log("grad check (bf16 vs fp64):", out)
    return out


def bench():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.methods import quantize_model
    from qtool.methods.peqa import remove_scale_deltas, trainable_scales
    from qtool.nn.replace import quant_linears
    from qtool.quant.grid import QuantSpec
    from qtool.train import TrainConfig, train

    results = {"device": torch.cuda.get_device_name() if not SMOKE else "cpu", "torch": torch.__version__,
               "grad_check": check_grad_gpu()}
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=2 if SMOKE else 30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEV)
    quantize_model(model, QuantSpec(4, None), "rtn", quiet=True, device=torch.device(DEV))
    model.to(DEV)
    info = info_of(model, 4)
    tt = synthetic(8 * 16, 8, 64 if SMOKE else 1024, 49152)
    variants = [
        ("torch path, bf16 autocast", dict(), False, False),
        ("torch path, bf16 autocast, grad-checkpoint", dict(grad_checkpoint=True), False, False),
        ("frozen params in bf16, qtool_kernels", dict(), True, True),
        ("frozen params in bf16, torch path", dict(), True, False),
    ]
    rows = []
    for name, kw, bf16_frozen, kernels in variants:
        if bf16_frozen:
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        for m in quant_linears(model).values():
            m.use_kernels = kernels
        try:
            for steps in (1, 2) if SMOKE else (3, 12):  # a warm-up run, then the measured one
                params = trainable_scales(model, info)
                if not SMOKE:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                tc = TrainConfig(lr=1e-4, max_steps=steps, batch_size=8, seqlen=1024, eval_samples=8, quiet=True,
                                 device=DEV, **kw)
                res = train(model, None, tt, params, tc)
                remove_scale_deltas(model)
            reserved = 0 if SMOKE else torch.cuda.max_memory_reserved() / 1e9
            row = {"variant": name, "tokens_per_s": res.tokens_per_s, "peak_gb": (res.peak_memory_bytes or 0) / 1e9,
                   "peak_reserved_gb": reserved, "steps": res.steps,
                   "tokens": res.tokens, "seconds": res.train_seconds, "final_loss": res.final["loss"]}
        except Exception as e:  # report and go on to the next variant
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:500]}
            remove_scale_deltas(model)
        log(row)
        rows.append(row)
        if not SMOKE:
            torch.cuda.reset_peak_memory_stats()
    results["rows"] = rows
    (OUT / "peqa_bench.json").write_text(json.dumps(results, indent=1))


def sweep(budget_s: float):
    from qtool.data.tasks import load_task
    from qtool.methods import quantize_model
    from qtool.methods.peqa import remove_scale_deltas, trainable_scales
    from qtool.models.load import load_model
    from qtool.quant.grid import QuantSpec
    from qtool.train import TrainConfig, train
    from qtool.train.data import tokenize_task
    from qtool.train.evaluate import evaluate

    res = {"device": (torch.cuda.get_device_name() if not SMOKE else 'cpu'), "runs": []}
    model, tok, _ = load_model("smollm2-135m")
    log("model loaded")
    tt = tokenize_task(load_task("bbc-news"), tok, SEQ)
    model.to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        res["fp"] = evaluate(model, tt, 16, torch.device(DEV), NEVAL)
    log("fp", res["fp"])
    lrs = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    for bits in (4, 3):
        model, _, _ = load_model("smollm2-135m")
        quantize_model(model, QuantSpec(bits, None), "rtn", quiet=True, device=torch.device(DEV))
        model.to(DEV)
        info = info_of(model, bits)
        for lr in lrs[:1] if SMOKE else lrs:
            if time.time() - T0 > budget_s:
                log("time budget reached; skipping", bits, lr)
                continue
            params = trainable_scales(model, info)
            tc = TrainConfig(lr=lr, max_steps=STEPS, batch_size=8, seqlen=SEQ, eval_every=STEPS // 3,
                             eval_samples=NEVAL, quiet=True, keep="last", device=DEV)
            r = train(model, tok, tt, params, tc)
            remove_scale_deltas(model)
            row = {"bits": bits, "lr": lr, "initial": r.initial["loss"], "final": r.final["loss"],
                   "history": [(h["step"], h["loss"]) for h in r.history], "tokens_per_s": r.tokens_per_s,
                   "peak_gb": (r.peak_memory_bytes or 0) / 1e9}
            log(row)
            res["runs"].append(row)
            (OUT / "peqa_sweep.json").write_text(json.dumps(res, indent=1))
    # a classification task at two lrs (W4): accuracy by label log-likelihood
    if time.time() - T0 < budget_s:
        model, _, _ = load_model("smollm2-135m")
        quantize_model(model, QuantSpec(4, None), "rtn", quiet=True, device=torch.device(DEV))
        model.to(DEV)
        info = info_of(model, 4)
        rt = tokenize_task(load_task("rotten-tomatoes"), tok, 128)
        for lr in (1e-4, 1e-3):
            params = trainable_scales(model, info)
            tc = TrainConfig(lr=lr, max_steps=STEPS, batch_size=16, seqlen=128, eval_every=STEPS // 2,
                             eval_samples=NEVAL * 6, quiet=True, keep="last", device=DEV)
            r = train(model, tok, rt, params, tc)
            remove_scale_deltas(model)
            row = {"task": "rotten-tomatoes", "bits": 4, "lr": lr, "history": r.history}
            log(row)
            res["runs"].append(row)
    (OUT / "peqa_sweep.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "bench":
        bench()
    else:
        sweep(float(sys.argv[2]) if len(sys.argv) > 2 else 400)
