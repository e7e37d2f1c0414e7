"""ApiQ (METHODS.md §5, arXiv 2402.05147) and OmniQuant's learnable weight clipping, block by block.

  apiq-bw    for each block in turn: teacher = the fp block on X (the fp model's inputs); student =
             the same block with every Linear fake-quantized through learnable clipping (γ, β per
             group, qtool.quant.clip) plus LoRA (A, B) on the targets, run on Xq (the outputs of the
             already-finished quantized blocks). loss = MSE(student, teacher), plus
             MSE(student, fp block on Xq) with --aug-loss. AdamW, two groups (γ/β, LoRA), batch-1
             steps over the calibration windows for `epochs` epochs, no schedule. Then Q is frozen to
             integer codes, A, B are kept, and Xq is propagated through the finished block (with
             LoRA) while X is propagated through the fp block.
  apiq-lw    the same objective per Linear: the Linears that read one tensor (q,k,v → o → gate,up →
             down) are taken in forward order; a layer's student runs on the input the finished
             layers of the quantized block give it, its teacher is the fp layer on the fp input.
  omniquant  apiq-bw without LoRA (rank 0): learnable weight clipping only (OmniQuant's LWC), with
             OmniQuant's own defaults (γ/β lr 1e-2, no weight decay). No adapter.

The model returned holds QuantLinear layers (the learned clipping folded into scales and zeros) and,
for apiq, each LoRA target wrapped in qtool.nn.lora.LoraLinear with the calibrated A, B, which the
pipeline writes as OUTPUT/adapter/. The state after every finished block is kept in `state_dir`
(OUTPUT.apiq-state/ from the CLI) so that --resume continues a killed run and gives the same
checkpoint. docs/methods/apiq.md explains the choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qtool import dist
from qtool.artifact.atomic import atomic_file
from qtool.errors import QtoolError
from qtool.methods.blocks import capture_inputs, iter_blocks, run_block
from qtool.methods.gptq import input_groups
from qtool.methods.progress import progress_bar
from qtool.methods.registry import QuantizeOptions, register
from qtool.methods.rtn import quantize_lm_head
from qtool.models.load import decoder_layers
from qtool.nn.lora import LoraLinear
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import block_linears, set_module
from qtool.quant.clip import fake_quant, group_range, init_logits, quantize_clipped
from qtool.quant.grid import QuantizedWeight, QuantSpec, dequantize
from qtool.train.cuda_graph import GraphedStep, graphable

# Per-method defaults of (γ/β learning rate, weight decay). ApiQ's reference code: lwc_lr 5e-3,
# wd 0.1 on both groups. OmniQuant's reference scripts: lwc_lr 1e-2, wd 0.
DEFAULTS = {"apiq-bw": (5e-3, 0.1), "apiq-lw": (5e-3, 0.1), "omniquant": (1e-2, 0.0)}
LR_LORA = 5e-4  # ApiQ's peft_lr
STATE_FORMAT = "qtool-apiq-state"
STATE_VERSION = 1
OFFLOAD = ("auto", "gpu", "cpu")
TRAINED = tuple(DEFAULTS)  # the methods of this file


@dataclass(frozen=True)
class ApiqConfig:
    """Everything that decides the result of calibration (and so must match on --resume)."""

    method: str
    spec: QuantSpec
    scale_dtype: torch.dtype
    rank: int  # 0: clipping only (omniquant)
    alpha: float
    targets: tuple[str, ...]
    epochs: int
    lr_clip: float
    lr_lora: float
    weight_decay: float
    aug_loss: bool
    seed: int
    grad_clip: float | None = None  # max grad norm; None: no clipping (as ApiQ's code)
    max_retries: int = 2  # NaN/inf: retry the block from its start with lr ×0.1, this many times

    @property
    def layerwise(self) -> bool:
        return self.method == "apiq-lw"

    def key(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        d["scale_dtype"] = str(self.scale_dtype).removeprefix("torch.")
        d["targets"] = list(self.targets)
        return d


def make_config(method: str, opts: QuantizeOptions) -> ApiqConfig:
    lr_clip, wd = DEFAULTS[method]
    a = opts.apiq
    rank = 0 if method == "omniquant" else opts.lora_rank
    cfg = ApiqConfig(method, opts.spec, opts.scale_dtype, rank, opts.lora_alpha, tuple(opts.lora_targets),
                     a.epochs, a.lr_clip if a.lr_clip is not None else lr_clip, a.lr_lora,
                     a.weight_decay if a.weight_decay is not None else wd, a.aug_loss, opts.seed)
    check_config(cfg, a.offload)
    return cfg


def check_config(cfg: ApiqConfig, offload: str) -> None:
    """One-line errors for values no run can use (the CLI checks the same before loading a model)."""
    if cfg.spec.symmetric:
        raise QtoolError(f"{cfg.method} learns an asymmetric clipping range; --symmetric is not supported")
    if cfg.method != "omniquant" and cfg.rank < 1:
        raise QtoolError(f"--rank must be ≥ 1 for {cfg.method}, got {cfg.rank}")
    if not cfg.alpha > 0:
        raise QtoolError(f"--alpha must be > 0, got {cfg.alpha}")
    if cfg.epochs < 0:
        raise QtoolError(f"--epochs must be ≥ 0, got {cfg.epochs}")
    for name, v in (("--lr-clip", cfg.lr_clip), ("--lr-lora", cfg.lr_lora)):
        if not (v > 0 and math.isfinite(v)):
            raise QtoolError(f"{name} must be a positive number, got {v}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise QtoolError(f"--weight-decay must be ≥ 0, got {cfg.weight_decay}")
    if not cfg.targets:
        raise QtoolError("--targets must name at least one layer (e.g. q_proj,v_proj)")
    if offload not in OFFLOAD:
        raise QtoolError(f"--offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")


# ---------------------------------------------------------------------------------------------
# The calibration-time stand-in for one Linear


class ClipLoraLinear(nn.Module):
    """Frozen fp32 W, learnable clipping logits γ, β [N, G], optional LoRA A [r, K], B [N, r].

    mode "fp":    y = x·Wᵀ + b                       (teacher)
    mode "quant": y = x·fake_quant(W; γ, β)ᵀ + b + (α/r)·B·A·x   (student while training)
    mode "final": y = x·Ŵᵀ + b + (α/r)·B·A·x, Ŵ the stored integer grid (after `finish`); the same
                  arithmetic as QuantLinear + LoraLinear on the torch path.
    """

    def __init__(self, lin: nn.Linear, spec: QuantSpec, scale_dtype: torch.dtype, rank: int, alpha: float,
                 generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        W = lin.weight.detach().to(device, torch.float32)  # fp32 during calibration (METHODS.md §5)
        self.out_features, self.in_features = W.shape
        self.spec, self.scale_dtype = spec, scale_dtype
        self.register_buffer("weight", W)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().to(device, torch.float32))
        self.bias_dtype = None if lin.bias is None else lin.bias.dtype  # the QuantLinear keeps the source's
        wmin, wmax = group_range(W, spec)
        self.register_buffer("wmin", wmin)
        self.register_buffer("wmax", wmax)
        gamma, beta = init_logits(W, spec)
        self.gamma, self.beta = nn.Parameter(gamma), nn.Parameter(beta)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if rank else 0.0
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        if rank:
            # PEFT's default init (A Kaiming-uniform a=√5, B = 0), drawn on the CPU from a per-block
            # generator so that the init does not depend on the device or on earlier blocks.
            A = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.lora_A = nn.Parameter(A.to(device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.mode = "quant"
        self.qw: QuantizedWeight | None = None
        self.W_hat: Tensor | None = None

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(clipping parameters, LoRA parameters)."""
        lora = [self.lora_A, self.lora_B] if self.lora_A is not None else []
        return [self.gamma, self.beta], lora

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp":
            return F.linear(x, self.weight, self.bias)
        if self.mode == "final":
            W = self.W_hat
        else:
            W = fake_quant(self.weight, self.gamma, self.beta, self.spec, self.scale_dtype, (self.wmin, self.wmax))
        y = F.linear(x, W, self.bias)
        if self.lora_A is None:
            return y
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y + (lora * self.scaling).to(y.dtype)

    @torch.no_grad()
    def finish(self) -> None:
        """Freeze Q: integer codes from the learned clipping; forward switches to "final"."""
        self.qw = quantize_clipped(self.weight, self.gamma, self.beta, self.spec, self.scale_dtype)
        self.W_hat = dequantize(self.qw.codes, self.qw.scale, self.qw.zero, self.spec.group_size)
        self.mode = "final"

    def export(self) -> nn.Module:
        """The module that stays in the model: QuantLinear, LoRA-wrapped when this layer has LoRA (CPU)."""
        qw = self.qw
        cpu = QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu())
        bias = None if self.bias is None else self.bias.detach().to("cpu", self.bias_dtype)
        q = QuantLinear.from_quantized(cpu, self.spec.bits, self.spec.group_size, bias)
        if self.lora_A is None:
            return q
        w = LoraLinear(q, self.rank, self.alpha)
        with torch.no_grad():
            w.lora_A.weight.copy_(self.lora_A.detach().cpu())
            w.lora_B.weight.copy_(self.lora_B.detach().cpu())
        return w

    def state(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}.gamma": self.gamma, f"{prefix}.beta": self.beta}
        if self.lora_A is not None:
            out.update({f"{prefix}.lora_A": self.lora_A, f"{prefix}.lora_B": self.lora_B})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        self.gamma.copy_(tensors[f"{prefix}.gamma"])
        self.beta.copy_(tensors[f"{prefix}.beta"])
        if self.lora_A is not None:
            self.lora_A.copy_(tensors[f"{prefix}.lora_A"])
            self.lora_B.copy_(tensors[f"{prefix}.lora_B"])


def wrap_block(block: nn.Module, cfg: ApiqConfig, index: int, device: torch.device) -> dict[str, ClipLoraLinear]:
    """Replace every Linear of the block by a ClipLoraLinear (LoRA on the targets) and move the block."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    wrappers = {}
    for name, lin in block_linears(block).items():
        rank = cfg.rank if name.rpartition(".")[2] in cfg.targets else 0
        w = ClipLoraLinear(lin, cfg.spec, cfg.scale_dtype, rank, cfg.alpha, gen, device)
        set_module(block, name, w)
        wrappers[name] = w
    block.to(device)
    for p in block.parameters():
        p.requires_grad_(False)
    return wrappers


def set_mode(wrappers: dict[str, ClipLoraLinear], mode: str) -> None:
    for w in wrappers.values():
        w.mode = mode if (mode != "final" or w.W_hat is not None) else "quant"


# ---------------------------------------------------------------------------------------------
# Activations of every calibration window: on the GPU when they fit, else in pinned host memory


class Windows(list):
    """One tensor per window ([1, L, d]), kept on `store` (the compute device, or pinned CPU)."""

    def __init__(self, store: torch.device, items=()) -> None:
        super().__init__()
        self.store = store
        for t in items:
            self.append(t)

    def append(self, t: Tensor) -> None:  # type: ignore[override]
        super().append(stash(t.detach(), self.store))

    def put(self, j: int, t: Tensor) -> None:
        self[j] = stash(t.detach(), self.store)

    def get(self, j: int, device: torch.device) -> Tensor:
        return self[j].to(device, non_blocking=True)


def stash(t: Tensor, store: torch.device) -> Tensor:
    if store.type == "cuda":
        return t.to(store)
    t = t.to("cpu")
    # Pinned memory lets the per-step copy to the GPU overlap; only meaningful with CUDA present.
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


def choose_store(offload: str, device: torch.device, nbytes: int) -> torch.device:
    """Where the window activations live. auto: the GPU when they take at most half its free memory
    (the other half is for one block in fp32, its optimizer state and one window's autograd graph)."""
    if device.type != "cuda" or offload == "cpu":
        return torch.device("cpu")
    if offload == "gpu":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= 0.5 * free else torch.device("cpu")


def activation_bytes(model: nn.Module, calib: Tensor, cfg: ApiqConfig) -> int:
    """X, Xq and the teacher outputs (+ the aug teacher); apiq-lw adds one layer's captured
    inputs and teacher, at most two sets of the MLP width."""
    n, L = calib.shape
    hidden = model.config.hidden_size
    sets = 3 + cfg.aug_loss
    if cfg.layerwise:
        sets += 2 * getattr(model.config, "intermediate_size", hidden) / hidden
    return int(sets * n * L * hidden * 4)


# ---------------------------------------------------------------------------------------------
# Training one set of wrappers


@dataclass
class FitResult:
    steps: int = 0
    retries: int = 0
    fell_back: bool = False
    last_loss: float = float("nan")


def _snapshot(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: list[nn.Parameter], snap: list[Tensor]) -> None:
    for p, s in zip(params, snap, strict=True):
        p.copy_(s)


def fit(wrappers: list[ClipLoraLinear], inputs_of: Callable[[int], tuple[Tensor, ...]],
        loss_fn: Callable[..., Tensor], n: int, cfg: ApiqConfig, warn: Callable[[str], None], what: str,
        cuda_graphs: bool = True) -> FitResult:
    """AdamW over γ/β and LoRA, `cfg.epochs` epochs of batch-1 steps over n windows; the loss of
    window j is loss_fn(*inputs_of(j)).

    A non-finite loss or parameter restarts the set from its initial state with both learning
    rates ×0.1 (at most cfg.max_retries times); after that the last finite state (end of the last
    complete epoch, at worst the initial one) is kept. Nothing non-finite is ever kept.

    The losses are checked once per epoch, not per step: a per-step `.item()` would make the host
    wait for every step. A non-finite loss poisons the parameters through the optimizer, so the
    epoch-end check sees it either way, and the outcome (restart from the initial state) is the
    same as stopping at once. On CUDA the step is one replayed CUDA graph (qtool.train.cuda_graph):
    at 135M-model scale the kernel launches, not the GPU, set the step time."""
    clip = [p for w in wrappers for p in w.trainable()[0]]
    lora = [p for w in wrappers for p in w.trainable()[1]]
    params = clip + lora
    for p in params:
        p.requires_grad_(True)
    init = _snapshot(params)
    res = FitResult()
    lr_scale = 1.0
    use_graph = graphable(params, cuda_graphs) and dist.world_size() == 1  # no collectives inside a graph
    for attempt in range(cfg.max_retries + 1):
        groups = [{"params": clip, "lr": cfg.lr_clip * lr_scale, "weight_decay": cfg.weight_decay}]
        if lora:
            groups.append({"params": lora, "lr": cfg.lr_lora * lr_scale, "weight_decay": cfg.weight_decay})
        on_gpu = graphable(params)
        # fused: one kernel for the whole update; capturable: its step counter lives on the GPU
        opt = torch.optim.AdamW(groups, fused=on_gpu, capturable=use_graph)
        step = _eager_step(loss_fn, params, opt, cfg.grad_clip)
        if use_graph and n and cfg.epochs:
            try:
                step = GraphedStep(loss_fn, params, opt, inputs_of(0), cfg.grad_clip).step
            except RuntimeError as e:  # an op the capture cannot take: run eagerly, same math
                warn(f"{what}: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
                use_graph = False
                _restore(params, init)
                opt = torch.optim.AdamW(groups, fused=on_gpu)
                step = _eager_step(loss_fn, params, opt, cfg.grad_clip)
        good, good_epoch, failure = init, 0, None
        for epoch in range(cfg.epochs):
            losses = [step(*inputs_of(j)).clone() for j in range(n)]
            values = torch.stack(losses).tolist() if losses else []  # the epoch's one host-device sync
            bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                failure = f"loss {values[bad]} at epoch {epoch + 1}, window {bad}"
            else:
                res.steps += n
                res.last_loss = values[-1] if values else res.last_loss
                snap = _snapshot(params)
                if not all(torch.isfinite(s).all() for s in snap):
                    failure = f"non-finite parameters after epoch {epoch + 1}"
            if failure is not None:
                break
            good, good_epoch = snap, epoch + 1
        del opt, step
        if failure is None:
            break
        if attempt < cfg.max_retries:
            warn(f"{what}: {failure}; restarting it with learning rates ×{lr_scale * 0.1:g}")
            _restore(params, init)
            lr_scale *= 0.1
            res.retries += 1
        else:
            warn(f"{what}: {failure} again; keeping its last finite state (epoch {good_epoch} of that attempt)")
            _restore(params, good)
            res.fell_back = True
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return res


def _eager_step(loss_fn: Callable[..., Tensor], params: list[nn.Parameter], opt: torch.optim.Optimizer,
                grad_clip: float | None) -> Callable[..., Tensor]:
    def step(*inputs: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*inputs)
        loss.backward()
        w = dist.world_size()
        if w > 1:  # data-parallel: one step is the mean over the processes' windows (a batch of w windows)
            (total,) = dist.all_reduce_grads_(params, [float(loss)])
            for p in params:
                p.grad.div_(w)
            loss = torch.tensor(total / w, device=loss.device)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------
# One block


@dataclass
class BlockResult:
    index: int
    loss_before: float
    loss_after: float
    seconds: float
    retries: int = 0
    fell_back: bool = False
    steps: int = 0
    resumed: bool = False
    train_seconds: float = 0.0  # of `seconds`, the optimisation steps (the rest: 3 forward passes per window)
    X_next: Windows | None = field(default=None, repr=False)

    def stats(self) -> dict:
        return {"block": self.index, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "seconds": round(self.seconds, 2), "retries": self.retries, "fell_back": self.fell_back,
                "steps": self.steps}


class _Captured(Exception):
    pass


def capture_input(block: nn.Module, name: str, x: Tensor, kwargs: dict) -> Tensor:
    """The tensor Linear `name` receives when the block runs on x (the rest of the block is skipped)."""
    box: list[Tensor] = []

    def hook(_m, inp):
        box.append(inp[0].detach())
        raise _Captured

    h = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        run_block(block, x, kwargs)
    except _Captured:
        pass
    finally:
        h.remove()
    return box[0]


def autocast_for(device: torch.device):
    """bf16 autocast on the GPU (block weights stay fp32, as METHODS.md §5 asks); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float())


@torch.no_grad()
def block_outputs(block: nn.Module, xs: Windows, kwargs: dict, device: torch.device, store: torch.device
                  ) -> Windows:
    out = Windows(store)
    for j in range(len(xs)):
        with autocast_for(device):
            out.append(run_block(block, xs.get(j, device), kwargs))
    return out


@torch.no_grad()
def block_loss(block: nn.Module, xs: Windows, targets: Windows, kwargs: dict, device: torch.device) -> float:
    total = []
    for j in range(len(xs)):
        with autocast_for(device):
            total.append(_mse(run_block(block, xs.get(j, device), kwargs), targets.get(j, device)))
    return dist.mean(torch.stack(total).sum().item() / max(len(xs), 1) if total else 0.0)


def calibrate_block(block: nn.Module, index: int, X: Windows, Xq: Windows, kwargs: dict, cfg: ApiqConfig,
                    device: torch.device, saved: dict[str, Tensor] | None = None,
                    warn: Callable[[str], None] = print, cuda_graphs: bool = True
                    ) -> tuple[BlockResult, dict[str, ClipLoraLinear]]:
    """Calibrate one block in place: its Linears end as finished ClipLoraLinear wrappers (mode "final"),
    Xq is overwritten with the block's quantized outputs, and result.X_next holds the fp outputs.

    With `saved` (γ, β, A, B of an earlier run, from the state dir) nothing is trained: the same
    finishing and propagation run on the loaded values, so a resumed run continues identically."""
    t0 = time.perf_counter()
    wrappers = wrap_block(block, cfg, index, device)
    n = len(X)
    set_mode(wrappers, "fp")
    T = block_outputs(block, X, kwargs, device, X.store)  # teacher, and the next block's X
    res = BlockResult(index, float("nan"), float("nan"), 0.0, X_next=T)
    if saved is not None:
        for name, w in wrappers.items():
            w.load(name, saved)
        res.resumed = True
    elif cfg.epochs > 0:
        T_aug = block_outputs(block, Xq, kwargs, device, X.store) if cfg.aug_loss else None
        set_mode(wrappers, "quant")
        res.loss_before = block_loss(block, Xq, T, kwargs, device)
        what = f"block {index}"
        t_train = time.perf_counter()
        if cfg.layerwise:
            fitted = _fit_layerwise(block, wrappers, X, Xq, kwargs, cfg, device, warn, what, cuda_graphs)
        else:
            fitted = _fit_blockwise(block, list(wrappers.values()), Xq, T, T_aug, kwargs, cfg, device, warn, what,
                                     cuda_graphs)
        res.retries, res.fell_back, res.steps = fitted.retries, fitted.fell_back, fitted.steps
        res.train_seconds = time.perf_counter() - t_train
        del T_aug
    for w in wrappers.values():
        if w.W_hat is None:
            w.finish()
    set_mode(wrappers, "final")
    after = []
    with torch.no_grad():
        for j in range(n):
            with autocast_for(device):
                out = run_block(block, Xq.get(j, device), kwargs)
                after.append(_mse(out, T.get(j, device)))
            Xq.put(j, out)
    res.loss_after = dist.mean(torch.stack(after).sum().item() / max(n, 1) if after else 0.0)
    if cfg.epochs == 0 and saved is None:
        res.loss_before = res.loss_after
    res.seconds = time.perf_counter() - t0
    return res, wrappers


def _fit_blockwise(block, wrappers, Xq, T, T_aug, kwargs, cfg, device, warn, what, cuda_graphs) -> FitResult:
    def inputs_of(j: int) -> tuple[Tensor, ...]:
        extra = (T_aug.get(j, device),) if T_aug is not None else ()
        return (Xq.get(j, device), T.get(j, device), *extra)

    def loss_fn(x: Tensor, target: Tensor, target_aug: Tensor | None = None) -> Tensor:
        with autocast_for(device):
            out = run_block(block, x, kwargs)
        loss = _mse(out, target)
        if target_aug is not None:
            loss = loss + _mse(out, target_aug)
        return loss

    return fit(wrappers, inputs_of, loss_fn, len(Xq), cfg, warn, what, cuda_graphs)


def _fit_layerwise(block, wrappers, X, Xq, kwargs, cfg, device, warn, what, cuda_graphs) -> FitResult:
    """ApiQ-lw: the Linears in input order; each group of layers reading one tensor is fitted on its own."""
    total = FitResult(last_loss=float("nan"))
    set_mode(wrappers, "fp")
    groups = input_groups(block, wrappers, X.get(0, device), kwargs)
    n = len(X)
    for group in groups:
        mods = [wrappers[name] for name in group]
        # Teacher: the fp block on X up to this group's input. Keep whichever is smaller: the input
        # (teacher outputs recomputed per step) or the outputs of every layer of the group.
        set_mode(wrappers, "fp")
        keep_outputs = sum(m.out_features for m in mods) <= mods[0].in_features
        teach = Windows(X.store)
        with torch.no_grad():
            for j in range(n):
                with autocast_for(device):
                    x_in = capture_input(block, group[0], X.get(j, device), kwargs)
                    teach.append(torch.cat([m(x_in) for m in mods], dim=-1) if keep_outputs else x_in)
        # Student input: the finished layers of the quantized block on Xq.
        set_mode(wrappers, "final")
        xin_q = Windows(X.store)
        with torch.no_grad():
            for j in range(n):
                with autocast_for(device):
                    xin_q.append(capture_input(block, group[0], Xq.get(j, device), kwargs))
        for m in mods:
            m.mode = "quant"
        splits = [m.out_features for m in mods]

        def inputs_of(j: int, teach=teach, xin_q=xin_q) -> tuple[Tensor, ...]:
            return xin_q.get(j, device), teach.get(j, device)

        def loss_fn(xq: Tensor, teacher: Tensor, mods=mods, keep_outputs=keep_outputs, splits=splits) -> Tensor:
            with autocast_for(device):
                with torch.no_grad():
                    if keep_outputs:
                        targets = teacher.split(splits, dim=-1)
                    else:
                        targets = [F.linear(teacher, m.weight, m.bias) for m in mods]
                    aug = [F.linear(xq, m.weight, m.bias) for m in mods] if cfg.aug_loss else None
                loss = 0.0
                for k, m in enumerate(mods):
                    out = m(xq)
                    loss = loss + _mse(out, targets[k])
                    if aug is not None:
                        loss = loss + _mse(out, aug[k])
            return loss

        r = fit(mods, inputs_of, loss_fn, n, cfg, warn, f"{what} {'+'.join(group)}", cuda_graphs)
        total.steps += r.steps
        total.retries += r.retries
        total.fell_back |= r.fell_back
        for m in mods:
            m.finish()
        del teach, xin_q
    return total


def install(block: nn.Module, wrappers: dict[str, ClipLoraLinear]) -> None:
    """Swap the finished wrappers for the modules the checkpoint keeps."""
    for name, w in wrappers.items():
        set_module(block, name, w.export())


# ---------------------------------------------------------------------------------------------
# Resumable state: OUTPUT.apiq-state/


class CalibState:
    """state.json (settings key + per-block stats) and block-NNNN.safetensors (γ, β, A, B) per
    finished block, each written atomically: the block file first, then the json naming it."""

    def __init__(self, path: Path | None, key: dict, resume: bool, warn: Callable[[str], None]) -> None:
        self.path, self.key = path, key
        self.blocks: dict[str, dict] = {}
        if path is None:
            return
        manifest = path / "state.json"
        if resume and manifest.is_file():
            try:
                st = json.loads(manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise QtoolError(f"{manifest}: corrupted ({e}); delete {path} to start over") from None
            if st.get("format") != STATE_FORMAT or st.get("version") != STATE_VERSION:
                raise QtoolError(f"{path} is not a qtool {STATE_FORMAT} v{STATE_VERSION} directory")
            if st.get("key") != key:
                diff = sorted(k for k in set(key) | set(st.get("key", {})) if key.get(k) != st["key"].get(k))
                raise QtoolError(f"{path} was made with other settings ({', '.join(diff)} differ): run the same "
                                 f"command as the interrupted one, or drop --resume to start over")
            self.blocks = st.get("blocks", {})
            return
        if resume:
            warn(f"--resume: no state in {path}; starting from the first block")
        if not dist.is_main():  # data-parallel calibration: rank 0 writes the state
            return
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        self._write()

    def _write(self) -> None:
        with atomic_file(self.path / "state.json") as tmp:
            tmp.write_text(json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "key": self.key,
                                       "blocks": self.blocks}, indent=1) + "\n")

    def _file(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def load(self, index: int) -> tuple[dict[str, Tensor], dict] | None:
        if self.path is None or str(index) not in self.blocks or not self._file(index).is_file():
            return None
        return load_file(str(self._file(index))), self.blocks[str(index)]

    def save(self, index: int, tensors: dict[str, Tensor], stats: dict) -> None:
        if self.path is None or not dist.is_main():
            return
        with atomic_file(self._file(index)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "qtool.kind": STATE_FORMAT})
        self.blocks[str(index)] = stats
        self._write()


def model_identity(model: nn.Module, calib: Tensor) -> dict:
    """Cheap identity of the source model and calibration windows (for --resume): a hash of the token
    ids, and of the first row of the embedding and of every block's Linear weights."""
    h = hashlib.sha256()
    emb = model.get_input_embeddings().weight
    h.update(emb[0].detach().float().cpu().numpy().tobytes())
    stream = getattr(model, "qtool_stream", None)  # streamed: the blocks are not loaded yet
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            h.update(name.encode())
            row = (stream.reader.first_row(f"{stream.layers_prefix}.{i}.{name}.weight") if stream is not None
                   else lin.weight[0])
            h.update(row.detach().float().cpu().numpy().tobytes())
    calib_hash = hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"model": h.hexdigest(), "calib": calib_hash, "calib_shape": list(calib.shape)}


# ---------------------------------------------------------------------------------------------
# Whole model


def calibrate_model(model: nn.Module, opts: QuantizeOptions, calib: Tensor, method: str) -> dict:
    cfg = make_config(method, opts)
    device = opts.device
    console = Console(file=sys.stderr, highlight=False)
    layers = decoder_layers(model)
    if cfg.rank and not any(n.rpartition(".")[2] in cfg.targets for blk in layers for n in block_linears(blk)):
        raise QtoolError(f"no layer of the blocks matches the LoRA targets {', '.join(cfg.targets)}")
    state = CalibState(opts.apiq.state_dir, {**cfg.key(), **model_identity(model, calib), "n_blocks": len(layers)},
                       opts.apiq.resume, lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
    store = choose_store(opts.apiq.offload, device, activation_bytes(model, calib, cfg))
    use_cache = model.config.use_cache
    model.config.use_cache = False
    if calib.shape[0] % dist.world_size():  # every process takes as many steps as the others
        raise QtoolError(f"{dist.world_size()} processes do not divide the {calib.shape[0]} calibration windows")
    inputs = capture_inputs(model, dist.windows(calib), device,
                            store=torch.device("cpu") if store.type == "cpu" else store)
    X = Windows(store, inputs.x)
    Xq = Windows(store, X)
    del inputs.x[:]
    results: list[BlockResult] = []
    with progress_bar(opts.quiet) as bar:
        out = bar.console if not opts.quiet else console

        def warn(msg: str) -> None:
            out.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)

        task = bar.add_task(f"{method} blocks", total=len(layers))
        for i, block in iter_blocks(model):
            loaded = state.load(i)
            res, wrappers = calibrate_block(block, i, X, Xq, inputs.kwargs[i], cfg, device,
                                            loaded[0] if loaded else None, warn, opts.apiq.cuda_graphs)
            if loaded:
                old = loaded[1]
                res.loss_before, res.retries, res.fell_back, res.steps = (
                    old["loss_before"], old["retries"], old["fell_back"], old["steps"])
                res.seconds = old["seconds"]
            else:
                state.save(i, {k: v for name, w in wrappers.items() for k, v in w.state(name).items()}, res.stats())
            install(block, wrappers)
            block.to("cpu")
            X = res.X_next
            res.X_next = None
            del wrappers
            results.append(res)
            if not opts.quiet:
                out.print(f"block {i:>3}/{len(layers)}: loss {res.loss_before:.4g} → {res.loss_after:.4g} "
                          f"({res.seconds:.1f} s{', resumed' if res.resumed else ''}"
                          f"{f', {res.retries} restart(s)' if res.retries else ''})", soft_wrap=True)
            bar.update(task, advance=1, info=f"block {i} loss {res.loss_after:.3g}")
    del X, Xq
    if opts.quantize_lm_head:
        quantize_lm_head(model, opts)  # RTN, as ApiQ and OmniQuant leave the head in fp
    model.config.use_cache = use_cache
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "epochs": cfg.epochs, "lr_clip": cfg.lr_clip, "lr_lora": cfg.lr_lora if cfg.rank else None,
        "weight_decay": cfg.weight_decay, "aug_loss": cfg.aug_loss, "lora_rank": cfg.rank,
        "lora_alpha": cfg.alpha if cfg.rank else None, "lora_targets": ",".join(cfg.targets) if cfg.rank else None,
        "block_loss_before": sum(r.loss_before for r in results) / max(len(results), 1),
        "block_loss_after": sum(r.loss_after for r in results) / max(len(results), 1),
        "nan_restarts": sum(r.retries for r in results),
        "blocks": [r.stats() for r in results],
        # Run-dependent facts in a nested dict: the pipeline copies only top-level scalars into the
        # adapter's metadata, so a resumed run writes the same adapter bytes as an uninterrupted one.
        "run": {"resumed_blocks": sum(r.resumed for r in results), "activations_on": store.type},
    }


@register("apiq-bw", needs_calibration=True)
def quantize_apiq_bw(model: nn.Module, opts: QuantizeOptions, calib: Tensor) -> dict:
    return calibrate_model(model, opts, calib, "apiq-bw")


@register("apiq-lw", needs_calibration=True)
def quantize_apiq_lw(model: nn.Module, opts: QuantizeOptions, calib: Tensor) -> dict:
    return calibrate_model(model, opts, calib, "apiq-lw")


@register("omniquant", needs_calibration=True)
def quantize_omniquant(model: nn.Module, opts: QuantizeOptions, calib: Tensor) -> dict:
    return calibrate_model(model, opts, calib, "omniquant")
