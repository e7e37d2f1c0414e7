"""Decode path on the CUDA cores: y = x · Ŵᵀ for 1–4 rows of x, no tensor cores.

Shapes as in skinny.py: x [M, K] fp16/bf16, qweight int32 [N, ceil(K/32)·b] (the stored
layout, read directly), scales [N, G] (any float dtype), zeros uint8 [N, G], bias [N] or
None -> y [M, N] in x's dtype. M is any size, but every BLOCK_M ≤ 4 rows re-read and
re-unpack the weights, so this is meant for M ≤ 4 (the dispatcher's GEMV_MAX_M).

Why not the tensor cores (skinny.py, v2): at M = 1 that kernel is bound by per-tile work
(wgmma waited every K tile, the unpacked tile round-trips through shared memory), not by
bytes. Here the whole product stays in registers: each program owns BLOCK_N rows and a
K slice; per K tile it loads the packed words once, turns every code into an exact fp32
q − z and multiply-adds it with x in fp32, so the work per code is a few ALU/FMA
instructions and nothing goes through shared memory.

Code -> fp32 without a shift or an int->float conversion (the budget is ~3 instructions
per code): masking a b-bit field of a word in place at bit t and OR-ing in the exponent
of 2^(23−t) gives the fp32 number 2^(23−t) + q exactly (the field is the low mantissa
bits of a number whose unit in the last place is 1). One AND-OR (a LOP3) per code, then
one subtraction of 2^(23−t) + z (exact: integers below 2^24) gives q − z, and one FFMA
multiplies it into the accumulator. Fields above mantissa bit 23−b are first brought down
by one shift of the whole word (w >> 16: one shift per word, not per code). The
constants 2^(23−t) + z cost one add per row and distinct t per tile. 3-bit codes (32 in
3 words, at every bit offset) are first aligned: the block's words shifted by 0, 1, 2 bits
and each again by 12 put every code at bit 0, 3, …, 18 of one of six words (_aligned3), so a
3-bit code costs one AND-OR too (codes 10 and 21 straddle two words: a few ops more).

Tiles over several groups (_gemv_groups_kernel, when BLOCK_K > group): the same per-code
work on a [BLOCK_N, groups, words per group] tile, so each program reads long runs of a few
rows. Measured on the H100 (docs/kernels.md §v5), the locality of a program's reads is what
separates this kernel from the copy bandwidth: the same kernel on a contiguous view of the
70B.down matrix is 1.3× faster at W4 and 2.2× at W3.

Layout: the codes are never reassembled into a [BLOCK_N, BLOCK_K] tile. Code j of every
word is a [BLOCK_N, words] tensor in the words' own layout, and x is loaded per code
position j as x[k0 + word·codes_per_word + j] ([1, words]: fewer elements than threads,
so Triton issues the load in that same layout instead of shuffling x through shared
memory); two positions share one 32-bit load of x when its rows are 4-byte aligned
(X_PAIRS). The accumulator is [BLOCK_N, words]: one FFMA chain per code, reduced over the
words (in-thread adds + a few shuffles) once per tile when grouped (the fp32 scale
multiplies each tile's row sums: BLOCK_K divides the group size), once at the end per
channel. Compiled for sm_90, W4 g128 M=1 (64 × 128 tile, 4 warps): 5.2 SASS instructions
per code in the K loop, of which 1.0 LOP3, 1.3 FADD, 1.0 FFMA and 1.0 for x (a 2-byte
load and a conversion per code position, shared by the 2 rows a thread holds).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from qtool_kernels import occupancy
from qtool_kernels._unpack import load3, load3_at
from qtool_kernels.occupancy import slots, split_k_one_wave, split_k_waves
from qtool_kernels.pdl import pdl_mode, pdl_wait
from qtool_kernels.skinny import (
    PER_CHANNEL,
    _num_sms,
    _tuned,
    group_constexpr,
    reference_skinny,
    split_k_buffers,
    split_k_result,
)
from qtool_kernels.tickets import reduce_if_last
from qtool_kernels.tiles import packed_geometry, words_per_tile
from torch import Tensor

__all__ = ["default_gemv_config", "default_h2_config", "gemv_matmul", "gemv_path", "reference_gemv",
           "tile_major_tile"]

MAX_BLOCK_M = 4  # rows of x per program; more rows re-unpack the weights in another program

_PER_CHANNEL = tl.constexpr(PER_CHANNEL)  # a jit function reads globals only as constexpr
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
reference_gemv = reference_skinny  # the same product: float64 x · Ŵᵀ (+ bias)


@triton.jit
def _field(w, zero, T: tl.constexpr, BITS: tl.constexpr):
    """The b-bit field at bits T… of w as the fp32 number 2^(23−T) + q (exact, T + b ≤ 23).

    `zero` is a runtime 0: the AND-OR takes one immediate and one register operand, and with
    both constants known ptxas re-materialises the mask into a register before every AND-OR
    (one extra MOV per code); mask + zero is computed once and stays in a register."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << T
    MAGIC: tl.constexpr = (150 - T) << 23
    return ((w & (zero + MASK)) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _qz(w, wh, zf, zero, S: tl.constexpr, BITS: tl.constexpr):
    """q − z (fp32, exact) of the code at bit S of w; wh = w >> 16 serves the high fields."""
    if S + BITS <= 23:
        T: tl.constexpr = S
        v = _field(w, zero, T, BITS)
    else:
        T: tl.constexpr = S - 16
        v = _field(wh, zero, T, BITS)
    return v - (zf + (1 << (23 - T)))


@triton.jit
def _aligned3(w0, w1, w2):
    """The words of 3-bit blocks shifted so that each one's codes sit at bits 0, 3, …, 27
    (word 1's codes start at bit 1, word 2's at bit 2), and again 12 bits lower: every code
    but the two straddling ones (10, 21) is then a field at T ∈ {0, 3, …, 18} of one of six
    words, so `_qz3` takes one AND-OR per code and the 2^(23−T) + z constants are 7 per row
    (a field at every bit offset would need a shift per code, or 21 constants)."""
    u1 = w1 >> 1  # arithmetic shifts: the fields are masked, the copied sign bits never show
    u2 = w2 >> 2
    return w0, w0 >> 12, u1, u1 >> 12, u2, u2 >> 12


@triton.jit
def _qz3(w0, w1, w2, u0, u0h, u1, u1h, u2, u2h, zf, zero, J: tl.constexpr):
    """q − z (fp32, exact) of 3-bit code J (0…31) of the blocks in words w0, w1, w2 (u…: _aligned3)."""
    if J == 10:  # bits 30, 31 of w0 and bit 0 of w1
        v = (((w0 >> 30) & 3) | ((w1 & 1) << 2) | 0x4B000000).to(tl.float32, bitcast=True)
        T: tl.constexpr = 0
    elif J == 21:  # bit 31 of w1 and bits 0, 1 of w2
        v = (((w1 >> 31) & 1) | ((w2 & 3) << 1) | 0x4B000000).to(tl.float32, bitcast=True)
        T: tl.constexpr = 0
    else:
        A: tl.constexpr = (3 * J) // 32
        S: tl.constexpr = 3 * J - 33 * A  # bit of the code in the aligned word
        if A == 0:
            lo = u0
            hi = u0h
        elif A == 1:
            lo = u1
            hi = u1h
        else:
            lo = u2
            hi = u2h
        if S <= 18:
            T: tl.constexpr = S
            v = _field(lo, zero, T, 3)
        else:
            T: tl.constexpr = S - 12
            v = _field(hi, zero, T, 3)
    return v - (zf + (1 << (23 - T)))


@triton.jit
def _x(xr, offs, kmask, MASK_K: tl.constexpr):
    """x at offs as fp32 [1, len]: one x value per word (or 3-bit block) of the tile, so the
    load has fewer elements than the program has threads and Triton issues it directly in
    the words' layout (a larger load would get its own layout and a shared-memory shuffle)."""
    if MASK_K:
        xv = tl.load(xr + offs, mask=kmask, other=0.0)
    else:
        xv = tl.load(xr + offs)
    return xv.to(tl.float32)[None, :]


@triton.jit
def _x2(xr, offs, K, MASK_K: tl.constexpr, X_PAIRS: tl.constexpr):
    """x at offs and offs + 1 (offs even) as two fp32 [1, len]. X_PAIRS (x 4-byte aligned, K
    even): one 32-bit load for both, halving the x loads, which at one row per thread and
    3 bits are a third of the K loop; the halves convert as `_x` does (fp16: HADD2.F32 reads
    either half of the register; bf16: a shift or a mask)."""
    if X_PAIRS:
        xw = xr.to(tl.pointer_type(tl.int32))
        if MASK_K:
            p = tl.load(xw + offs // 2, mask=offs < K, other=0)
        else:
            p = tl.load(xw + offs // 2)
        if xr.dtype.element_ty == tl.bfloat16:
            lo = (p << 16).to(tl.float32, bitcast=True)
            hi = (p & -65536).to(tl.float32, bitcast=True)
        elif _INTERPRET:  # no PTX on the CPU: the same conversion in Triton ops
            lo = p.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            # written as Triton ops, ptxas moves the high half down with a PRMT before its
            # conversion (+0.5 instructions per code at 3 bits); a cvt of each half of the
            # register is one HADD2.F32 each
            lo, hi = tl.inline_asm_elementwise(
                "{.reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h;}",
                "=r,=r,r", [p], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        return lo[None, :], hi[None, :]
    else:
        return _x(xr, offs, offs < K, MASK_K), _x(xr, offs + 1, offs + 1 < K, MASK_K)


@triton.jit
def _fma2(v, vb, xr, offs, K, a, MASK_K: tl.constexpr, X_PAIRS: tl.constexpr):
    xa, xb = _x2(xr, offs, K, MASK_K, X_PAIRS)
    return tl.fma(vb, xb, tl.fma(v, xa, a))


@triton.jit
def _fma_rows(v, vb, offs, K, x0, x1, x2, x3, a0, a1, a2, a3,
              BLOCK_M: tl.constexpr, MASK_K: tl.constexpr, X_PAIRS: tl.constexpr):
    """a_m += v · x_m[offs] + vb · x_m[offs + 1] for the BLOCK_M rows of x (row pointers
    x0…x3; offs even; past K, x reads as 0 when MASK_K): each code is unpacked once for
    all rows."""
    a0 = _fma2(v, vb, x0, offs, K, a0, MASK_K, X_PAIRS)
    if BLOCK_M > 1:
        a1 = _fma2(v, vb, x1, offs, K, a1, MASK_K, X_PAIRS)
    if BLOCK_M > 2:
        a2 = _fma2(v, vb, x2, offs, K, a2, MASK_K, X_PAIRS)
    if BLOCK_M > 3:
        a3 = _fma2(v, vb, x3, offs, K, a3, MASK_K, X_PAIRS)
    return a0, a1, a2, a3


@triton.jit
def _fma_tile(w0, w1, w2, zf, zero, xk, K, x0, x1, x2, x3, a0, a1, a2, a3, BITS: tl.constexpr,
              CPW: tl.constexpr, BLOCK_M: tl.constexpr, MASK_K: tl.constexpr, X_PAIRS: tl.constexpr):
    """a_m += Σ_j x_m[xk + j] · (q_j − z) over the CPW codes j of each word (3 bits: of each
    block in w0, w1, w2; otherwise w0 alone), two code positions at a time (`_fma_rows`)."""
    if BITS == 3:
        u0, u0h, u1, u1h, u2, u2h = _aligned3(w0, w1, w2)
        for j in tl.static_range(0, 32, 2):
            a0, a1, a2, a3 = _fma_rows(_qz3(w0, w1, w2, u0, u0h, u1, u1h, u2, u2h, zf, zero, j),
                                       _qz3(w0, w1, w2, u0, u0h, u1, u1h, u2, u2h, zf, zero, j + 1),
                                       xk + j, K, x0, x1, x2, x3, a0, a1, a2, a3, BLOCK_M, MASK_K, X_PAIRS)
    else:
        wh = w0 >> 16  # masked afterwards, so the arithmetic shift's sign bits never show
        for j in tl.static_range(0, CPW, 2):
            a0, a1, a2, a3 = _fma_rows(_qz(w0, wh, zf, zero, j * BITS, BITS),
                                       _qz(w0, wh, zf, zero, (j + 1) * BITS, BITS), xk + j, K,
                                       x0, x1, x2, x3, a0, a1, a2, a3, BLOCK_M, MASK_K, X_PAIRS)
    return a0, a1, a2, a3


@triton.jit
def _flush(acc, a, s, SCALED: tl.constexpr):
    # Σ over the tile's words (in-thread adds + a few shuffles), times the group's scale
    p = tl.sum(a, axis=1)
    if SCALED:
        return tl.fma(s, p, acc)
    return acc + p


@triton.jit
def _rows_and_k_slice(x_ptr, row0, M, stride_xm, K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Pointers to the ≤ 4 rows of x from row0 and this split's K tiles [t_start, t_end).
    Rows past M (when BLOCK_M does not divide M) read row M − 1 and are not stored."""
    x0 = x_ptr + row0.to(tl.int64) * stride_xm
    x1 = x_ptr + tl.minimum(row0 + 1, M - 1).to(tl.int64) * stride_xm
    x2 = x_ptr + tl.minimum(row0 + 2, M - 1).to(tl.int64) * stride_xm
    x3 = x_ptr + tl.minimum(row0 + 3, M - 1).to(tl.int64) * stride_xm
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    return x0, x1, x2, x3, t_start, t_end


@triton.jit
def _store_rows(out_ptr, stride_os, stride_om, pid_k, row0, y_ptr, stride_ym, cnt_ptr, acc0, acc1, acc2, acc3,
                b_ptr, offs_n, n_mask, rows_left,
                BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr):
    """The BLOCK_M rows of y from row0 on (rows_left = M − row0). SPLIT_K = 1: y itself at
    out_ptr. Otherwise this split's fp32 partials at out_ptr [SPLIT_K, M, N]; with FUSED, the
    program that takes the row block's last ticket (cnt_ptr, at 0 before the launch) adds the
    partials in split order (the same sum whichever program is last), the bias, and writes y
    at y_ptr in its dtype, then leaves the counter at 0 (tickets.py)."""
    left = offs_n * 0 + rows_left  # as a tensor: the interpreter rejects scalar & tensor masks
    out_row = out_ptr + pid_k * stride_os + row0.to(tl.int64) * stride_om + offs_n
    _store_row(out_row, acc0, b_ptr, offs_n, n_mask, SPLIT_K, HAS_BIAS)
    if BLOCK_M > 1:
        _store_row(out_row + stride_om, acc1, b_ptr, offs_n, n_mask & (left > 1), SPLIT_K, HAS_BIAS)
    if BLOCK_M > 2:
        _store_row(out_row + 2 * stride_om, acc2, b_ptr, offs_n, n_mask & (left > 2), SPLIT_K, HAS_BIAS)
    if BLOCK_M > 3:
        _store_row(out_row + 3 * stride_om, acc3, b_ptr, offs_n, n_mask & (left > 3), SPLIT_K, HAS_BIAS)
    if SPLIT_K > 1 and FUSED:
        r = tl.arange(0, 4)[:, None]  # BLOCK_M ≤ 4 rows (3 is not a power of two: masked)
        tile = r * stride_om + offs_n[None, :]
        reduce_if_last(out_ptr + row0.to(tl.int64) * stride_om + tile, stride_os,
                       y_ptr + row0.to(tl.int64) * stride_ym + r * stride_ym + offs_n[None, :],
                       n_mask[None, :] & (r < BLOCK_M) & (r < rows_left), cnt_ptr, b_ptr + offs_n[None, :] + r * 0,
                       SPLIT_K, HAS_BIAS)


@triton.jit
def _tile_loads(qw_blk, s_blk, z_blk, t, r, wi, n_mask, Wn, stride_qt, stride_qn, stride_sg, stride_zg,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, WPT: tl.constexpr,
                MASKED: tl.constexpr):
    """K tile t of the row block: its words (w0; 3 bits: the three words of each 32-code block,
    w0, w1, w2; otherwise w1 = w2 = w0) and, when grouped, its group's fp32 scales and uint8
    zeros ([BLOCK_N]; per channel: the zeros of n_mask's shape, unused)."""
    qw_tile = qw_blk + t * stride_qt
    if BITS == 3:
        w0, w1, w2 = load3(qw_tile, r, stride_qn, 0, wi * 3, n_mask, Wn - t * WPT, MASKED)
    else:
        ptrs = qw_tile + r[:, None] * stride_qn + wi[None, :]
        if MASKED:
            w0 = tl.load(ptrs, mask=n_mask[:, None] & (wi[None, :] < Wn - t * WPT), other=0)
        else:
            w0 = tl.load(ptrs)
        w1 = w0
        w2 = w0
    if GROUP != _PER_CHANNEL:
        g = (t * BLOCK_K) // GROUP
        s = tl.load(s_blk + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_blk + g * stride_zg, mask=n_mask, other=0)
    else:
        s = tl.zeros(n_mask.shape, dtype=tl.float32)
        z = tl.zeros(n_mask.shape, dtype=tl.uint8)
    return w0, w1, w2, s, z


@triton.jit(do_not_specialize=["zero"])  # a runtime 0 (see _field): never a compile-time constant
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    M, N, K, Wn, zero,
    stride_xm, stride_qb, stride_qt, stride_qn, stride_sb, stride_sg, stride_sn, stride_zb, stride_zg, stride_zn,
    stride_os, stride_om, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, FUSED: tl.constexpr,
    STAGES: tl.constexpr = 1, X_PAIRS: tl.constexpr = False, PDL: tl.constexpr = 0,
):
    if PDL > 0:  # launched early (pdl.py): wait for the kernel before, then let the next launch
        pdl_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    MASKED: tl.constexpr = not (EVEN_N and EVEN_K)
    MASK_K: tl.constexpr = not EVEN_K
    GROUPED: tl.constexpr = GROUP != _PER_CHANNEL
    row0 = pid_m * BLOCK_M
    x0, x1, x2, x3, t_start, t_end = _rows_and_k_slice(x_ptr, row0, M, stride_xm, K, pid_k, BLOCK_K, SPLIT_K)
    r = tl.arange(0, BLOCK_N)  # rows within the block: addresses go through the block/tile strides
    qw_blk = qw_ptr + pid_n * stride_qb
    s_blk = s_ptr + pid_n * stride_sb + r * stride_sn
    z_blk = z_ptr + pid_n * stride_zb + r * stride_zn

    if BITS == 3:
        NW: tl.constexpr = BLOCK_K // 32  # 32-code blocks (3 words each) per row and tile
        CPW: tl.constexpr = 32
        WPT: tl.constexpr = 3 * NW  # words per row and tile
    else:
        CPW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BLOCK_K // CPW  # words per row and tile
        WPT: tl.constexpr = NW
    wi = tl.arange(0, NW)
    if not GROUPED:  # one scale and zero per row: the scale multiplies the sums at the end
        s = tl.load(s_blk, mask=n_mask, other=0.0).to(tl.float32)
        zf = tl.broadcast_to(tl.load(z_blk, mask=n_mask, other=0).to(tl.float32)[:, None], [BLOCK_N, NW])
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Per channel the products accumulate per (row, word) over the whole K slice and are
    # reduced once at the end; per group they are reduced and scaled every tile.
    a0 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    # STAGES > 1: Triton's pipeliner copies the words (cp.async, shared memory) STAGES − 1 tiles
    # ahead of the arithmetic, so each program keeps tiles in flight while it computes; at 1
    # the loop is as written (a program waits on each tile's words).
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        k0 = t * BLOCK_K
        w0, w1, w2, s_t, z_t = _tile_loads(qw_blk, s_blk, z_blk, t, r, wi, n_mask, Wn, stride_qt, stride_qn,
                                           stride_sg, stride_zg, BITS, GROUP, BLOCK_K, WPT, MASKED)
        if GROUPED:
            s = s_t
            # broadcast before the per-position constants are formed from it: one layout
            # conversion of z instead of one per constant
            zf = tl.broadcast_to(z_t.to(tl.float32)[:, None], [BLOCK_N, NW])
            a0 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
            a1 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
            a2 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
            a3 = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
        xk = k0 + wi * CPW  # x index of each word's (block's) first code
        a0, a1, a2, a3 = _fma_tile(w0, w1, w2, zf, zero, xk, K, x0, x1, x2, x3, a0, a1, a2, a3,
                                   BITS, CPW, BLOCK_M, MASK_K, X_PAIRS)
        if GROUPED:
            acc0 = _flush(acc0, a0, s, True)
            if BLOCK_M > 1:
                acc1 = _flush(acc1, a1, s, True)
            if BLOCK_M > 2:
                acc2 = _flush(acc2, a2, s, True)
            if BLOCK_M > 3:
                acc3 = _flush(acc3, a3, s, True)

    if not GROUPED:
        acc0 = _flush(acc0, a0, s, False) * s
        acc1 = _flush(acc1, a1, s, False) * s
        acc2 = _flush(acc2, a2, s, False) * s
        acc3 = _flush(acc3, a3, s, False) * s
    _store_rows(out_ptr, stride_os, stride_om, pid_k, row0, y_ptr, stride_ym,
                cnt_ptr + pid_m * tl.num_programs(0) + pid_n, acc0, acc1, acc2, acc3,
                b_ptr, offs_n, n_mask, M - row0, BLOCK_M, SPLIT_K, HAS_BIAS, FUSED)



@triton.jit(do_not_specialize=["zero"])
def _gemv_groups_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    M, N, K, Wn, G, zero,
    stride_xm, stride_qb, stride_qt, stride_qn, stride_sb, stride_sg, stride_sn, stride_zb, stride_zg, stride_zn,
    stride_os, stride_om, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, FUSED: tl.constexpr,
    STAGES: tl.constexpr = 1, X_PAIRS: tl.constexpr = False, PDL: tl.constexpr = 0,
):
    """_gemv_kernel for K tiles that cover NG ≥ 2 whole groups: longer runs per row per load.

    The tile is [BLOCK_N, NG, WPG] words (WPG words, or 3-bit blocks, per group), so each
    group's scale and zero are one [BLOCK_N, NG] load broadcast over the group's words (no
    per-word gather), and the row sums are scaled per group: Σ_g s_g · Σ_{w∈g} Σ_j x·(q − z)."""
    if PDL > 0:  # launched early (pdl.py): wait for the kernel before, then let the next launch
        pdl_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    MASKED: tl.constexpr = not (EVEN_N and EVEN_K)
    MASK_K: tl.constexpr = not EVEN_K
    row0 = pid_m * BLOCK_M
    x0, x1, x2, x3, t_start, t_end = _rows_and_k_slice(x_ptr, row0, M, stride_xm, K, pid_k, BLOCK_K, SPLIT_K)

    NG: tl.constexpr = BLOCK_K // GROUP
    if BITS == 3:
        CPW: tl.constexpr = 32  # codes per 3-word block
        WPT: tl.constexpr = 3 * (BLOCK_K // 32)  # words per row and tile
    else:
        CPW: tl.constexpr = 32 // BITS
        WPT: tl.constexpr = BLOCK_K // CPW
    WPG: tl.constexpr = GROUP // CPW
    gi = tl.arange(0, NG)
    widx = gi[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG]: word (block) of the tile
    r = tl.arange(0, BLOCK_N)
    rows = r[:, None, None] * stride_qn
    qw_blk = qw_ptr + pid_n * stride_qb
    s_blk = s_ptr + pid_n * stride_sb + r[:, None] * stride_sn
    z_blk = z_ptr + pid_n * stride_zb + r[:, None] * stride_zn
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in tl.range(t_start, t_end, num_stages=STAGES):  # as in _gemv_kernel
        k0 = t * BLOCK_K
        # groups past K (a partial last tile) are clamped: their words hold code 0 and meet x = 0
        g = tl.minimum(k0 // GROUP + gi, G - 1)[None, :]
        s = tl.load(s_blk + g * stride_sg, mask=n_mask[:, None], other=0.0).to(tl.float32)
        zf = tl.load(z_blk + g * stride_zg, mask=n_mask[:, None], other=0).to(tl.float32)
        zf = tl.broadcast_to(zf[:, :, None], [BLOCK_N, NG, WPG])
        a0 = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
        a1 = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
        a3 = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
        xk = k0 + widx * CPW  # [NG, WPG]: x index of each word's first code
        qw_tile = qw_blk + t * stride_qt
        if BITS == 3:
            blk = (widx * 3)[None, :, :]
            w0, w1, w2 = load3_at(qw_tile + rows + blk, n_mask[:, None, None] & (blk < Wn - t * WPT), MASKED)
        else:
            wk = widx[None, :, :]
            if MASKED:
                w0 = tl.load(qw_tile + rows + wk, mask=n_mask[:, None, None] & (wk < Wn - t * WPT), other=0)
            else:
                w0 = tl.load(qw_tile + rows + wk)
            w1 = w0
            w2 = w0
        a0, a1, a2, a3 = _fma_tile(w0, w1, w2, zf, zero, xk, K, x0, x1, x2, x3, a0, a1, a2, a3,
                                   BITS, CPW, BLOCK_M, MASK_K, X_PAIRS)
        acc0 += tl.sum(tl.sum(a0, axis=2) * s, axis=1)
        if BLOCK_M > 1:
            acc1 += tl.sum(tl.sum(a1, axis=2) * s, axis=1)
        if BLOCK_M > 2:
            acc2 += tl.sum(tl.sum(a2, axis=2) * s, axis=1)
        if BLOCK_M > 3:
            acc3 += tl.sum(tl.sum(a3, axis=2) * s, axis=1)

    _store_rows(out_ptr, stride_os, stride_om, pid_k, row0, y_ptr, stride_ym,
                cnt_ptr + pid_m * tl.num_programs(0) + pid_n, acc0, acc1, acc2, acc3,
                b_ptr, offs_n, n_mask, M - row0, BLOCK_M, SPLIT_K, HAS_BIAS, FUSED)


@triton.jit
def _store_row(ptrs, acc, b_ptr, offs_n, mask, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)  # fp32 partials: reduce_if_last or split_k_result adds them


def _block_k(bits: int, group_size: int | None, want: int) -> int:
    """The tile width closest below `want` (a multiple of 32) that either lies inside one group
    (a divisor of it) or covers whole groups (a multiple of it)."""
    bk = max(32, want - want % 32)
    if group_size is not None:
        if bk >= group_size:
            return bk - bk % group_size
        while group_size % bk:
            bk -= 32
    return bk


def _split_k(n_tiles: int, k_tiles: int, t: dict, n_sm: int, resident: int | None, cap: int) -> int:
    """SPLIT_K for `n_tiles` row blocks × `k_tiles` K tiles: the tuned "SPLIT_K" if given, else
    the most K slices whose grid fits in one wave of the SMs' slots (occupancy.split_k_one_wave).
    Nothing is software-pipelined, so latency is hidden by programs in flight: the slots are
    `programs_per_sm` (default 8) per SM, or fewer when the compiled kernel's registers fit
    fewer (`resident`, known after its first launch), with ≥ `min_k_tiles` (default 4) K tiles
    per slice. A doubling rule once made 1,024 programs for 70B.down on 924 slots (71
    registers: 7 per SM), a second wave 11 % full: 93.9 µs, against 77.9 µs for the same tile
    and grid when 8 fitted per SM (docs/kernels.md §v7). The tile-major classes cap at 16 per
    SM, so residency decides, and allow 2 tiles per slice: capped at 8 and 4, W3 g128 (16
    resident) ran 70B.down in half a wave (94.4 µs; split 16: 85.9) and 7B.qo stopped at
    split 8 (9.6 µs; split 16: 8.6; §v8)."""
    if t.get("SPLIT_K"):
        return t["SPLIT_K"]
    return split_k_one_wave(n_tiles, k_tiles, slots(n_sm, t.get("programs_per_sm", 8), resident), cap,
                            t.get("min_k_tiles", 4))


def tile_major_tile(bits: int, group_size: int | None, N: int, K: int) -> tuple[int, int] | None:
    """(BLOCK_N, BLOCK_K) to store this layer tile-major with (tiles.py), or None: no measured
    tile-major tile for the class ("gemv_tiled" in tuned_skinny.json, M = 1), or the shape
    is not whole tiles (N % BLOCK_N, K % BLOCK_K). A class's "large" entry may give layers of
    ≥ min_codes codes their own tile (default_gemv_config reads the same entry)."""
    t = _tiled_entry(bits, group_size, N, K)
    if not t:
        return None
    bn, bk = t["BLOCK_N"], t["BLOCK_K"]
    if N % bn or K % bk:
        return None
    return bn, bk


def default_gemv_config(M: int, N: int, K: int, bits: int, group_size: int | None, n_sm: int,
                        overrides: dict | None = None, tiled: bool = False, resident: int | None = None) -> dict:
    """Tile sizes for the GEMV kernel.

    Defaults (compiled for sm_90, not yet timed on a GPU): 64 rows × 128 codes per tile with
    4 warps: each thread holds 2 rows × 32 codes, and every per-row load (scale, zero) has
    fewer elements than the program has threads, so Triton issues it in the words' layout
    (128 rows with 4 warps would shuffle scale, zero and the 2^(23−t) + z constants through
    shared memory every tile: 12 barriers per tile). BLOCK_K shrinks to the group size when
    groups are smaller. Nothing is software-pipelined (the loads feed no dot), so latency is
    hidden by programs in flight: K is split into as many slices as fit in one wave of
    `programs_per_sm` (8) programs per SM, or of `resident` (how many the compiled kernel fits)
    when fewer, keeping ≥ 4 K tiles per program (_split_k).
    tuned_skinny.json's "gemv" section overrides per "bits:group:M" class ("pc" = per
    channel), then per bit-width, with what scripts/bench/gemv_ab.py measured; "SPAN_GROUPS" comes
    from there only: BLOCK_K may then cover several whole groups (_gemv_groups_kernel: longer
    runs per row). tiled=True (tile-major weights) reads the "gemv_tiled" section instead
    (the tile-major probe of docs/kernels.md §Findings v6). A class's "large" entry applies to layers of at least its
    "min_codes" codes (N·K); a tile it gives is the layout's too (tile_major_tile), which
    fixes the tile of tile-major weights. STAGES > 1 pipelines the K loop (cp.async, Triton's
    pipeliner).
    `overrides` (the same keys) apply last.
    """
    block_m = min(M, MAX_BLOCK_M)
    gemv = _tuned().get("gemv_tiled" if tiled else "gemv", {})
    t = dict(gemv.get(str(bits), {}))
    t.update(gemv.get(f"{bits}:{group_size or 'pc'}:{block_m}", {}))
    large = t.pop("large", None)
    if large and N * K >= large["min_codes"]:
        t.update({k: v for k, v in large.items() if k != "min_codes"})
    t.update(overrides or {})
    block_n = t.get("BLOCK_N", 64)
    want_k = t.get("BLOCK_K", 128)
    if group_size is not None and not t.get("SPAN_GROUPS", False):
        want_k = min(want_k, group_size)  # tiles inside one group unless measured otherwise
    block_k = _block_k(bits, group_size, want_k)
    n_tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, block_k)
    split_k = _split_k(n_tiles, k_tiles, t, n_sm, resident, 16)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": t.get("num_warps", 4), "num_stages": t.get("num_stages", 2),
            "STAGES": t.get("STAGES", 1), "X_PAIRS": t.get("X_PAIRS", True)}


def gemv_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
    config: dict | None = None,
    out: Tensor | None = None,
    workspace: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] · Ŵᵀ (+ bias) with Ŵ = s·(q − z) from the packed layout, on CUDA cores.

    `out` [M, N] (x's dtype) receives y; `workspace` [SPLIT_K, M, N] fp32 holds the split-K
    partials, which the last program of each row block adds up (fused_split_k(); tickets.py;
    with QTOOL_FUSED_SPLIT_K=0 two more kernels do, and `out` is used only when K is not split).
    Both are allocated when not given. Tile-major weights
    (tiles.py: qweight [N/BN, Wn/wpt, BN, wpt], optionally scales and zeros [N/BN, G, BN])
    fix BLOCK_N and BLOCK_K to their tile. `config` keys:
    BLOCK_N, BLOCK_K (a multiple of 32 dividing the group size, or a power of two of whole
    groups: then _gemv_groups_kernel runs), SPLIT_K, num_warps,
    num_stages, optional BLOCK_M (1…4, default min(M, 4)). M = 1 fp16 W4/W2 on CUDA takes the
    packed-half2 kernel (gemv_h2.py) where the tile-major class's tuned entry says "H2", or
    with QTOOL_GEMV_H2=1, or a config saying "H2": True (holding default_h2_config's keys);
    `gemv_path` says which path runs.
    """
    if gemv_path(x, qweight, bits, group_size, config) == "h2":
        from qtool_kernels.gemv_h2 import gemv_h2_matmul  # PTX: never imported by the interpreter

        return gemv_h2_matmul(x, qweight, scales, zeros, bits, group_size, bias, config, out, workspace)
    M, K = x.shape
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert bits in (2, 3, 4, 8), bits
    assert x.stride(1) == 1 and qweight.stride(-1) == 1
    assert scales.stride(-1) == 1 and zeros.stride(-1) == 1 and scales.dim() == zeros.dim()
    N, Wn, BN, wpt = packed_geometry(qweight)
    tiled = BN != 0
    # everything the default config and the kernel's specialisation depend on, but the split
    sig = ("gemv", x.dtype, tuple(qweight.shape), bits, group_size, scales.dim(), bias is not None, min(M, MAX_BLOCK_M))
    resident = occupancy.recorded(sig)
    if tiled:  # tile-major (tiles.py): the tile is fixed by the layout
        BK = wpt * 32 // bits
        assert K * bits == Wn * 32, "tile-major weights hold whole K tiles"
        fixed = {"BLOCK_N": BN, "BLOCK_K": BK, "SPAN_GROUPS": group_size is not None and BK > group_size}
        cfg = dict(config or default_gemv_config(M, N, K, bits, group_size, _num_sms(x.device), fixed, tiled=True,
                                                 resident=resident))
        assert cfg["BLOCK_N"] == BN and cfg["BLOCK_K"] == BK, "config tile differs from the tile-major layout"
    else:
        cfg = dict(config or default_gemv_config(M, N, K, bits, group_size, _num_sms(x.device), resident=resident))
    assert Wn * 32 >= K * bits, "qweight holds fewer codes than K"
    cfg.pop("H2", None)
    cfg.pop("SPAN_GROUPS", None)
    stages = int(cfg.pop("STAGES", 1))
    # x read in pairs (_x2) unless a tuned entry measured it slower (W4 g128 "large": with
    # STAGES 3 the pipeliner also stages the x words through shared memory; §v10)
    x_pairs = bool(cfg.pop("X_PAIRS", True))
    BM = cfg.pop("BLOCK_M", min(M, MAX_BLOCK_M))
    BN, BK, SK = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("SPLIT_K")
    GROUP = group_constexpr(group_size)
    assert 1 <= BM <= MAX_BLOCK_M and BK % 32 == 0
    assert GROUP % BK == 0 or (BK % GROUP == 0 and (BK // GROUP) & (BK // GROUP - 1) == 0), \
        "a K tile lies inside one group or covers a power of two of whole groups"
    if tiled:
        q_strides = (qweight.stride(0), qweight.stride(1), qweight.stride(2))
    else:  # row-major: a row block is BN rows down, a K tile its words along the row
        q_strides = (BN * qweight.stride(0), words_per_tile(bits, BK), qweight.stride(0))
    if scales.dim() == 3:  # [N / BN, G, BN]
        assert scales.shape[2] == BN and zeros.shape == scales.shape, "tile-major scales need BLOCK_N rows per block"
        G = scales.shape[1]
        s_strides = (scales.stride(0), scales.stride(1), scales.stride(2))
        z_strides = (zeros.stride(0), zeros.stride(1), zeros.stride(2))
    else:
        G = scales.shape[1]
        s_strides = (BN * scales.stride(0), 1, scales.stride(0))
        z_strides = (BN * zeros.stride(0), 1, zeros.stride(0))
    grid = (triton.cdiv(N, BN), SK, triton.cdiv(M, BM))
    out, stride_os, y, counters, fused = split_k_buffers(x, M, N, SK, grid[0] * grid[2], out, workspace)
    kernel = _gemv_groups_kernel if BK > GROUP else _gemv_kernel
    pdl = min(pdl_mode(x.device), 1)
    compiled = kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, y, counters,
        M, N, K, Wn, *((G,) if BK > GROUP else ()), 0,
        x.stride(0), *q_strides, *s_strides, *z_strides, stride_os, out.stride(-2), y.stride(0),
        BITS=bits, GROUP=GROUP, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK,
        HAS_BIAS=bias is not None, EVEN_N=N % BN == 0, EVEN_K=K % BK == 0, FUSED=fused, STAGES=stages,
        X_PAIRS=x_pairs and _x_pairs(x), PDL=pdl, launch_pdl=pdl > 0,
        enable_fp_fusion=True,  # the products must fuse into the row sums (FFMA), whatever the default
        **cfg,
    )
    if config is None and resident is None:
        occupancy.record(sig, compiled)
    return y if fused else split_k_result(out, SK, bias, x.dtype)


def _x_pairs(x: Tensor) -> bool:
    """Whether the kernels may read x two elements per 32-bit load: every row starts 4-byte
    aligned and K is even (a pair never reaches past the row)."""
    return x.shape[1] % 2 == 0 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0


def h2_unit_codes(bits: int) -> int:
    """Codes per unit of the packed-half2 kernel: a quad of words (W4 32, W2 64 codes), or for
    W3 three quads (128 codes: 4 blocks of 32 codes in 3 words)."""
    return 128 if bits == 3 else 128 // bits


def h2_group_codes(bits: int) -> int:
    """What a group size must be a multiple of for the packed-half2 kernel: its unit, but for
    W3 one 32-code block (a unit's blocks may take their own groups)."""
    return 32 if bits == 3 else h2_unit_codes(bits)


def h2_eligible(x: Tensor, qweight: Tensor, bits: int, group_size: int | None) -> bool:
    """Whether the packed-half2 kernel (gemv_h2.py) covers this call: CUDA outside the
    interpreter (PTX), M = 1, fp16, W4, W3 or W2 with every quad of words (W4 32 codes, W2 64;
    W3 every 32-code block) in one group, K a multiple of 8, quads 16-byte aligned (128-bit
    loads): row-major rows of whole quads, or tile-major tiles of whole units per row."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not x.is_cuda:
        return False
    if x.dtype != torch.float16 or x.shape[0] != 1 or bits not in (2, 3, 4):
        return False
    if group_size is not None and group_size % h2_group_codes(bits):
        return False
    K = x.shape[1]
    if qweight.dim() == 2:
        aligned = qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0
    else:
        aligned = qweight.shape[3] % (12 if bits == 3 else 4) == 0 and qweight.is_contiguous()
    return (K % 8 == 0 and aligned and qweight.stride(-1) == 1
            and x.stride(1) == 1 and x.data_ptr() % 4 == 0)


def _tiled_entry(bits: int, group_size: int | None, N: int, K: int) -> dict:
    """The "gemv_tiled" entry of a class (M = 1) with its "large" part applied for this shape."""
    t = dict(_tuned().get("gemv_tiled", {}).get(f"{bits}:{group_size or 'pc'}:1", {}))
    large = t.pop("large", None)
    if large and N * K >= large["min_codes"]:
        t.update({k: v for k, v in large.items() if k != "min_codes"})
    return t


def gemv_path(x: Tensor, qweight: Tensor, bits: int, group_size: int | None, config: dict | None = None) -> str:
    """"h2" (packed half2, gemv_h2.py) or "fp32" (this file's kernel): what gemv_matmul runs.

    A config decides by itself ("H2": True). Otherwise QTOOL_GEMV_H2=1 / 0 (read per call)
    forces it on / off, and unset, tile-major weights follow their "gemv_tiled" entry's "H2"
    (a dict of the half2 kernel's settings, measured per class, docs/kernels.md §v11; a
    "large" part may set its own). Row-major codes default to the fp32 kernel:
    there the half2 kernel measured slower (W4 g128 70B.down 93.6 µs vs 77.9 µs, §v4)."""
    if config is not None:
        want = bool(config.get("H2"))
    else:
        env = os.environ.get("QTOOL_GEMV_H2")
        if env is not None:
            want = env == "1"
        elif qweight.dim() == 4:
            want = bool(_tiled_entry(bits, group_size, packed_geometry(qweight)[0], x.shape[1]).get("H2"))
        else:
            want = False
    return "h2" if want and h2_eligible(x, qweight, bits, group_size) else "fp32"


def default_h2_config(N: int, K: int, bits: int, group_size: int | None, n_sm: int,
                      overrides: dict | None = None, tiled: bool = False, resident: int | None = None) -> dict:
    """Tiles of the packed-half2 kernel.

    Row-major: BLOCK_K = the group (≤ 128 codes), per channel 4 quads of words (W4 128, W2
    256 codes); a thread holds `rows` rows × one quad (4 words) per tile: more rows share each
    thread's x pairs (its PRMTs) at the cost of registers; BLOCK_N = rows × (32 / quads per
    row) × num_warps; tuned_skinny.json's "gemv_h2" section overrides per "bits:group" ("pc"
    = per channel), then per bit-width. Tile-major (`tiled`): the class's "gemv_tiled" entry
    (num_warps, STAGES, programs_per_sm, min_k_tiles) with its "H2" dict over it (the fp32
    keys stay for what the half2 kernel does not cover: bf16, M > 1), and `overrides` must
    give the layout's BLOCK_N and BLOCK_K. K is split into as many slices as fit one wave
    (_split_k: `resident` programs per SM once the compiled kernel is known). `overrides`
    apply last."""
    if tiled:
        t = _tiled_entry(bits, group_size, N, K)
        t.pop("BLOCK_N", None)
        t.pop("BLOCK_K", None)
        h2 = t.pop("H2", None)
        if isinstance(h2, dict):  # the half2 kernel's own warps/cap/stages over the fp32 kernel's
            t.update(h2)
    else:
        h2 = _tuned().get("gemv_h2", {})
        t = dict(h2.get(str(bits), {}))
        t.update(h2.get(f"{bits}:{group_size or 'pc'}", {}))
        t.setdefault("programs_per_sm", 4)
    t.update(overrides or {})
    cpq = h2_unit_codes(bits)
    bk = t.get("BLOCK_K", 4 * cpq if group_size is None else min(group_size, 128))
    if group_size is not None and not tiled:
        bk = min(bk, group_size)
    bk = max(cpq, bk - bk % cpq)
    nq = bk // cpq
    assert nq & (nq - 1) == 0, bk
    nw = t.get("num_warps", 4)
    bn = t.get("BLOCK_N", t.get("rows", 2 if bits == 3 else 4) * max(1, 32 // nq) * nw)
    n_tiles = triton.cdiv(N, bn)
    k_tiles = triton.cdiv(K, bk)
    if t.get("SPLIT_K"):
        split_k = t["SPLIT_K"]
    else:  # one wave, or 3 of shorter programs where one wave would be mostly idle slots
        split_k = split_k_waves(n_tiles, k_tiles, slots(n_sm, t.get("programs_per_sm", 8), resident), 32,
                                t.get("min_k_tiles", 4))
    cfg = {"H2": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "num_warps": nw, "num_stages": 1,
           "STAGES": t.get("STAGES", 1)}
    if t.get("maxnreg"):  # ptxas's register cap: more programs per SM (tuned per class)
        cfg["maxnreg"] = t["maxnreg"]
    if t.get("PREFETCH"):  # the next tile's words read during this one (gemv_h2.py)
        cfg["PREFETCH"] = 1
    return cfg
