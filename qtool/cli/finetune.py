"""Fine-tune a quantized checkpoint on a task: PEQA trains only the scales (one tiny Δs file).

Examples:
  qtool finetune smollm2-w4/ --method peqa --task bbc-news -o bbc-news.safetensors
  qtool finetune smollm2-w4/ --task rotten-tomatoes --max-steps 500 --eval-every 100
  qtool finetune smollm2-w4/ --task alpaca --data alpaca_data.json -o alpaca.safetensors
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o
from qtool.errors import QtoolError

METHODS = ("peqa",)
PLANNED = ("lora", "qlora")


def finetune(
    model_dir: Annotated[Path, typer.Argument(help="qtool checkpoint directory")],
    method: Annotated[str, typer.Option(help="peqa (lora, qlora: planned)")] = "peqa",
    task: Annotated[str | None, typer.Option(help="bbc-news | bbc-topic | shakespeare | rotten-tomatoes, "
                                             "or a name for --data")] = None,
    data: Annotated[Path | None, typer.Option(help="your own data file")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="text | jsonl | alpaca (default: from the "
                                            "file name)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Δs file to write "
                                                "(default TASK.safetensors)")] = None,
    epochs: Annotated[float, typer.Option(help="passes over the training split")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (0: the default for the bit-width)")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="sequences per micro-batch")] = 8,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    seqlen: Annotated[int, typer.Option(help="tokens per sequence")] = 1024,
    warmup: Annotated[float, typer.Option(help="warm-up fraction of the steps")] = 0.03,
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
    device: o.Device = "auto",
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    if method in PLANNED:
        raise QtoolError(f"--method {method} is not implemented yet (planned); available now: peqa")
    if method not in METHODS:
        raise QtoolError(f"unknown --method {method!r}; choose peqa")
    if keep not in ("best", "last"):
        raise QtoolError(f"--keep must be best or last, got {keep!r}")
    from qtool.methods.peqa import describe, finetune_checkpoint
    from qtool.train import TrainConfig

    o.seed_everything(seed)
    cfg = TrainConfig(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                      seqlen=seqlen, warmup_ratio=warmup, weight_decay=weight_decay,
                      max_grad_norm=max_grad_norm, eval_every=eval_every, eval_samples=eval_samples,
                      save_every=eval_every if save_every is None else save_every, state_dir=state_dir,
                      resume=resume, seed=seed, grad_checkpoint=grad_checkpoint, device=device, keep=keep,
                      quiet=quiet)
    res = finetune_checkpoint(model_dir, task, output, cfg, data, fmt, overwrite)
    r, m = res.train, res.train.metric
    con = o.console(quiet)
    first = f"{r.initial[m]:.4f} → " if r.initial else ""
    con.print(f"wrote {res.delta_path}: Δs of {res.trainable:,} scales, {res.delta_bytes / 1024:.1f} KiB")
    con.print(f"validation {m}: {first}{r.best[m]:.4f} (kept step {r.best['step']} of {r.steps}), "
              f"{r.tokens_per_s:,.0f} tokens/s over {r.train_seconds:.1f} s on {r.device}")
    o.write_json(json_out, describe(res))
