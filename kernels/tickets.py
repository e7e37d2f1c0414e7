"""Zeroed int32 counters for the split-K reduction done by the last program of each row block.

A split-K GEMV used to end in two more kernels per layer (the partials' sum, then the cast),
each a launch and a pass over the partials: ~224 extra launches per decoded token for a
7B model. Instead every program stores its fp32 partial and takes a ticket from its row
block's counter; the program that draws the last ticket sums the partials in split order
(the same order every time) and writes y, then puts the counter back to 0. So the counters
must start at 0 and are left at 0: one region of a per-device arena per CUDA stream (two
launches on one stream never overlap; a graph replays on the region of the stream it was
captured on). The arena is allocated outside graph capture (a warm-up launch precedes every
capture); when it does not exist yet during a capture, or every region is taken, the call
gets fresh zeros (a memset; inside a capture it lands in the graph's pool and is never
reused outside it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

REGIONS = 16
PER_REGION = 16384  # row blocks × row groups of one launch (28672 / 8 rows = 3584 at most today)

_arena: dict[int, Tensor] = {}
_region: dict[tuple[int, int], int] = {}


def tickets(device: torch.device, n: int) -> Tensor:
    """n int32 counters at 0 on `device`, which the kernel must leave at 0."""
    if device.type != "cuda" or n > PER_REGION:
        return torch.zeros(n, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    capturing = torch.cuda.is_current_stream_capturing()
    arena = _arena.get(index)
    if arena is None:
        if capturing:
            return torch.zeros(n, dtype=torch.int32, device=device)
        arena = _arena[index] = torch.zeros(REGIONS * PER_REGION, dtype=torch.int32, device=device)
    key = (index, torch.cuda.current_stream(device).cuda_stream)
    region = _region.get(key)
    if region is None:
        taken = sum(1 for k in _region if k[0] == index)
        if taken >= REGIONS:
            return torch.zeros(n, dtype=torch.int32, device=device)
        region = _region[key] = taken
    return arena[region * PER_REGION: region * PER_REGION + n]


def fused_split_k() -> bool:
    """Whether split-K kernels reduce their partials in their last program (default) rather
    than in two more kernels (sum, cast); QTOOL_FUSED_SPLIT_K=0 restores the latter, for A/B
    runs. Read on every call."""
    return os.environ.get("QTOOL_FUSED_SPLIT_K", "1") != "0"


@triton.jit
def reduce_if_last(parts, stride_os, ys, mask, cnt_ptr, b_ptrs, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Called by every program after storing its fp32 partials: `parts` points at split 0's
    partials of this program's output tile, `ys` at y (same shape), `b_ptrs` at the bias
    broadcast to it. The program that takes the last ticket of `cnt_ptr` adds the SPLIT_K
    partials in split order (the same sum whichever program is last), then the bias, stores
    y in its dtype and puts the counter back to 0."""
    # every thread's partials are stored before the ticket is taken; the ticket's release
    # makes them visible GPU-wide and the last ticket's acquire sees all SPLIT_K of them
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT_K - 1:
        y = tl.load(parts, mask=mask, other=0.0, cache_modifier=".cg")
        for k in range(1, SPLIT_K):  # .cg: from L2, where the other SMs' partials are
            y += tl.load(parts + k * stride_os, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y += tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ys, y.to(ys.dtype.element_ty), mask=mask)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def store_nm_tile(out_ptr, y_ptr, cnt_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, pid_n, pid_k, pid_m,
                  stride_os, stride_om, stride_ym,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr):
    """The epilogue of a program whose fp32 tile `acc` is [BLOCK_N, BLOCK_M] (rows of W ×
    rows of x, the skinny kernels' Cᵀ): SPLIT_K = 1 stores y = acc (+ bias) at out_ptr;
    otherwise the fp32 partial goes to out_ptr [SPLIT_K, M, N] and, with FUSED, the last
    program of the block finishes y at y_ptr (reduce_if_last)."""
    tile = offs_m[None, :] * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_os + tile, acc, mask=mask)  # fp32 partials
        if FUSED:
            reduce_if_last(out_ptr + tile, stride_os, y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], mask,
                           cnt_ptr + pid_m * tl.num_programs(0) + pid_n, b_ptr + offs_n[:, None] + offs_m[None, :] * 0,
                           SPLIT_K, HAS_BIAS)
