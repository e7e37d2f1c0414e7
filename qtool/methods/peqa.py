"""PEQA (METHODS.md §3): fine-tune only the quantization scales of a packed checkpoint.

Ŵ = (s₀ + Δs)·(q − z). Each QuantLinear gets a trainable Δs [N, G] initialised to zero
(so training starts exactly at the quantized model); q, z, s₀, embeddings, norms and
lm_head stay frozen. The gradient of Δs comes from qtool.nn.scale_grad, which never keeps
a dense weight. The result is a task-delta file (qtool.artifact.delta).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from qtool import dist
from qtool.artifact.delta import save_delta
from qtool.data.tasks import Task
from qtool.errors import QtoolError
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import quant_linears
from qtool.train.loop import TrainConfig, TrainResult, train

# Default learning rates by bit-width (AdamW, cosine, 3 % warm-up, clip 0.3), from the sweep
# in docs/methods/peqa.md (H100, SmolLM2-135M per-channel RTN, bbc-news, 150 steps of 8 × 512):
# W4 improved monotonically up to the largest lr tried, 1e-3 (3e-4 within 0.03 nats);
# W3 was measured up to 1e-4, still improving. EfficientQAT's E2E-QP value 1e-5 lowered the
# loss about a third as much as 1e-3 in the same steps. W2 and W8 are not measured.
DEFAULT_LR = {2: 1e-4, 3: 1e-4, 4: 1e-3, 8: 1e-3}


def default_lr(info: dict) -> float:
    bits = {m.get("bits") for m in info.get("modules", {}).values()}
    return DEFAULT_LR.get(min(bits) if bits else 4, 1e-4)


def check_trainable(info: dict, layers: dict | None = None) -> None:
    """Every quantized module must be an integer-grid QuantLinear: NF4 and other codebook
    formats (QLoRA) have no per-channel scales to train. Checked from the manifest alone
    before any weight is loaded, and against the built model when `layers` is given."""
    for name, entry in info.get("modules", {}).items():
        kind = entry.get("kind", "int")
        if kind != "int" or (layers is not None and not isinstance(layers.get(name), QuantLinear)):
            raise QtoolError(f"PEQA trains integer-grid scales only; module {name} is of kind {kind!r} "
                             "(NF4 and other codebook formats have no trainable scales)")


def trainable_scales(model: nn.Module, info: dict | None = None) -> dict[str, nn.Parameter]:
    """Freeze the model and attach a zero Δs to every QuantLinear; returns {module name: Δs}.

    Refuses checkpoints with quantized modules whose scales PEQA cannot train (any module
    in the manifest that is not an integer-grid QuantLinear, e.g. NF4 codebooks)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = quant_linears(model)
    check_trainable(info or {}, layers)
    if not layers:
        raise QtoolError("the model has no quantized layers: PEQA needs a qtool checkpoint")
    params = {}
    for name, layer in layers.items():
        layer.scale_delta = nn.Parameter(torch.zeros(layer.scales.shape, dtype=torch.float32,
                                                     device=layer.scales.device))
        params[name] = layer.scale_delta
    return params


def remove_scale_deltas(model: nn.Module) -> None:
    """Detach the trainable Δs again (the model is back to its plain quantized forward)."""
    for layer in quant_linears(model).values():
        layer.scale_delta = None


@dataclass
class PeqaResult:
    delta_path: Path
    delta_bytes: int
    trainable: int  # number of trained values
    train: TrainResult


def finetune_peqa(model: nn.Module, tokenizer, info: dict, task: Task, config: TrainConfig,
                  out: Path) -> PeqaResult:
    """Train Δs on `task` and write the kept (best by default) Δs to `out`."""
    if out.suffix != ".safetensors":
        raise QtoolError(f"output {out} must end in .safetensors")
    params = trainable_scales(model, info)
    try:
        result = train(model, tokenizer, task, params, config)
    finally:
        remove_scale_deltas(model)
    kept: dict[str, Tensor] = result.params
    metric = result.best.get(result.metric, float("nan"))
    if not dist.is_main():  # data-parallel run: the other processes hold the same Δs and write nothing
        return PeqaResult(out, 0, sum(t.numel() for t in kept.values()), result)
    size = save_delta(out, kept, info, method="peqa", task=task.name,
                      steps=result.best.get("step", result.steps), total_steps=result.total_steps,
                      lr=repr(config.lr), seed=config.seed,
                      metric_name=result.metric, metric=repr(float(metric)),
                      val_loss=repr(float(result.best.get("loss", float("nan")))),
                      seqlen=config.seqlen, batch_size=config.batch_size * config.grad_accum,
                      task_source=task.source)
    n = sum(t.numel() for t in kept.values())
    return PeqaResult(out, size, n, result)


def describe(result: PeqaResult) -> dict:
    """A JSON-friendly summary (for --json and docs)."""
    r = result.train
    return {"delta": str(result.delta_path), "delta_bytes": result.delta_bytes, "trainable": result.trainable,
            "steps": r.steps, "kept_step": r.best.get("step"), "metric": r.metric, "initial": r.initial,
            "final": r.final, "kept": r.best, "tokens": r.tokens, "train_seconds": r.train_seconds,
            "tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory_bytes, "device": r.device,
            "skipped_steps": r.skipped_steps, "history": r.history}


def finetune_checkpoint(model_dir: Path, task_name: str | None, out: Path | None, config: TrainConfig,
                        data: Path | None = None, fmt: str | None = None,
                        overwrite: bool = False) -> PeqaResult:
    """`qtool finetune --method peqa`: load the checkpoint and the task, train Δs, write it.

    The task is read (and its data validated) before the model is loaded, so bad data fails
    in a second. `config.lr` of 0 means the default for the checkpoint's bit-width."""
    from qtool.artifact.checkpoint import load_checkpoint, read_manifest
    from qtool.data.tasks import load_task

    task = load_task(task_name, data, fmt)
    out = Path(out) if out is not None else Path(f"{task.name}.safetensors")
    if out.exists() and not overwrite:
        raise QtoolError(f"output {out} exists (use --overwrite)")
    info = read_manifest(Path(model_dir))
    check_trainable(info)
    if not config.lr:
        config = dataclasses.replace(config, lr=default_lr(info))
    if config.state_dir is None and (config.save_every or config.resume):
        config = dataclasses.replace(config, state_dir=out.with_name(out.stem + ".train"))
    ck = load_checkpoint(Path(model_dir))
    return finetune_peqa(ck.model, ck.tokenizer, ck.info, task, config, out)
