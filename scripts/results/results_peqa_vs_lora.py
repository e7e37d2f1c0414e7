"""PEQA vs LoRA on the same integer base vs full fine-tuning of the fp model (docs/results.md).

Same task, batches (seed), steps, sequence length and bf16 autocast for every run; each run
reports the held-out (validation split) metric of its kept parameters, trainable parameter
count, artifact size, peak GPU memory and training tokens/s, all from this one process.

Usage: python scripts/results/results_peqa_vs_lora.py OUTDIR [--model smollm2-135m] [--task bbc-news]
       [--bits 4 3] [--steps 150] [--seqlen 1024] [--batch-size 8] [--full-lr 5e-5] [--gptq]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qtool.artifact.checkpoint import load_checkpoint
from qtool.data.tasks import load_task
from qtool.methods.lora import LoraOptions, finetune_lora
from qtool.methods.peqa import default_lr, finetune_peqa
from qtool.models.load import load_model
from qtool.pipeline import QuantizeConfig, quantize
from qtool.quant.grid import QuantSpec
from qtool.train import TrainConfig, train
from qtool.train.data import tokenize_task


def row(name: str, r, trainable: int, artifact_bytes: int | None, extra: dict | None = None) -> dict:
    return {"run": name, "trainable": trainable, "artifact_bytes": artifact_bytes, "initial": r.initial,
            "kept": r.best, "final": r.final, "tokens_per_s": r.tokens_per_s,
            "peak_gb": (r.peak_memory_bytes or 0) / 1e9, "train_seconds": r.train_seconds, **(extra or {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="bbc-news")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ-initialised bases (PEQA and LoRA)")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": {k: str(v) for k, v in
                                                                                    vars(args).items()}, "runs": []}
    dump = args.out / "peqa_vs_lora.json"

    def cfg(lr: float, **kw) -> TrainConfig:
        return TrainConfig(lr=lr, max_steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                           eval_every=0, eval_samples=args.eval_samples, quiet=True, **kw)

    def log(r: dict) -> None:
        res["runs"].append(r)
        dump.write_text(json.dumps(res, indent=1, default=str))
        k = r["kept"]
        m = "accuracy" if "accuracy" in k else "loss"
        print(f"{r['run']:<28} {m} {r['initial'][m]:.4f} -> {k[m]:.4f}  trainable {r['trainable']:,}  "
              f"{r['tokens_per_s']:,.0f} tok/s  peak {r['peak_gb']:.2f} GB", flush=True)

    task = load_task(args.task)
    if not args.skip_full:
        model, tok, _ = load_model(args.model)
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        r = train(model, tok, tokenize_task(task, tok, args.seqlen), params, cfg(args.full_lr))
        log(row("fp full fine-tuning", r, sum(p.numel() for p in params.values()), None, {"lr": args.full_lr}))
        del model, params
        torch.cuda.empty_cache()

    methods = ["rtn"] + (["gptq"] if args.gptq else [])
    for bits in args.bits:
        for qm in methods:
            base = args.out / f"{qm}-w{bits}c"
            if not base.exists():
                t0 = time.time()
                quantize(QuantizeConfig(args.model, base, qm, QuantSpec(bits, None), device=dev, quiet=True))
                print(f"quantized {base.name} in {time.time() - t0:.0f} s", flush=True)
            ck = load_checkpoint(base)
            lr = default_lr(ck.info)
            out = args.out / f"peqa-{qm}-w{bits}.safetensors"
            p = finetune_peqa(ck.model, ck.tokenizer, ck.info, task, cfg(lr), out)
            log(row(f"PEQA {qm.upper()} W{bits} per-channel", p.train, p.trainable, p.delta_bytes, {"lr": lr}))
            ck = load_checkpoint(base)
            out = args.out / f"lora-{qm}-w{bits}"
            q = finetune_lora(ck.model, ck.tokenizer, ck.info, task, cfg(args.lora_lr), LoraOptions(), out,
                              overwrite=True)
            log(row(f"LoRA r64 {qm.upper()} W{bits} per-channel", q.train, q.trainable, q.adapter_bytes,
                    {"lr": args.lora_lr}))
            del ck
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
