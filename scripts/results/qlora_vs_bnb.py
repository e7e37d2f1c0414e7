"""QLoRA side by side: qtool (NF4 + DQ, LoraLinear, PagedAdamW) vs bitsandbytes + PEFT.

Needs `bitsandbytes` and `peft` installed beside qtool (neither is a qtool dependency).
Both models train through qtool's one training loop (qtool.train.train) with the same task,
batches, seed, hyperparameters and evaluation, so that what differs is only the quantized
base, the LoRA layers and the optimizer implementation:

  qtool: quantize_model(..., "nf4") (block 64, double quant), LoRA r 64 α 16 dropout 0.05 on the
         7 block linears, AdamW (torch) or qtool's PagedAdamW (pinned host state)
  bnb:   from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute)),
         peft.get_peft_model(LoraConfig(same)), AdamW (torch) or bnb.optim.PagedAdamW (32-bit,
         CUDA managed memory)
Both: non-quantized weights in bf16, bf16 autocast, lr 2e-4 constant, clip 0.3, no gradient
checkpointing. Also compares the dequantized NF4 weights of every block linear.

Usage: python scripts/results/qlora_vs_bnb.py OUT.json [--model smollm2-135m] [--task bbc-topic]
       [--steps 100] [--seeds 0 1 2] [--paged-seeds 0] [--batch-size 8] [--seqlen 512]
       [--impls qtool bnb] [--resume]   (--model also takes a .gguf path)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from importlib import metadata
from pathlib import Path

import torch

from qtool.data.tasks import load_task
from qtool.methods import quantize_model
from qtool.models.load import hf_dir_for, load_model, resolve_source
from qtool.nn.lora import DEFAULT_TARGETS, add_lora, lora_parameters
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.replace import block_linears, cast_float
from qtool.quant.grid import QuantSpec
from qtool.train import TrainConfig, train
from qtool.train.data import tokenize_task
from qtool.train.optim import build_optimizer


@torch.no_grad()
def compare_nf4(model, device) -> dict:
    """Dequantized NF4 (block 64, double quant) of every block linear: qtool vs bitsandbytes."""
    import bitsandbytes.functional as bnbf

    from qtool.models.load import decoder_layers

    worst, identical, n, codes_equal, codes_total = 0.0, 0, 0, 0, 0
    for block in decoder_layers(model):
        for lin in block_linears(block).values():
            W = lin.weight.detach().to(device, torch.float32)
            ours = NF4Linear.from_weight(W, 64, True)
            q, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            theirs = bnbf.dequantize_4bit(q, state).float()
            d = (ours.dequantize() - theirs).abs().max().item()
            worst, identical, n = max(worst, d), identical + (d == 0.0), n + 1
            # bnb packs the first element of each pair in the high nibble, qtool in the low one
            their_codes = torch.stack([q.flatten() >> 4, q.flatten() & 15], 1).flatten()[: W.numel()]
            codes_equal += int((ours.codes() == their_codes).sum())
            codes_total += W.numel()
    return {"layers": n, "identical_layers": identical, "max_abs_diff": worst,
            "code_agreement": codes_equal / codes_total}


def train_cfg(args, seed: int, optim: str = "adamw") -> TrainConfig:
    return TrainConfig(lr=2e-4, max_steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                       warmup_ratio=0.0, schedule="constant", max_grad_norm=0.3, eval_every=0,
                       eval_samples=args.eval_items, seed=seed, optim=optim, quiet=True)


def run_qtool(args, tt, seed: int, optim: str) -> dict:
    torch.manual_seed(seed)
    model, tok, _ = load_model(args.model)
    quantize_model(model, QuantSpec(4, 64), "nf4", quiet=True)
    cast_float(model, torch.bfloat16)
    model.cuda()
    layers = add_lora(model, 64, 16, 0.05, targets=DEFAULT_TARGETS)
    params = lora_parameters(layers)
    r = train(model, tok, tt, params, train_cfg(args, seed, optim))
    return summary(r, sum(p.numel() for p in params.values()))


def run_bnb(args, tt, seed: int, paged: bool) -> dict:
    import bitsandbytes as bnb
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(seed)
    path = hf_dir_for(resolve_source(args.model))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = peft.get_peft_model(model, peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, bias="none",
                                                       target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cfg = train_cfg(args, seed)

    def factory(ps):
        if paged:
            return bnb.optim.PagedAdamW(ps, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return build_optimizer("adamw", ps, cfg.lr, cfg.betas, cfg.weight_decay)

    r = train(model, None, tt, params, cfg, optimizer_factory=factory)
    return summary(r, sum(p.numel() for p in params.values()))


def summary(r, trainable: int) -> dict:
    return {"trainable": trainable, "initial": r.initial, "final": r.final, "tokens_per_s": r.tokens_per_s,
            "peak_gb": (r.peak_memory_bytes or 0) / 1e9, "train_seconds": r.train_seconds, "steps": r.steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="bbc-topic")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--paged-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-items", type=int, default=400)
    ap.add_argument("--skip-nf4", action="store_true")
    ap.add_argument("--impls", nargs="+", default=["qtool", "bnb"], choices=["qtool", "bnb"])
    ap.add_argument("--resume", action="store_true", help="keep the runs already in OUT.json, do the rest")
    args = ap.parse_args()
    versions = {p: metadata.version(p) for p in ("qtool", "torch", "transformers", "peft", "bitsandbytes",
                                                 "triton", "accelerate")}
    res: dict = {"args": vars(args) | {"out": str(args.out)}, "versions": versions,
                 "gpu": torch.cuda.get_device_name(), "runs": []}
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        res["runs"], res["nf4"] = old.get("runs", []), old.get("nf4")
        args.skip_nf4 = args.skip_nf4 or res["nf4"] is not None
    done = {(r["impl"], r["seed"], r["paged"]) for r in res["runs"]}
    model, tok, _ = load_model(args.model)
    if not args.skip_nf4:
        res["nf4"] = compare_nf4(model, torch.device("cuda"))
        print("nf4", res["nf4"], flush=True)
    del model
    tt = tokenize_task(load_task(args.task), tok, args.seqlen)
    plan = [(s, False) for s in args.seeds] + [(s, True) for s in args.paged_seeds]
    for seed, paged in plan:
        for impl in args.impls:
            if (impl, seed, paged) in done:
                continue
            t0 = time.time()
            if impl == "qtool":
                row = run_qtool(args, tt, seed, "paged_adamw" if paged else "adamw")
            else:
                row = run_bnb(args, tt, seed, paged)
            row.update(impl=impl, seed=seed, paged=paged, wall_s=time.time() - t0)
            res["runs"].append(row)
            m = tt.task.metric
            print(f"{impl:5s} seed {seed} paged={paged}: {m} {row['initial'][m]:.4f} -> {row['final'][m]:.4f}, "
                  f"{row['tokens_per_s']:,.0f} tok/s, peak {row['peak_gb']:.2f} GB", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            args.out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
