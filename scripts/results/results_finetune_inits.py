"""Fine-tuning from different starts on the same grid (issue 5, "What must be shown" item 2).

For each grid × task × init, one run from the checkpoints scripts/results/results_apiq.sh kept
(QTOOL_KEEP=1) in APIQ_OUTDIR/<method>-w<bits>g<group>/:

  rtn      LoRA, PEFT default init (B = 0) on the RTN base: the QLoRA-style start
  gptq     LoRA, default init on the GPTQ base: GPTQ-LoRA
  loftq    LoRA from the LoftQ adapter (loftq-w*g*/adapter) on the LoftQ base
  apiq-bw  LoRA from the ApiQ-bw adapter (apiq-bw-w*g*/adapter) on the ApiQ-bw base
  peqa     PEQA (Δs only) on the RTN base at the same grid, lr = the per-bit-width default

LoRA: r 64, α 16, dropout 0.05 on every linear of the blocks (an init adapter brings its own
r/α), lr 2e-4 cosine with 3 % warm-up, clip 0.3. Same steps, batches (seed), sequence length
and bf16 autocast for every run. Each run records the held-out (validation split) metric
before training and of the kept (best) parameters (accuracy for classification tasks,
loss and perplexity for LM tasks), training tokens/s, peak GPU memory and the trainable count.

OUT.json is rewritten (atomically, under a lock file, so several processes with disjoint
--tasks may share it) after every run; a re-run skips the runs it already holds. A failed run
is recorded with its error and skipped on re-runs too, unless --retry-errors. At the end a
markdown table per task (rows = init, columns = grid) is printed and written to OUT.md.

Usage: python scripts/results/results_finetune_inits.py APIQ_OUTDIR OUT.json [--grids 2:64 3:64]
       [--tasks bbc-topic rotten-tomatoes bbc-news] [--steps 150] [--seqlen 384] [--batch-size 8]
       [--eval-items 400] [--eval-batch-size 32] [--inits rtn gptq loftq apiq-bw peqa] [--seed 0]
       [--device cuda|cpu]
       [--retry-errors] [--report-only]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from qtool.artifact.adapter import read_adapter
from qtool.artifact.checkpoint import load_checkpoint
from qtool.data.tasks import BUILTIN_TASKS, load_task
from qtool.methods.lora import LoraOptions, finetune_lora
from qtool.methods.peqa import default_lr, finetune_peqa
from qtool.train import TrainConfig

INITS = ("rtn", "gptq", "loftq", "apiq-bw", "peqa")
BASE_METHOD = {"rtn": "rtn", "gptq": "gptq", "loftq": "loftq", "apiq-bw": "apiq-bw", "peqa": "rtn"}
ADAPTER_INITS = ("loftq", "apiq-bw")
LABEL = {"rtn": "LoRA, default init on RTN (QLoRA-style)", "gptq": "LoRA, default init on GPTQ (GPTQ-LoRA)",
         "loftq": "LoRA from LoftQ", "apiq-bw": "LoRA from ApiQ-bw", "peqa": "PEQA (Δs) on RTN"}
LORA = {"rank": 64, "alpha": 16.0, "dropout": 0.05}
LORA_LR = 2e-4


def parse_grid(s: str) -> tuple[int, str]:
    bits, sep, group = s.partition(":")
    if not sep or not bits.isdigit() or not (group.isdigit() or group == "channel"):
        raise argparse.ArgumentTypeError(f"grid {s!r}: expected BITS:GROUP, e.g. 2:64")
    return int(bits), group


def tag(method: str, bits: int, group: str) -> str:
    return f"{method}-w{bits}g{group}"  # scripts/results/results_apiq.sh's checkpoint dir name


def run_key(task: str, init: str, bits: int, group: str) -> str:
    return f"{task}|{init}|w{bits}g{group}"


# ---------------------------------------------------------------- OUT.json


@contextlib.contextmanager
def locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def settings(args) -> dict:
    """What every run in one OUT.json must share (a resumed run must not mix settings)."""
    return {"steps": args.steps, "seqlen": args.seqlen, "batch_size": args.batch_size,
            "eval_items": args.eval_items, "seed": args.seed, "lora": LORA, "lora_lr": LORA_LR,
            "lora_schedule": "cosine", "warmup_ratio": 0.03, "max_grad_norm": 0.3, "peqa_lr": "default_lr(bits)"}


def open_results(path: Path, args) -> dict:
    with locked(path):
        data = read_results(path)
        want = settings(args)
        if data.get("settings") not in (None, want):
            diff = {k: (data["settings"].get(k), v) for k, v in want.items() if data["settings"].get(k) != v}
            sys.exit(f"{path} holds runs made with other settings (saved, asked): {diff}; use another OUT.json")
        data.setdefault("settings", want)
        data.setdefault("apiq_outdir", str(args.apiq_outdir))
        data.setdefault("runs", {})
        if not path.is_file():
            write_results(path, data)
    return data


def save_run(path: Path, key: str, record: dict) -> dict:
    with locked(path):
        data = read_results(path)
        data.setdefault("runs", {})[key] = record
        write_results(path, data)
    return data


def done(path: Path, key: str, retry_errors: bool) -> bool:
    with locked(path):
        rec = read_results(path).get("runs", {}).get(key)
    return rec is not None and not (retry_errors and "error" in rec)


# ---------------------------------------------------------------- one run


def run_one(base: Path, init: str, task, cfg: TrainConfig, seed: int, device: str) -> dict:
    torch.manual_seed(seed)  # LoRA's default A init and dropout
    t0 = time.time()
    ck = load_checkpoint(base, device=device)
    load_s = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="ft-inits-") as tmp:
        if init == "peqa":
            lr = default_lr(ck.info)
            r = finetune_peqa(ck.model, ck.tokenizer, ck.info, task, dataclasses.replace(cfg, lr=lr),
                              Path(tmp) / "delta.safetensors")
            extra = {"lr": lr, "artifact_bytes": r.delta_bytes}
        else:
            adapter = base / "adapter" if init in ADAPTER_INITS else None
            opts = LoraOptions(adapter=adapter, **LORA)
            r = finetune_lora(ck.model, ck.tokenizer, ck.info, task, cfg, opts, Path(tmp) / "adapter",
                              overwrite=True)
            spec = read_adapter(r.adapter_dir).spec
            extra = {"lr": cfg.lr, "artifact_bytes": r.adapter_bytes, "lora_init": r.init,
                     "adapter": str(adapter) if adapter else None, "rank": spec.rank, "alpha": spec.alpha,
                     "dropout": spec.dropout}
    tr = r.train
    del ck
    return {"base": str(base), "metric": tr.metric, "initial": tr.initial, "kept": tr.best, "final": tr.final,
            "kept_step": tr.best.get("step"), "steps": tr.steps, "trainable": r.trainable,
            "tokens": tr.tokens, "tokens_per_s": tr.tokens_per_s, "train_seconds": tr.train_seconds,
            "peak_gb": tr.peak_memory_bytes / 1e9 if tr.peak_memory_bytes is not None else None,
            "skipped_steps": tr.skipped_steps, "device": tr.device, "load_seconds": load_s,
            "wall_s": time.time() - t0, **extra}


# ---------------------------------------------------------------- tables


def _value(rec: dict, which: str) -> float | None:
    m = rec.get(which) or {}
    if "accuracy" in m:
        return m["accuracy"]
    if "loss" in m:
        return math.exp(min(m["loss"], 50.0))
    return None


def tables(data: dict, tasks: list[str], grids: list[tuple[int, str]], inits: list[str]) -> str:
    runs = data.get("runs", {})
    lines = []
    cols = [f"W{b} g{g}" for b, g in grids]
    for task in tasks:
        recs = {(i, b, g): runs.get(run_key(task, i, b, g)) for i in inits for b, g in grids}
        if not any(recs.values()):
            continue
        kinds = {r["metric"] for r in recs.values() if r and "metric" in r}
        acc = "accuracy" in kinds
        what = "held-out accuracy (higher is better)" if acc else "held-out perplexity (lower is better)"
        best = {}
        for b, g in grids:
            vals = [_value(r, "kept") for (i, bb, gg), r in recs.items() if r and (bb, gg) == (b, g)]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            best[(b, g)] = (max if acc else min)(vals) if vals else None
        lines += [f"### {task}: {what}, before → after fine-tuning (kept step)", "",
                  "| init | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for i in inits:
            cells = []
            for b, g in grids:
                r = recs[(i, b, g)]
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("failed")
                else:
                    v0, v1 = _value(r, "initial"), _value(r, "kept")
                    fmt = ".3f" if acc else ".2f"
                    s = f"{v1:{fmt}}"
                    if best[(b, g)] is not None and v1 == best[(b, g)]:
                        s = f"**{s}**"
                    cells.append(f"{v0:{fmt}} → {s} ({r.get('kept_step')})")
            lines.append(f"| {LABEL.get(i, i)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"{task}: tokens/s, peak GPU GB, trainable", "", "| init | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for i in inits:
            cells = []
            for b, g in grids:
                r = recs[(i, b, g)]
                if r is None or "error" in r:
                    cells.append("-")
                else:
                    peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"
                    cells.append(f"{r['tokens_per_s']:,.0f} · {peak} · {r['trainable']:,}")
            lines.append(f"| {LABEL.get(i, i)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("apiq_outdir", type=Path, help="OUTDIR of scripts/results/results_apiq.sh run with QTOOL_KEEP=1")
    ap.add_argument("out", type=Path, help="results JSON (rewritten after every run; re-runs resume)")
    ap.add_argument("--grids", type=parse_grid, nargs="+", default=[(2, "64"), (3, "64")], metavar="BITS:GROUP")
    ap.add_argument("--tasks", nargs="+", default=["bbc-topic", "rotten-tomatoes", "bbc-news"],
                    choices=sorted(BUILTIN_TASKS))
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seqlen", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-items", type=int, default=400, help="validation items (sequences for LM tasks)")
    ap.add_argument("--eval-batch-size", type=int, default=32,
                    help="sequences per validation forward (speed only; the metric does not depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--retry-errors", action="store_true", help="re-run runs recorded as failed")
    ap.add_argument("--report-only", action="store_true", help="print the tables from OUT.json, run nothing")
    args = ap.parse_args()

    data = open_results(args.out, args)
    todo = [(b, g, t, i) for b, g in args.grids for t in args.tasks for i in args.inits
            if not done(args.out, run_key(t, i, b, g), args.retry_errors)]
    if args.report_only:
        todo = []
    if todo and args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available (use --device cpu for a plumbing check)")
    missing = sorted({tag(BASE_METHOD[i], b, g) for b, g, _, i in todo
                      if not (args.apiq_outdir / tag(BASE_METHOD[i], b, g) / "qtool.json").is_file()
                      or (i in ADAPTER_INITS and not (args.apiq_outdir / tag(i, b, g) / "adapter").is_dir())})
    if missing:
        print(f"missing in {args.apiq_outdir} (runs on them are skipped, not recorded): {', '.join(missing)}",
              flush=True)
        todo = [(b, g, t, i) for b, g, t, i in todo if tag(BASE_METHOD[i], b, g) not in missing]
    print(f"{len(todo)} runs to do", flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    tasks = {}
    for b, g, t, i in todo:
        key = run_key(t, i, b, g)
        name = tag(BASE_METHOD[i], b, g)
        if done(args.out, key, args.retry_errors):  # another process sharing OUT.json did it meanwhile
            continue
        if t not in tasks:
            tasks[t] = load_task(t)
        cfg = TrainConfig(lr=LORA_LR, max_steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                          warmup_ratio=0.03, schedule="cosine", max_grad_norm=0.3, eval_every=0,
                          eval_samples=args.eval_items, eval_batch_size=args.eval_batch_size, seed=args.seed,
                          quiet=True, device=args.device)
        print(f"{key} ...", flush=True)
        try:
            rec = run_one(args.apiq_outdir / name, i, tasks[t], cfg, args.seed, args.device)
        except Exception as e:  # one failed run (divergence, OOM) must not stop the table
            traceback.print_exc()
            rec = {"error": f"{type(e).__name__}: {e}", "base": str(args.apiq_outdir / name)}
        rec = {"task": t, "init": i, "bits": b, "group": g, **rec,
               "gpu": gpu, "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = save_run(args.out, key, rec)
        if "error" in rec:
            print(f"{key}: FAILED {rec['error']}", flush=True)
        else:
            m = rec["metric"]
            print(f"{key}: {m} {rec['initial'][m]:.4f} -> {rec['kept'][m]:.4f} (step {rec['kept_step']})  "
                  f"ppl {rec['initial']['ppl']:.2f} -> {rec['kept']['ppl']:.2f}  trainable {rec['trainable']:,}  "
                  f"{rec['tokens_per_s']:,.0f} tok/s  peak {rec['peak_gb'] or 0:.2f} GB  {rec['wall_s']:.0f} s",
                  flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    data = read_results(args.out)
    text = tables(data, args.tasks, args.grids, args.inits)
    args.out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text, end="")


if __name__ == "__main__":
    main()
