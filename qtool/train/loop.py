"""The one training loop: PEQA, LoRA and QLoRA differ only in the parameters they hand it.

The caller freezes the model and passes the trainable parameters by name; this loop owns
everything else: device placement and bf16 autocast (accelerate), gradient accumulation,
AdamW, cosine schedule with linear warm-up, grad-norm clipping, gradient checkpointing,
periodic validation with best-parameter keeping, and a safetensors training state for
--resume. Batches are a pure function of (seed, micro-batch number), so a resumed run
continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qtool import dist
from qtool.data.tasks import Task
from qtool.errors import QtoolError
from qtool.nn.qlinear import dense_cache
from qtool.train.data import IGNORE, BatchOrder, TokenizedTask, collate, tokenize_task
from qtool.train.evaluate import evaluate
from qtool.train.loss import nll_per_row
from qtool.train.optim import build_optimizer
from qtool.train.state import (
    STATE_FILE,
    TrainState,
    load_state,
    optimizer_state,
    restore_optimizer,
    save_state,
)

MAX_BAD_STEPS = 10  # consecutive non-finite losses before giving up (2-bit runs can diverge)


@dataclass
class TrainConfig:
    lr: float
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    seqlen: int = 1024
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 0.3
    eval_every: int = 0  # steps; 0: only before and after training
    eval_samples: int | None = 256  # validation sequences (or classification items) per evaluation
    eval_batch_size: int | None = None
    save_every: int = 0  # steps between training-state saves; 0: never
    state_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    grad_checkpoint: bool = False
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | no
    keep: str = "best"  # best | last: which parameters the result's `params` holds
    quiet: bool = False
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    optim: str = "adamw"  # adamw | paged_adamw (qtool.train.optim)
    fsdp: bool = False  # shard the model over the processes (qtool.train.fsdp)

    def resume_key(self, task: str, total_steps: int) -> dict:
        """Fields that a resumed run must share with the run that saved the state."""
        return {"task": task, "lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "seqlen": self.seqlen, "seed": self.seed, "total_steps": total_steps,
                "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay, "schedule": self.schedule}


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    tokens: int  # input tokens processed (padding excluded)
    train_seconds: float  # training steps only, evaluation and saving excluded
    initial: dict | None  # validation metrics before the first step
    final: dict  # validation metrics after the last step
    best: dict  # {"step", metrics...} of the kept parameters
    history: list[dict]
    params: dict[str, Tensor]  # the kept parameters (best or last), fp32 on CPU
    metric: str
    peak_memory_bytes: int | None = None
    skipped_steps: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


SCHEDULES = ("cosine", "constant")


def lr_at(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at 0-based `step`: linear warm-up to 1 (the first step is
    already 1/warmup, not 0), then cosine decay to 0 at `total`, or constant 1 (QLoRA)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QtoolError("--device cuda: no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise QtoolError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _accelerator(device: torch.device, mixed_precision: str):
    from accelerate import Accelerator

    mp = ("bf16" if device.type == "cuda" else "no") if mixed_precision == "auto" else mixed_precision
    if mp not in ("bf16", "no"):
        raise QtoolError(f"mixed precision must be auto, bf16 or no, got {mixed_precision!r}")
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mp)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers 5.23 renamed gradient_checkpointing_* to activation_checkpointing_*."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        kwargs = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
        getattr(model, f"{prefix}_checkpointing_enable")(**kwargs)
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def _identity(t: Tensor) -> Tensor:
    return t


def _better(a: float, b: float | None, higher: bool) -> bool:
    return b is None or (a > b if higher else a < b)


def train(model: nn.Module, tokenizer, task: Task | TokenizedTask, params: dict[str, nn.Parameter],
          config: TrainConfig, optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
          ) -> TrainResult:
    """Train `params` (everything else must already be frozen) on `task`.

    `optimizer_factory` replaces `config.optim` (comparison scripts use it to train a peer
    library's model with that library's optimizer through this same loop)."""
    if not params:
        raise QtoolError("nothing to train: the method selected no parameters")
    ids = {id(p) for p in params.values()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if stray:
        raise QtoolError(f"parameter {stray[0]} requires grad but is not in the trainable set")
    if not all(p.requires_grad for p in params.values()):
        raise QtoolError("every trainable parameter must have requires_grad=True")
    if config.schedule not in SCHEDULES:
        raise QtoolError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    device = _device(config.device)
    accelerator = _accelerator(device, config.mixed_precision)
    device = accelerator.device
    world, rank = dist.world_size(), dist.rank()
    global_batch = config.batch_size * config.grad_accum
    if global_batch % world:
        raise QtoolError(f"{world} processes do not divide the global batch of {global_batch} sequences "
                         "(--batch-size × --grad-accum)")
    tt = task if isinstance(task, TokenizedTask) else tokenize_task(task, tokenizer, config.seqlen)
    order = BatchOrder(len(tt.train), config.batch_size, config.seed)
    # Per-sequence counts, so that every process knows the whole step's normaliser and tokens
    # without a collective (a sequence's targets are its labels after the first position).
    n_targets_of = [sum(t != IGNORE for t in e.labels[1:]) for e in tt.train] if world > 1 else []
    steps_per_epoch = order.per_epoch // config.grad_accum
    if steps_per_epoch < 1:
        raise QtoolError(f"one optimizer step needs {config.batch_size * config.grad_accum} sequences; "
                         f"the training split has {len(tt.train)}")
    total = config.max_steps if config.max_steps else max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = max(1, math.ceil(config.warmup_ratio * total)) if config.warmup_ratio > 0 else 0
    eval_bs = config.eval_batch_size or config.batch_size
    higher = tt.task.higher_is_better
    metric = tt.task.metric

    model.to(device)
    whole = _identity
    if config.fsdp:
        from qtool.train.fsdp import place, shard
        from qtool.train.fsdp import whole as whole_fsdp

        if config.optim != "adamw" or optimizer_factory is not None:
            raise QtoolError("--fsdp trains with --optim adamw only (its moments are sharded with the parameters)")
        params, whole = shard(model, params, device), whole_fsdp
    names = list(params)
    if optimizer_factory is not None:
        optimizer = optimizer_factory([params[n] for n in names])
    else:
        optimizer = build_optimizer(config.optim, [params[n] for n in names], lr=config.lr, betas=config.betas,
                                    weight_decay=config.weight_decay)
    key = config.resume_key(tt.task.name, total)
    state_path = Path(config.state_dir) / STATE_FILE if config.state_dir else None

    start, history, best, best_params, tokens, seconds, initial = 0, [], None, None, 0, 0.0, None
    if config.resume:
        if state_path is None:
            raise QtoolError("--resume needs a training-state directory")
        st = load_state(state_path, names)
        for k, v in key.items():
            if st.config.get(k) != v:
                raise QtoolError(f"--resume: the saved run used {k}={st.config.get(k)!r}, this run {k}={v!r}")
        with torch.no_grad():
            for n in names:
                if st.params[n].shape != params[n].shape:
                    shape = tuple(st.params[n].shape)
                    raise QtoolError(f"--resume: {n} has shape {shape} in the saved state")
                params[n].copy_(place(st.params[n], params[n]) if config.fsdp else st.params[n])
        if config.fsdp:  # each process keeps its shard of the saved moments
            st.optim = {n: {k: v if k == "step" else place(v, params[n]) for k, v in o.items()}
                        for n, o in st.optim.items()}
        restore_optimizer(optimizer, params, st.optim)
        if st.rng_cpu is not None:
            torch.set_rng_state(st.rng_cpu)
        if st.rng_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st.rng_cuda)
        start, history, best, tokens, seconds = st.step, st.history, st.best, st.tokens, st.seconds
        best_params = st.best_params
        initial = history[0] if history and history[0].get("step") == 0 else None

    def snapshot() -> dict[str, Tensor]:
        return {n: whole(params[n].detach()).float().cpu().clone() for n in names}

    train_peak = 0

    def run_eval(step: int) -> dict:
        nonlocal best, best_params, train_peak
        if device.type == "cuda":  # the reported peak is the training steps' own, evaluation excluded
            train_peak = max(train_peak, torch.cuda.max_memory_allocated(device))
        m = evaluate(model, tt, eval_bs, device, config.eval_samples, accelerator.autocast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        m = {"step": step, **m}
        history.append(m)
        if _better(m[metric], None if best is None else best[metric], higher):
            best, best_params = m, snapshot()
        return m

    def save(step: int) -> None:
        if state_path is None or not (dist.is_main() or config.fsdp):
            return
        rng_cuda = list(torch.cuda.get_rng_state_all()) if device.type == "cuda" else []
        optim = optimizer_state(optimizer, params)
        if config.fsdp:  # gathering the shards is a collective: every process takes part
            optim = {n: {k: whole(v) for k, v in o.items()} for n, o in optim.items()}
        current = snapshot()
        if not dist.is_main():
            return
        save_state(state_path, TrainState(step, current, best_params, optim, torch.get_rng_state(),
                                          rng_cuda, key, history, best, tokens, seconds))

    if config.grad_checkpoint:
        # Non-reentrant: with every base weight frozen, reentrant checkpointing would see
        # inputs that do not require grad and silently drop the scale gradients.
        _checkpointing(model, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from qtool.methods.progress import progress_bar

    bad = skipped = 0
    last_eval: dict | None = history[-1] if history else None
    # No kernels on the CPU: a frozen base (LoRA, QLoRA) is dequantized once for the run.
    cache = dense_cache(model) if device.type == "cpu" and not config.fsdp else contextlib.nullcontext()
    try:
        cache.__enter__()
        model.train()
        if start == 0:
            initial = last_eval = run_eval(0)
        with progress_bar(config.quiet or not dist.is_main()) as bar:
            ptask = bar.add_task(f"train {tt.task.name}", total=total, completed=start)
            for step in range(start, total):
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_at(step, total, warmup, config.schedule)
                ks = range(step * config.grad_accum, (step + 1) * config.grad_accum)
                if world == 1:
                    micro = [collate([tt.train[i] for i in order.indices(k)], tt.pad_id) for k in ks]
                    n_targets = sum(b.n_targets for b in micro)
                    step_tokens = sum(b.n_tokens for b in micro)
                else:
                    # The step's global batch (the same sequences, in the same order, as one
                    # process would take) split into one contiguous share per process, in
                    # micro-batches of at most --batch-size; dropout draws are seeded by
                    # (seed, step, rank), so a resumed run needs no per-process generator state.
                    seqs = [i for k in ks for i in order.indices(k)]
                    n_targets = sum(n_targets_of[i] for i in seqs)
                    step_tokens = sum(len(tt.train[i].input_ids) for i in seqs)
                    mine = [seqs[j] for j in dist.shard(len(seqs))]
                    micro = [collate([tt.train[i] for i in mine[j:j + config.batch_size]], tt.pad_id)
                             for j in range(0, len(mine), config.batch_size)]
                    torch.manual_seed((config.seed * 1_000_003 + step) * 4099 + rank)
                t0 = time.perf_counter()
                step_nll = 0.0
                for b in micro:
                    b = b.to(device)
                    with accelerator.autocast():
                        sums, _ = nll_per_row(model, b.input_ids, b.attention_mask, b.labels)
                        loss = sums.sum() / n_targets  # per-token mean over the whole accumulated step
                        if config.fsdp:  # FSDP averages the processes' gradients (qtool.train.fsdp)
                            loss = loss * world
                    accelerator.backward(loss)
                    step_nll += float(sums.detach().sum())
                if config.fsdp:  # FSDP's reduce-scatter summed the gradients
                    step_nll = dist.total(step_nll)
                elif world > 1:  # every process holds its share's gradient: the sum is the step's gradient
                    (step_nll,) = dist.all_reduce_grads_([params[n] for n in names], [step_nll])
                norm = whole(accelerator.clip_grad_norm_([params[n] for n in names], config.max_grad_norm))
                if math.isfinite(step_nll) and torch.isfinite(torch.as_tensor(norm)).item():
                    optimizer.step()
                    bad = 0
                else:
                    skipped += 1
                    bad += 1
                    if bad >= MAX_BAD_STEPS:
                        raise QtoolError(f"training diverged: {bad} consecutive steps with a non-finite loss "
                                         f"(at step {step + 1}); lower --lr")
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - t0
                tokens += step_tokens
                done = step + 1
                if (config.eval_every and done % config.eval_every == 0) or done == total:
                    last_eval = run_eval(done)
                if config.save_every and done % config.save_every == 0:
                    save(done)
                info = f"loss {step_nll / max(1, n_targets):.4f} · {tokens / max(seconds, 1e-9):,.0f} tok/s"
                if last_eval is not None:
                    info += f" · val {metric} {last_eval[metric]:.4f} (step {last_eval['step']})"
                bar.update(ptask, completed=done, info=info)
    finally:
        cache.__exit__(None, None, None)
        if config.grad_checkpoint:
            _checkpointing(model, False)
        model.eval()
    if config.save_every and state_path is not None and total % config.save_every != 0:
        save(total)
    final = history[-1]
    kept = best_params if (config.keep == "best" and best_params is not None) else snapshot()
    kept_info = best if config.keep == "best" and best is not None else final
    peak = max(train_peak, torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return TrainResult(total, total, tokens, seconds, initial, final, kept_info, history, kept, metric, peak,
                       skipped, str(device))


def config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["state_dir"] = str(config.state_dir) if config.state_dir else None
    return d
