"""PEQA task switching (docs/results.md): train a Δs per task on one integer base, then score
every Δs (and none) on every task's held-out split, with the integer weights loaded once.

Usage: python scripts/results/results_peqa_switch.py OUTDIR [--bits 4 3] [--steps 150] [--model smollm2-135m]
       [--quant rtn gptq]   (per-channel bases: RTN as in PEQA, or GPTQ-initialised)
Writes OUTDIR/switch.json and prints a markdown table per base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qtool.artifact.checkpoint import load_checkpoint
from qtool.data.tasks import load_task
from qtool.methods.peqa import describe, finetune_checkpoint
from qtool.pipeline import QuantizeConfig, quantize
from qtool.quant.grid import QuantSpec
from qtool.train import TrainConfig
from qtool.train.data import tokenize_task
from qtool.train.evaluate import evaluate

TASKS = ("bbc-topic", "rotten-tomatoes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seqlen", type=int, default=384)
    ap.add_argument("--eval-items", type=int, default=400)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", nargs="+", default=["rtn"], choices=["rtn", "gptq"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "bases": {}}
    for qm, bits in [(q, b) for q in args.quant for b in args.bits]:
        base = args.out / f"{qm}-w{bits}c"
        quantize(QuantizeConfig(args.model, base, qm, QuantSpec(bits, None), device=dev, overwrite=True,
                                quiet=True))
        name = f"W{bits} per-channel {qm.upper()}"
        runs = {}
        for task in TASKS:
            cfg = TrainConfig(lr=0.0, max_steps=args.steps, batch_size=8, seqlen=args.seqlen, eval_every=0,
                              eval_samples=min(200, args.eval_items), quiet=True, device=dev.type)
            t0 = time.time()
            r = finetune_checkpoint(base, task, args.out / f"{qm}-w{bits}-{task}.safetensors", cfg, overwrite=True)
            runs[task] = {**describe(r), "wall_s": time.time() - t0}
            runs[task].pop("history", None)
            print(f"{qm} W{bits} {task}: trained {r.train.steps} steps, {r.train.tokens_per_s:.0f} tok/s", flush=True)
        ck = load_checkpoint(base, device=dev)
        model, tok = ck.model, ck.tokenizer
        tts = {t: tokenize_task(load_task(t), tok, args.seqlen) for t in TASKS}
        table = {}
        for row in ("none", *TASKS):
            if row == "none":
                model.restore_base_scales()
            else:
                model.load_scales(args.out / f"{qm}-w{bits}-{row}.safetensors")
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                table[row] = {t: evaluate(model, tts[t], 32, dev, limit=args.eval_items) for t in TASKS}
        model.restore_base_scales()
        results["bases"][name] = {"train": runs, "table": table}
        print(f"\n| Δs \\ held-out accuracy ({name}) | " + " | ".join(TASKS) + " |")
        print("|---|" + "---|" * len(TASKS))
        for row, cols in table.items():
            print(f"| {row} | " + " | ".join(f"{cols[t]['accuracy']:.3f}" for t in TASKS) + " |")
        del model, ck
    (args.out / "switch.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
