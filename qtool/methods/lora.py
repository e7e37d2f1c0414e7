"""LoRA / DoRA / QLoRA fine-tuning on a frozen quantized base (METHODS.md §4, §5).

The base (integer QuantLinear or NF4Linear) is never dequantized into the model: each
target layer is wrapped by qtool.nn.lora.LoraLinear and only A, B (and DoRA's magnitude)
train, through the same loop as PEQA (qtool.train). The start is PEFT's default init
(B = 0: QLoRA / GPTQ-LoRA style) or an ApiQ/LoftQ sidecar (`--adapter`). The output is a
PEFT-format adapter directory (qtool.artifact.adapter).

`qlora` is `lora` with QLoRA's recipe as defaults and an NF4 base required:
r 64, α 16, dropout 0.05 on every linear of the blocks, lr 2e-4 constant, grad-norm clip 0.3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from qtool import dist
from qtool.artifact.adapter import AdapterSpec, check_adapter, read_adapter, save_adapter
from qtool.data.tasks import Task
from qtool.errors import QtoolError
from qtool.nn.lora import (
    DEFAULT_TARGETS,
    LoraLinear,
    lora_layers,
    lora_parameters,
    remove_lora,
    set_lora_tensors,
    target_names,
    wrap_modules,
)
from qtool.nn.replace import QUANT_TYPES
from qtool.train.loop import TrainConfig, TrainResult, train


@dataclass
class LoraOptions:
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    dora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    adapter: Path | None = None  # start from this adapter (ApiQ / LoftQ init, or a previous run)


# Training defaults per method; the CLI fills what the user did not set from here.
RECIPES: dict[str, dict] = {
    "lora": {"lr": 2e-4, "schedule": "cosine", "warmup_ratio": 0.03, "max_grad_norm": 0.3},
    "qlora": {"lr": 2e-4, "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.3},
}


@dataclass
class LoraResult:
    adapter_dir: Path
    adapter_bytes: int
    trainable: int
    train: TrainResult
    init: str
    extra: dict = field(default_factory=dict)


def check_base(info: dict, method: str) -> None:
    kinds = {m.get("kind", "int") for m in info.get("modules", {}).values()}
    if not kinds:
        raise QtoolError(f"--method {method} needs a quantized qtool checkpoint (the manifest lists no modules)")
    if method == "qlora" and kinds != {"nf4"}:
        raise QtoolError("--method qlora trains LoRA on an NF4 base (quantize --method nf4); this checkpoint "
                         f"holds {', '.join(sorted(kinds))} layers: use --method lora for integer bases")


def attach_adapter(model: nn.Module, path: Path, fingerprint: str | None, dropout: float | None = None
                   ) -> tuple[dict[str, LoraLinear], AdapterSpec, str]:
    """Wrap exactly the adapter's modules and load its tensors; returns (layers, spec, init)."""
    adapter = read_adapter(Path(path))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANT_TYPES))}
    check_adapter(adapter, layers, fingerprint)
    spec = adapter.spec
    p = spec.dropout if dropout is None else dropout
    wrapped = wrap_modules(model, sorted(adapter.tensors), spec.rank, spec.alpha, p, spec.dora)
    set_lora_tensors(wrapped, adapter.tensors)
    return wrapped, spec, adapter.meta.get("qtool.init", "peft")


def prepare(model: nn.Module, info: dict, opts: LoraOptions) -> tuple[dict[str, LoraLinear], AdapterSpec, str]:
    """Wrap the model for training: from `opts.adapter` when given, else fresh PEFT-default LoRA."""
    if opts.adapter is not None:
        layers, spec, init = attach_adapter(model, opts.adapter, info.get("fingerprint"), opts.dropout)
        if opts.dora and not spec.dora:
            raise QtoolError(f"--dora: the adapter {opts.adapter} is plain LoRA (its magnitudes are not stored)")
        return layers, dataclasses.replace(spec, dropout=opts.dropout), init
    names = target_names(model, opts.targets)
    layers = wrap_modules(model, names, opts.rank, opts.alpha, opts.dropout, opts.dora)
    targets = tuple(sorted({n.rpartition(".")[2] for n in names}))
    return layers, AdapterSpec(opts.rank, opts.alpha, opts.dropout, opts.dora, targets), "default"


def finetune_lora(model: nn.Module, tokenizer, info: dict, task: Task, config: TrainConfig, opts: LoraOptions,
                  out: Path, method: str = "lora", overwrite: bool = False) -> LoraResult:
    """Train LoRA (DoRA) on `task` over the frozen quantized `model`; write the kept adapter to `out`."""
    layers, spec, init = prepare(model, info, opts)
    params = lora_parameters(layers)
    try:
        result = train(model, tokenizer, task, params, config)
    finally:
        remove_lora(model)
    kept = {}
    for key, t in result.params.items():
        module, _, part = key.partition(".lora_")
        kept.setdefault(module, {})["lora_" + part] = t
    metric = result.best.get(result.metric, float("nan"))
    n = sum(p.numel() for p in params.values())
    if not dist.is_main():  # data-parallel run: the other processes hold the same adapter and write nothing
        return LoraResult(Path(out), 0, n, result, init)
    size = save_adapter(out, kept, spec, info.get("fingerprint", ""), init=f"{init}+trained" if init != "default"
                        else "trained", overwrite=overwrite, method=method, task=task.name,
                        steps=result.best.get("step", result.steps), total_steps=result.total_steps,
                        lr=repr(config.lr), seed=config.seed, metric_name=result.metric,
                        metric=repr(float(metric)), optim=config.optim, schedule=config.schedule,
                        seqlen=config.seqlen, batch_size=config.batch_size * config.grad_accum,
                        task_source=task.source)
    return LoraResult(Path(out), size, n, result, init)


def describe(result: LoraResult) -> dict:
    r = result.train
    return {"adapter": str(result.adapter_dir), "adapter_bytes": result.adapter_bytes,
            "trainable": result.trainable, "init": result.init, "steps": r.steps,
            "kept_step": r.best.get("step"), "metric": r.metric, "initial": r.initial, "final": r.final,
            "kept": r.best, "tokens": r.tokens, "train_seconds": r.train_seconds,
            "tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory_bytes, "device": r.device,
            "skipped_steps": r.skipped_steps, "history": r.history}


def finetune_checkpoint(model_dir: Path, method: str, task_name: str | None, out: Path | None,
                        config: TrainConfig, opts: LoraOptions, data: Path | None = None, fmt: str | None = None,
                        overwrite: bool = False) -> LoraResult:
    """`qtool finetune --method lora|qlora`: the task is read (and validated) before the model loads."""
    from qtool.artifact.checkpoint import load_checkpoint, read_manifest
    from qtool.data.tasks import load_task

    task = load_task(task_name, data, fmt)
    out = Path(out) if out is not None else Path(f"{task.name}-{method}")
    if out.exists() and not overwrite:
        raise QtoolError(f"output {out} exists (use --overwrite)")
    info = read_manifest(Path(model_dir))
    check_base(info, method)
    if opts.adapter is not None:
        read_adapter(opts.adapter)  # fail on a bad adapter before loading the model
    if config.state_dir is None and (config.save_every or config.resume):
        config = dataclasses.replace(config, state_dir=out.with_name(out.name + ".train"))
    ck = load_checkpoint(Path(model_dir))
    return finetune_lora(ck.model, ck.tokenizer, ck.info, task, config, opts, out, method, overwrite)


__all__ = ["LoraOptions", "RECIPES", "attach_adapter", "finetune_checkpoint", "finetune_lora", "lora_layers"]
