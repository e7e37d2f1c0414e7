"""Data parallelism across processes started by accelerate's launcher; no-ops in one process.

The launcher (`accelerate launch`, or `qtool finetune --num-processes N`, which calls it)
sets RANK / WORLD_SIZE / LOCAL_RANK in each process's environment. `init` joins the
process group through accelerate's `PartialState` (gloo on CPU, NCCL on CUDA, with the
process's own GPU made current). Every collective here returns at once when the world is
one process, so the single-process code path does exactly what it did before.

Docs: docs/distributed.md.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from qtool.errors import QtoolError


def launched() -> bool:
    """True in a process started by a launcher for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cpu: bool) -> None:
    """Join the process group (once) when launched; `cpu` picks gloo over NCCL."""
    if not launched() or torch.distributed.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=cpu)


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    """This process's rank (from the launcher's environment before the group is joined)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Only this process writes files (outputs, training state, checkpoints)."""
    return rank() == 0


def _comm_device(t: Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors (and CUDA ones, through the host)."""
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_(t: Tensor) -> Tensor:
    """Sum `t` over all processes, in place; the result is the same on every process."""
    if world_size() == 1:
        return t
    dev = _comm_device(t)
    if dev == t.device and t.is_contiguous():
        torch.distributed.all_reduce(t)
    else:
        buf = t.to(dev).contiguous()
        torch.distributed.all_reduce(buf)
        t.copy_(buf)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite `t` with process `src`'s value, in place."""
    if world_size() == 1:
        return t
    dev = _comm_device(t)
    if dev == t.device and t.is_contiguous():
        torch.distributed.broadcast(t, src)
    else:
        buf = t.to(dev).contiguous()
        torch.distributed.broadcast(buf, src)
        t.copy_(buf)
    return t


def all_reduce_grads_(params: list[torch.nn.Parameter], extra: list[float] | None = None) -> list[float]:
    """Sum the gradients of `params` over all processes (one flat fp32 buffer, one collective),
    and `extra` scalars with them; returns the summed scalars. A missing grad counts as zero."""
    extra = list(extra or [])
    if world_size() == 1:
        return extra
    dev = params[0].device
    parts = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=dev)
             for p in params]
    flat = torch.cat(parts + [torch.tensor(extra, dtype=torch.float32, device=dev)])
    all_reduce_(flat)
    pos = 0
    for p in params:
        n = p.numel()
        g = flat[pos:pos + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        pos += n
    return flat[pos:].tolist()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a launched command, so that torch does not warn)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(n: int) -> range:
    """This process's contiguous share of n items (n must be divisible by the world size)."""
    w, r = world_size(), rank()
    per = n // w
    return range(r * per, (r + 1) * per)


def windows(calib: Tensor) -> Tensor:
    """This process's calibration windows: every world-th one, starting at its rank."""
    w = world_size()
    if w == 1:
        return calib
    if calib.shape[0] < w:
        raise QtoolError(f"{calib.shape[0]} calibration windows cannot be shared by {w} processes")
    return calib[rank()::w]


def merge_mean_(H: Tensor, n: int) -> tuple[Tensor, int]:
    """Each process holds the mean H of its own n samples; returns the mean over all processes'
    samples (sum of H·n over processes, divided by the total n), the same on every process."""
    if world_size() == 1:
        return H, n
    total = all_reduce_(torch.tensor([float(n)], dtype=torch.float64, device=H.device))
    H.mul_(n)
    all_reduce_(H)
    m = int(total.item())
    H.div_(m)
    return H, m


def same_everywhere_(*tensors: Tensor | None) -> None:
    """Give every process rank 0's values (a result each process computed, made bit-identical)."""
    for t in tensors:
        if t is not None:
            broadcast_(t, 0)


def mean(x: float) -> float:
    """The mean of a per-process number over the processes (each process weighs the same)."""
    w = world_size()
    if w == 1:
        return x
    return all_reduce_(torch.tensor([x], dtype=torch.float64)).item() / w


def total(x: float) -> float:
    """The sum of a per-process number over the processes."""
    if world_size() == 1:
        return x
    return all_reduce_(torch.tensor([x], dtype=torch.float64)).item()
