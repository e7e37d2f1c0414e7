"""PagedAdamW: torch.optim.AdamW whose moments live in pinned host memory, not on the GPU.

Between steps the GPU holds no optimizer state. In `step()` the moments of the CUDA
parameters travel through a fixed pool of SLOTS staging buffers in buckets of
`bucket_bytes` (exp_avg and exp_avg_sq of up to bucket_bytes / 8 elements; a large
parameter is split across buckets):

    h2d stream      load b0 | load b1 | load b2 | load b3 ...
    compute stream            upd b0  | upd b1  | upd b2  ...
    d2h stream                          store b0| store b1...

With three slots, the load of bucket i+1, the update of bucket i and the store of bucket
i-1 use different buffers and run at once; the load of bucket i+3 waits (by event) for
the store of bucket i, which frees the slot. Parameters and gradients are only touched on
the compute stream, so the caller's stream order is kept. `step()` returns once the last
store has landed in host memory, so `optimizer.state` can be read (saved, restored) by the
CPU at any time outside `step()`.

Constant GPU cost: SLOTS * bucket_bytes for the pool (12 MiB at the default), plus
transient bucket-sized temporaries during the update. CPU parameters keep plain CPU state
and are updated in place (no staging), bit-exact with torch.optim.AdamW(foreach=False).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.errors import QtoolError

SLOTS = 3  # two would make the load of bucket i+1 wait for the store of bucket i-1
BUCKET_BYTES = 4 << 20
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    """Elements [lo, hi) of work item `index` (flattened), at `off` in its bucket's buffer."""

    index: int
    lo: int
    hi: int
    off: int


def plan_buckets(numels: list[int], bucket_elems: int) -> list[list[Piece]]:
    """Pack flattened tensors of `numels` elements, in order, into buckets of at most bucket_elems."""
    if bucket_elems < 1:
        raise ValueError("bucket_elems must be positive")
    buckets: list[list[Piece]] = [[]]
    used = 0
    for index, n in enumerate(numels):
        lo = 0
        while lo < n:
            if used == bucket_elems:
                buckets.append([])
                used = 0
            take = min(n - lo, bucket_elems - used)
            buckets[-1].append(Piece(index, lo, lo + take, used))
            used += take
            lo += take
    return [b for b in buckets if b]


def adamw_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[float], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """torch.optim.AdamW's single-tensor update, in place, op for op (so CPU results are bit-exact).

    `steps` are the step counts after this step's increment, one per tensor.
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / (1 - beta1**s)) for s in steps])


@dataclass
class _Item:
    """One parameter's share of an update: views of the param, its grad and its moments."""

    group: dict
    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: float


def _apply(items: list[_Item]) -> None:
    """Run adamw_update per parameter group, in fp32 (low-precision params are updated on an fp32 copy)."""
    by_group: dict[int, list[_Item]] = {}
    for it in items:
        by_group.setdefault(id(it.group), []).append(it)
    for rows in by_group.values():
        group = rows[0].group
        params32 = [it.param.float() for it in rows]
        beta1, beta2 = group["betas"]
        adamw_update(params32, [it.grad.float() for it in rows], [it.exp_avg for it in rows],
                     [it.exp_avg_sq for it in rows], [it.step for it in rows], lr=float(group["lr"]),
                     beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        for it, p32 in zip(rows, params32, strict=True):
            if p32 is not it.param:
                it.param.copy_(p32)


def _staged_item(it: _Item, pc: Piece, buf: Tensor) -> _Item:
    """The piece of `it` that bucket buffer `buf` holds: param and grad slices, moments in the buffer."""
    n = pc.hi - pc.lo
    return _Item(it.group, it.param.view(-1)[pc.lo:pc.hi], it.grad.reshape(-1)[pc.lo:pc.hi],
                 buf[0, pc.off:pc.off + n], buf[1, pc.off:pc.off + n], it.step)


class _Staging:
    """The staging pool with synchronous copies: CPU stand-in for _CudaStaging (same calls, same buffers)."""

    def __init__(self, device: torch.device, bucket_elems: int) -> None:
        self.device = device
        self.bucket_elems = bucket_elems
        # Row 0 holds a bucket's exp_avg, row 1 its exp_avg_sq.
        self.buffers = [torch.empty(2, bucket_elems, device=device) for _ in range(SLOTS)]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def load(self, slot: int, copies: list[tuple[Tensor, Tensor]]) -> None:
        for dst, src in copies:
            dst.copy_(src)

    def acquire(self, slot: int) -> None:
        pass

    def store(self, slot: int, copies: list[tuple[Tensor, Tensor]]) -> None:
        for dst, src in copies:
            dst.copy_(src)

    def finish(self) -> None:
        pass


class _CudaStaging(_Staging):
    """Loads on one side stream, stores on another, the update on the caller's stream; events order the slots."""

    def __init__(self, device: torch.device, bucket_elems: int) -> None:
        super().__init__(device, bucket_elems)
        self.compute = torch.cuda.current_stream(device)
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        # The pool's blocks may have just been freed by kernels still queued on the compute stream.
        self.h2d.wait_stream(self.compute)
        self.d2h.wait_stream(self.compute)
        self.loaded = [torch.cuda.Event() for _ in range(SLOTS)]
        self.updated = [torch.cuda.Event() for _ in range(SLOTS)]
        self.stored = [torch.cuda.Event() for _ in range(SLOTS)]

    def load(self, slot: int, copies: list[tuple[Tensor, Tensor]]) -> None:
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(self.stored[slot])  # the slot's previous bucket is back on the host
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            self.loaded[slot].record(self.h2d)

    def acquire(self, slot: int) -> None:
        self.compute = torch.cuda.current_stream(self.device)
        self.compute.wait_event(self.loaded[slot])

    def store(self, slot: int, copies: list[tuple[Tensor, Tensor]]) -> None:
        self.updated[slot].record(self.compute)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(self.updated[slot])
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            self.stored[slot].record(self.d2h)

    def finish(self) -> None:
        # Every store depends on its update and load, so this one wait covers the whole step.
        self.d2h.synchronize()


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with its moments in (pinned) host memory.

    State per parameter, as torch.optim.AdamW's non-fused path: `step` (a CPU float32 scalar),
    `exp_avg`, `exp_avg_sq` (float32 CPU tensors shaped like the parameter, pinned when the
    parameter is on CUDA). The update runs in fp32 whatever the parameter dtype.
    `stage_cpu_params` sends CPU parameters through the staging pipeline too (synchronous
    copies), so the bucketing can be tested without a GPU.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, bucket_bytes: int = BUCKET_BYTES, stage_cpu_params: bool = False) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if bucket_bytes < 8:
            raise ValueError("bucket_bytes must hold at least one element of both moments (8 bytes)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.bucket_elems = bucket_bytes // 8  # two fp32 moments per element
        self.stage_cpu_params = stage_cpu_params
        self._staging: dict[torch.device, _Staging] = {}

    def staging_bytes(self) -> int:
        """Bytes the fixed staging pools hold (GPU memory; host memory for staged CPU params); 0 before a step."""
        return sum(pool.nbytes for pool in self._staging.values())

    def _paged(self, p: Tensor) -> bool:
        return p.device.type == "cuda" or self.stage_cpu_params

    def _zeros_like_host(self, p: Tensor) -> Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.device.type == "cuda")

    def load_param_state(self, p: Tensor, saved: dict[str, Tensor]) -> None:
        """Install a saved state for `p` (as optimizer_state wrote it), moments in (pinned) host memory."""
        missing = [k for k in ("step", *MOMENTS) if k not in saved]
        if missing:
            raise QtoolError(f"saved optimizer state lacks {missing[0]!r} (made by another optimizer?)")
        state = {"step": saved["step"].detach().to("cpu", torch.float32).clone().reshape(())}
        for k in MOMENTS:
            if tuple(saved[k].shape) != tuple(p.shape):
                raise QtoolError(f"saved optimizer state {k} has shape {tuple(saved[k].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            state[k] = self._zeros_like_host(p)
            state[k].copy_(saved[k])
        self.state[p] = state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's version would first move every moment to its parameter's device: the
        # whole state on the GPU at once, the spike this optimizer exists to avoid.
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            if i in state_dict["state"]:
                self.load_param_state(p, state_dict["state"][i])

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update({"step": torch.tensor(0.0, dtype=torch.float32),
                          **{k: self._zeros_like_host(p) for k in MOMENTS}})
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        direct: list[_Item] = []
        paged: dict[torch.device, list[_Item]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("PagedAdamW does not support complex parameters")
                state = self._state(p)
                state["step"] += 1
                it = _Item(group, p, p.grad, state["exp_avg"], state["exp_avg_sq"], float(state["step"]))
                (paged.setdefault(p.device, []) if self._paged(p) else direct).append(it)
        if direct:
            _apply(direct)
        pools = [self._page(device, items) for device, items in paged.items()]
        for pool in pools:
            pool.finish()
        return loss

    def _pool(self, device: torch.device) -> _Staging:
        if device not in self._staging:
            cls = _CudaStaging if device.type == "cuda" else _Staging
            self._staging[device] = cls(device, self.bucket_elems)
        return self._staging[device]

    def _page(self, device: torch.device, items: list[_Item]) -> _Staging:
        """Enqueue the bucketed load / update / store pipeline for the items on one device."""
        for it in items:
            if not it.param.is_contiguous():
                raise RuntimeError("PagedAdamW needs contiguous parameters")
        pool = self._pool(device)
        buckets = plan_buckets([it.param.numel() for it in items], pool.bucket_elems)

        def copies(bucket: list[Piece], buf: Tensor, to_gpu: bool) -> list[tuple[Tensor, Tensor]]:
            out = []
            for pc in bucket:
                it = items[pc.index]
                for row, host in enumerate((it.exp_avg, it.exp_avg_sq)):
                    staged = buf[row, pc.off:pc.off + pc.hi - pc.lo]
                    hosted = host.view(-1)[pc.lo:pc.hi]
                    out.append((staged, hosted) if to_gpu else (hosted, staged))
            return out

        def load(i: int) -> None:
            pool.load(i % SLOTS, copies(buckets[i], pool.buffers[i % SLOTS], True))

        if buckets:
            load(0)
        for i, bucket in enumerate(buckets):
            if i + 1 < len(buckets):
                load(i + 1)
            slot = i % SLOTS
            buf = pool.buffers[slot]
            pool.acquire(slot)
            _apply([_staged_item(items[pc.index], pc, buf) for pc in bucket])
            pool.store(slot, copies(bucket, buf, False))
        return pool
