"""Attention of one new token over a static KV cache, reading only the valid prefix (split-KV).

A decode step's attention is memory-bound: it reads the cache once. With a static cache
of T slots and the token at position p, only slots 0..p hold keys; SDPA over the whole
cache with a mask reads all T, and its kernels spread the work over batch × heads only
(32 programs for a 7B model at batch 1, on 132 SMs). Here the valid prefix is cut into
chunks ("flash-decoding", Dao et al. 2023): program (b·h, s) reduces chunk s of head h to
its running max m, sum l = Σ exp(score − m) and unnormalised output acc = Σ exp(score − m) v;
the head's last chunk to finish (a ticket, as the GEMVs' split-K: tickets.py) merges them:
out = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} l_s.
Chunks past p return at once, so the bytes read follow p, not T.

The position is a device tensor (CUDA graphs replay the step with a new p): the chunk size
is fixed by T and the grid, and each program reads p to find its bounds. Grouped-query
attention: head h reads kv head h // (H / Hkv).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from qtool_kernels.pdl import pdl_mode, pdl_wait
from qtool_kernels.tickets import fused_split_k, tickets
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, out_ptr, pid_bh, n, H, S, stride_ob, stride_oh, D: tl.constexpr,
           S_P2: tl.constexpr, CG: tl.constexpr):
    """out of head pid_bh from its first n chunks' (m, l, acc); CG: read them from L2 (.cg),
    where other SMs' stores are (the ticketed merge)."""
    s = tl.arange(0, S_P2)
    ok = s < n
    row = pid_bh * S + s
    d = tl.arange(0, D)
    if CG:
        m = tl.load(m_ptr + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(l_ptr + row, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
    else:
        m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
        lsum = tl.load(l_ptr + row, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.where(ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    b = pid_bh // H
    h = pid_bh % H
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, cnt_ptr,
                  H, GROUP, T, CHUNK, S, qk_scale,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                  stride_ob, stride_oh,
                  D: tl.constexpr, BLOCK_T: tl.constexpr, S_P2: tl.constexpr, FUSED: tl.constexpr,
                  PDL: tl.constexpr):
    if PDL > 0:  # q and the new token's k/v come from the kernel before: wait for it first
        pdl_wait()
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    last = tl.minimum(tl.load(pos_ptr).to(tl.int32), T - 1)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, last + 1)  # ≤ start for chunks past the position: no loop
    d = tl.arange(0, D)
    # the scale and log2(e) folded into q: exp2 of the scores is then the softmax's exp
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
    lsum = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < end
        # masked rows read as 0 and score −inf: slots past p may hold anything, NaN included
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        lsum = lsum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    if start <= last:
        row = pid_bh * S + pid_s
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, lsum)
        tl.store(acc_ptr + row * D + d, acc)
        if FUSED:  # the head's last chunk to finish merges (tickets.py: counters at 0, left at 0)
            n = last // CHUNK + 1
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if ticket == n - 1:
                _merge(m_ptr, l_ptr, acc_ptr, out_ptr, pid_bh, n, H, S, stride_ob, stride_oh, D, S_P2, True)
                tl.atomic_xchg(cnt_ptr + pid_bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr, H, T, CHUNK, S, stride_ob, stride_oh,
                  D: tl.constexpr, S_P2: tl.constexpr, PDL: tl.constexpr):
    if PDL > 0:
        pdl_wait()
    last = tl.minimum(tl.load(pos_ptr).to(tl.int32), T - 1)
    # chunks that hold valid slots; the others wrote nothing
    _merge(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0), last // CHUNK + 1, H, S, stride_ob, stride_oh, D,
           S_P2, False)


def chunking(T: int, bh: int, n_sm: int, block_t: int = 32, per_sm: int = 4) -> tuple[int, int]:
    """(chunk length, chunks per head): about `per_sm` programs per SM over the whole cache (so
    half that at half full), chunks of whole BLOCK_T blocks, at least one chunk per head."""
    want = max(1, min(triton.cdiv(per_sm * n_sm, bh), triton.cdiv(T, block_t)))
    chunk = block_t * triton.cdiv(triton.cdiv(T, want), block_t)
    return chunk, triton.cdiv(T, chunk)


def default_tile(bh: int, n_sm: int) -> tuple[int, int, int]:
    """(BLOCK_T, chunks per SM, warps) by heads in flight (scripts/bench/attention_probe.py, H100,
    2026-11-23: docs/kernels.md §Findings v13): batch 1 of a 7B model (32 heads) is
    latency-bound, many short chunks of 16 slots on one warp each; at batch 16 (512 heads)
    the heads alone fill the GPU and 128-slot tiles on 4 warps win."""
    return (128, 1, 4) if bh >= 2 * n_sm else (16, 8, 1)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, n_sm: int | None = None,
                     block_t: int | None = None, per_sm: int | None = None, num_warps: int | None = None,
                     fused: bool | None = None) -> Tensor:
    """softmax(q kᵀ / √D) v over cache slots 0..pos. q [B, H, 1, D]; k_cache, v_cache
    [B, Hkv, T, D] (H a multiple of Hkv, D a power of two, last dim contiguous); pos: a
    one-element integer tensor on q's device, ≥ 0 (slots past it are never read; pos ≥ T
    reads all T). Returns [B, H, 1, D] in q's dtype. block_t, per_sm (chunking), num_warps
    override default_tile; fused: the chunks merged by each head's last program (default,
    QTOOL_FUSED_SPLIT_K=0 turns it off) rather than by a second kernel."""
    B, H, one, D = q.shape
    _, Hkv, T, _ = k_cache.shape
    assert one == 1 and H % Hkv == 0 and D & (D - 1) == 0 and v_cache.shape == k_cache.shape
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1 and pos.numel() == 1
    if n_sm is None:
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    bt, ps, nw = default_tile(B * H, n_sm)
    block_t, per_sm, num_warps = block_t or bt, per_sm or ps, num_warps or nw
    fused = fused_split_k() if fused is None else fused
    chunk, S = chunking(T, B * H, n_sm, block_t, per_sm)
    pdl = min(pdl_mode(q.device), 1)  # launched early, waits before its first read
    m = torch.empty(B * H * S, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B * H * S, D, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    counters = tickets(q.device, B * H) if fused else m
    S_P2 = triton.next_power_of_2(S)
    _chunk_kernel[(B * H, S)](
        q, k_cache, v_cache, pos, m, lsum, acc, out, counters, H, H // Hkv, T, chunk, S, LOG2E / math.sqrt(D),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        D=D, BLOCK_T=block_t, S_P2=S_P2, FUSED=fused, PDL=pdl, num_warps=num_warps, launch_pdl=pdl > 0)
    if not fused:
        _merge_kernel[(B * H,)](m, lsum, acc, pos, out, H, T, chunk, S, out.stride(0), out.stride(1),
                                D=D, S_P2=S_P2, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return out


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """The same in float64 from the definition (the test's oracle)."""
    H, Hkv = q.shape[1], k_cache.shape[1]
    last = min(int(pos.item()), k_cache.shape[2] - 1)
    k = k_cache[:, :, : last + 1].double().repeat_interleave(H // Hkv, dim=1)
    v = v_cache[:, :, : last + 1].double().repeat_interleave(H // Hkv, dim=1)
    w = torch.softmax(q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


@torch.library.custom_op("qtool::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    # opaque to torch.compile: the launch wrapper's host logic stays out of the traced graph
    return decode_attention(q, k_cache, v_cache, pos)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos):
    return q.new_empty(q.shape)


def attend_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """decode_attention, as one custom op while torch.compile traces."""
    fn = _decode_attention_op if torch.compiler.is_compiling() else decode_attention
    return fn(q, k_cache, v_cache, pos)
