"""M = 1, fp16, W4/W3/W2: the GEMV in packed half2 arithmetic (inline PTX), ~2.5 instructions per code.

Only gemv.gemv_matmul imports this module, and only on CUDA outside the interpreter (the
interpreter cannot run PTX); `EMULATE=True` swaps every PTX block for Triton integer/float
ops with the same results, so CPU CI runs this kernel's indexing under TRITON_INTERPRET.

Why packed: the fp32 GEMV (gemv.py) spends ~5 instructions per code (one LOP3, one FADD,
one FFMA, one x load + conversion), and on the H100 it is bound by that issue rate once
its reads are contiguous (tile-major codes, one-wave grids: docs/kernels.md §v11).
Here one LOP3 extracts two codes into an f16x2 register, `(w & 0x000F000F) | 0x64006400` =
{1024 + c_i, 1024 + c_{i+4}} (W4; W2: 0x00030003, {c_i, c_{i+8}}); the fields at bits 4–7
(W2: 2–7) are masked in place and their 16^-1 (4^-k) folded into an exact fma (Marlin's
trick), so one shift serves a whole word. Per pair then two f16x2 ops: t = (q − z)·2^-E
(one fma, exact) and acc = t·x + acc. The scale is applied once per chain, in fp32, when
the chain is flushed (Σ s(q − z)x = s·Σ(q − z)x: a unit never spans groups); the power of
two 2^-E keeps the fp16 chains clear of overflow for any fp16 x (x reaches thousands in
down_proj inputs), see PRESCALE_LOG2. The f16x2 chain runs over one tile (W4: 16, W2 and W3:
32 products per half and row) and is then added into fp32, so the fp16 rounding error
does not grow with K. Compiled for sm_90 (Triton 3.6), W4 g128's K loop is ~2.4
instructions per code (the fp32 kernel's: 5.0).

x pairs must match the code pairs ({x_i, x_{i+4}}): x is read as int32 words (fp16 pairs
{x_2m, x_2m+1}, 128-bit loads) and permuted in registers by PRMT, once per thread and
word column, shared by the rows a thread holds.

Codes row-major ([N, Wn]) or tile-major (tiles.py), through the same block/tile strides as
gemv.py; scales and zeros [N, G] or tile-major [N/BN, G, BN]; a tile may span groups (each
quad of words has its own scale: a quad never crosses a group). Split-K partials are added
by the row block's last program (tickets.py), and the split fills one wave of the SMs as
the compiled kernel's residency allows (gemv._split_k).

W3 (no two 3-bit codes 16 bits apart) builds its pairs with PRMT: see BLOCK3_ASM; a thread
then holds a 128-code unit (12 words, three quads) of a row instead of one quad.

Layout: the words of a tile are [NQ, BLOCK_N, 4] (NQ quads of 4 consecutive words per row:
one 128-bit load each), quads first so that a warp reads whole rows of a tile-major tile
and each thread holds 2+ rows of one quad (see the kernel); Triton puts a quad in one
thread, so the 4 words and the x words of the same codes (loaded as [NQ, 1, 4]) land in
the same thread with no shuffle. Accumulators are [NQ, BLOCK_N] fp32, reduced over NQ once
per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtool_kernels import occupancy
from qtool_kernels._unpack import pair16
from qtool_kernels.gemv import _store_rows, default_h2_config, h2_group_codes, h2_unit_codes
from qtool_kernels.pdl import pdl_mode, pdl_wait, prefetch_l2
from qtool_kernels.skinny import _num_sms, split_k_buffers, split_k_result
from qtool_kernels.tiles import packed_geometry, words_per_tile
from torch import Tensor

# log2 of the power of two folded into t = (q − z)·2^-E: the largest that keeps a chain's
# sum inside fp16 for |x| ≤ 65,504 (chain length × max|q − z| ≤ 2^E: W4 16 × 15, W3 32 × 7,
# W2 32 × 3). A larger one would only push small products towards fp16's subnormals.
PRESCALE_LOG2 = {4: 8, 3: 8, 2: 7}


def pow2_f16(n: int) -> int:
    """fp16 bit pattern of 2^-n (0 ≤ n ≤ 14: normal numbers only)."""
    assert 0 <= n <= 14
    return (15 - n) << 10


# Every block writes its outputs last, from temporaries: without an early-clobber an output
# may be given an input's register.
# Pairs {x_i, x_{i+H}} from int32 words r_m = {x_2m, x_2m+1}: prmt 0x5410 takes the low
# halves of two words, 0x7632 the high halves. W4 (H = 4): $4..$7 = r0..r3.
XPAIRS4_ASM = """{
.reg .b32 o0, o1, o2, o3;
prmt.b32 o0, $4, $6, 0x5410;
prmt.b32 o1, $4, $6, 0x7632;
prmt.b32 o2, $5, $7, 0x5410;
prmt.b32 o3, $5, $7, 0x7632;
mov.b32 $0, o0;
mov.b32 $1, o1;
mov.b32 $2, o2;
mov.b32 $3, o3;
}"""
# W2 (H = 8): $8..$15 = r0..r7.
XPAIRS2_ASM = ("{\n.reg .b32 o0, o1, o2, o3, o4, o5, o6, o7;\n"
               + "".join(f"prmt.b32 o{i}, ${8 + i // 2}, ${12 + i // 2}, {'0x5410' if i % 2 == 0 else '0x7632'};\n"
                         for i in range(8))
               + "".join(f"mov.b32 ${i}, o{i};\n" for i in range(8)) + "}")

# Every product is t·x with t = (q − z)·2^-E exact (PRESCALE_LOG2: E = 8, W2 7), and each
# chain's f16x2 sum is scaled by s·2^E in fp32 when it is flushed: no multiply by s per
# code. 2^-E is what keeps the chains in fp16's range for any fp16 x: |t| ≤ 15·2^-8 (W4,
# 16 products per half: ≤ 61,410), 7·2^-8 (W3, 32: ≤ 57,316), 3·2^-7 (W2, 32: ≤ 49,128).
# A field reads v = 1024 + 2^p·q (p: its bit in the half), so t = v·2^-(p+E) − (1024·2^-p
# + z)·2^-E in one fma, exact: both terms are fp16 numbers and so is their sum.

# One W4 word (8 codes) of one row: $0 = acc out, $1 = word, $2 = acc in, $3 = 0x64006400,
# $4 = {−(1024 + z)·2^-E}², $5 = {−(64 + z)·2^-E}², $6 = {2^-E}², $7 = {2^-(4+E)}²,
# $8..$11 = x pairs 0..3. Pairs 1 and 3 sit at bits 4–7 (p = 4).
WORD4_ASM = """{
.reg .b32 wh, t0, t1, t2, t3, a;
shr.u32 wh, $1, 8;
lop3.b32 t0, $1, 0x000F000F, $3, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, $3, 0xEA;
lop3.b32 t2, wh, 0x000F000F, $3, 0xEA;
lop3.b32 t3, wh, 0x00F000F0, $3, 0xEA;
fma.rn.f16x2 t0, t0, $6, $4;
fma.rn.f16x2 t1, t1, $7, $5;
fma.rn.f16x2 t2, t2, $6, $4;
fma.rn.f16x2 t3, t3, $7, $5;
fma.rn.f16x2 a, t0, $8, $2;
fma.rn.f16x2 a, t1, $9, a;
fma.rn.f16x2 a, t2, $10, a;
fma.rn.f16x2 a, t3, $11, a;
mov.b32 $0, a;
}"""

# One W2 word (16 codes): $0 = acc out, $1 = word, $2 = acc in, $3 = 0x64006400,
# $4..$7 = {−(1024·4^-k + z)·2^-E}², $8..$11 = {4^-k·2^-E}² (field k at bits 2k, k = 0..3),
# $12..$19 = x pairs 0..7; pairs 0..3 from the word, 4..7 from word >> 8.
_W2_MASKS = ("0x00030003", "0x000C000C", "0x00300030", "0x00C000C0")
WORD2_ASM = ("{\n.reg .b32 wh, t, a;\nshr.u32 wh, $1, 8;\n"
             + "".join(
                 f"lop3.b32 t, {src}, {_W2_MASKS[k]}, $3, 0xEA;\n"
                 + f"fma.rn.f16x2 t, t, ${8 + k}, ${4 + k};\n"
                 + f"fma.rn.f16x2 a, t, ${12 + 4 * h + k}, {'$2' if h == k == 0 else 'a'};\n"
                 for h, src in enumerate(("$1", "wh")) for k in range(4))
             + "mov.b32 $0, a;\n}")

W3_WINDOWS = (("$1", "$2", 0x4310, ((0, (0, 3, 6)), (9, (0, 3)))),
              ("$1", "$2", 0x5421, ((7, (0, 3, 6)),)),
              ("$2", "$3", 0x6532, ((0, (0, 3, 6)), (9, (0, 3)))),
              ("$2", "$3", 0x7643, ((7, (0, 3, 6)),)))
W3_PAIR_ORDER = tuple(range(8)) + tuple(range(16, 24))


def _block3_asm() -> str:
    lines, xi, acc = ["{", ".reg .b32 r, h, t, a;"], 12, "$4"
    for a, b, sel, parts in W3_WINDOWS:
        lines.append(f"prmt.b32 r, {a}, {b}, 0x{sel:04X};")
        for shift, fields in parts:
            src = "r"
            if shift:
                lines.append(f"shr.u32 h, r, {shift};")
                src = "h"
            for p in fields:
                lines.append(f"lop3.b32 t, {src}, 0x{(7 << p) * 0x10001:08X}, $5, 0xEA;")
                lines.append(f"fma.rn.f16x2 t, t, ${9 + p // 3}, ${6 + p // 3};")
                lines.append(f"fma.rn.f16x2 a, t, ${xi}, {acc};")
                xi, acc = xi + 1, "a"
    return "\n".join([*lines, "mov.b32 $0, a;", "}"])


BLOCK3_ASM = _block3_asm()

# f16x2 -> two fp32 (bit patterns as int32)
UNPACK_ASM = """{
.reg .f16 l, h;
.reg .f32 a, b;
mov.b32 {l, h}, $2;
cvt.f32.f16 a, l;
cvt.f32.f16 b, h;
mov.b32 $0, a;
mov.b32 $1, b;
}"""

_XPAIRS4 = tl.constexpr(XPAIRS4_ASM)
_XPAIRS2 = tl.constexpr(XPAIRS2_ASM)
_WORD4 = tl.constexpr(WORD4_ASM)
_WORD2 = tl.constexpr(WORD2_ASM)
_BLOCK3 = tl.constexpr(BLOCK3_ASM)
_UNPACK = tl.constexpr(UNPACK_ASM)


# ---------------------------------------------------------------- emulation (interpreter)
# The same bits with Triton ops: f16x2 math in fp32 with one rounding to fp16 (= the PTX's
# single rounding: products of two fp16 are exact in fp32).

@triton.jit
def _lo(t):
    return (t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _hi(t):
    return (t >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pk(lo, hi):
    lo = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _fma2(a, b, c):
    return _pk(_lo(a) * _lo(b) + _lo(c), _hi(a) * _hi(b) + _hi(c))


@triton.jit
def _prmt_lo(a, b):  # 0x5410
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def _prmt_hi(a, b):  # 0x7632
    return ((a >> 16) & 0xFFFF) | ((b >> 16) << 16)


@triton.jit
def _prmt_sel(a, b, SEL: tl.constexpr):
    """prmt.b32 with a constant selector (source bytes 0–3 from a, 4–7 from b)."""
    r = a * 0
    for i in tl.static_range(4):
        src: tl.constexpr = (SEL >> (4 * i)) & 7
        if src < 4:
            byte = (a >> (8 * src)) & 0xFF
        else:
            byte = (b >> (8 * (src - 4))) & 0xFF
        r = r | (byte << (8 * i))
    return r


@triton.jit
def _emu_pair(w, MASK: tl.constexpr, magic, ck, mk, xp, acc):
    return _fma2(_fma2((w & MASK) | magic, mk, ck), xp, acc)


# ---------------------------------------------------------------- building blocks

@triton.jit
def _split4(v):
    """[A, B, 4] -> four [A, B] (the axis of 4 lies in one thread: free)."""
    a, b = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _xpairs4(r0, r1, r2, r3, EMULATE: tl.constexpr):
    if EMULATE:
        return _prmt_lo(r0, r2), _prmt_hi(r0, r2), _prmt_lo(r1, r3), _prmt_hi(r1, r3)
    return tl.inline_asm_elementwise(_XPAIRS4, "=r,=r,=r,=r,r,r,r,r", [r0, r1, r2, r3],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _xpairs2(r0, r1, r2, r3, r4, r5, r6, r7, EMULATE: tl.constexpr):
    if EMULATE:
        return (_prmt_lo(r0, r4), _prmt_hi(r0, r4), _prmt_lo(r1, r5), _prmt_hi(r1, r5),
                _prmt_lo(r2, r6), _prmt_hi(r2, r6), _prmt_lo(r3, r7), _prmt_hi(r3, r7))
    return tl.inline_asm_elementwise(_XPAIRS2, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r",
                                     [r0, r1, r2, r3, r4, r5, r6, r7],
                                     dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@triton.jit
def _word4(w, acc, magic, c0, c1, m0, m1, x0, x1, x2, x3, EMULATE: tl.constexpr):
    if EMULATE:
        wh = w >> 8  # arithmetic: the sign bits land at bits 24..31, never masked in
        acc = _emu_pair(w, 0x000F000F, magic, c0, m0, x0, acc)
        acc = _emu_pair(w, 0x00F000F0, magic, c1, m1, x1, acc)
        acc = _emu_pair(wh, 0x000F000F, magic, c0, m0, x2, acc)
        return _emu_pair(wh, 0x00F000F0, magic, c1, m1, x3, acc)
    return tl.inline_asm_elementwise(_WORD4, "=r,r,r,r,r,r,r,r,r,r,r,r",
                                     [w, acc, magic, c0, c1, m0, m1, x0, x1, x2, x3],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _word2(w, acc, magic, c0, c1, c2, c3, m0, m1, m2, m3, x0, x1, x2, x3, x4, x5, x6, x7,
           EMULATE: tl.constexpr):
    if EMULATE:
        wh = w >> 8
        acc = _emu_pair(w, 0x00030003, magic, c0, m0, x0, acc)
        acc = _emu_pair(w, 0x000C000C, magic, c1, m1, x1, acc)
        acc = _emu_pair(w, 0x00300030, magic, c2, m2, x2, acc)
        acc = _emu_pair(w, 0x00C000C0, magic, c3, m3, x3, acc)
        acc = _emu_pair(wh, 0x00030003, magic, c0, m0, x4, acc)
        acc = _emu_pair(wh, 0x000C000C, magic, c1, m1, x5, acc)
        acc = _emu_pair(wh, 0x00300030, magic, c2, m2, x6, acc)
        return _emu_pair(wh, 0x00C000C0, magic, c3, m3, x7, acc)
    return tl.inline_asm_elementwise(_WORD2, "=r" + ",r" * 19,
                                     [w, acc, magic, c0, c1, c2, c3, m0, m1, m2, m3, x0, x1, x2, x3, x4, x5, x6, x7],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _emu_fields(r, acc, magic, c0, c3, c6, m0, m3, m6, xa, xb, xc, NF: tl.constexpr):
    """The W3 fields at bits 0, 3 (and 6 if NF = 3) of r, against x pairs xa, xb, xc."""
    acc = _emu_pair(r, 0x00070007, magic, c0, m0, xa, acc)
    acc = _emu_pair(r, 0x00380038, magic, c3, m3, xb, acc)
    if NF == 3:
        acc = _emu_pair(r, 0x01C001C0, magic, c6, m6, xc, acc)
    return acc


@triton.jit
def _block3(w0, w1, w2, acc, magic, c0, c3, c6, m0, m3, m6, x0, x1, x2, x3, x4, x5, x6, x7,
            x8, x9, x10, x11, x12, x13, x14, x15, EMULATE: tl.constexpr):
    if EMULATE:  # W3_WINDOWS with Triton ops (logical shifts: the sign bits masked off)
        r = _prmt_sel(w0, w1, 0x4310)
        acc = _emu_fields(r, acc, magic, c0, c3, c6, m0, m3, m6, x0, x1, x2, 3)
        acc = _emu_fields((r >> 9) & 0x7FFFFF, acc, magic, c0, c3, c6, m0, m3, m6, x3, x4, x4, 2)
        r = (_prmt_sel(w0, w1, 0x5421) >> 7) & 0x1FFFFFF
        acc = _emu_fields(r, acc, magic, c0, c3, c6, m0, m3, m6, x5, x6, x7, 3)
        r = _prmt_sel(w1, w2, 0x6532)
        acc = _emu_fields(r, acc, magic, c0, c3, c6, m0, m3, m6, x8, x9, x10, 3)
        acc = _emu_fields((r >> 9) & 0x7FFFFF, acc, magic, c0, c3, c6, m0, m3, m6, x11, x12, x12, 2)
        r = (_prmt_sel(w1, w2, 0x7643) >> 7) & 0x1FFFFFF
        return _emu_fields(r, acc, magic, c0, c3, c6, m0, m3, m6, x13, x14, x15, 3)
    return tl.inline_asm_elementwise(_BLOCK3, "=r" + ",r" * 27,
                                     [w0, w1, w2, acc, magic, c0, c3, c6, m0, m3, m6, x0, x1, x2, x3, x4, x5, x6, x7,
                                      x8, x9, x10, x11, x12, x13, x14, x15],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _to_f32(acc, EMULATE: tl.constexpr):
    """f16x2 -> lo + hi in fp32."""
    if EMULATE:
        return _lo(acc) + _hi(acc)
    lo, hi = tl.inline_asm_elementwise(_UNPACK, "=r,=r,r", [acc], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return lo.to(tl.float32, bitcast=True) + hi.to(tl.float32, bitcast=True)


@triton.jit
def _thread_zero(like, zero, EMULATE: tl.constexpr):
    """0 as a tensor shaped like `like`, computed from %laneid (opaque to ptxas)."""
    if EMULATE:
        return like * 0 + zero
    return tl.inline_asm_elementwise("{.reg .u32 l; mov.u32 l, %laneid; shr.u32 l, l, 5; add.u32 $0, l, $1;}",
                                     "=r,r", [like * 0 + zero], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _load_rows(blk, n_ok2, g, stride_g, MASK_N: tl.constexpr):
    """Group g's values ([NQ, 1] or a scalar index) of a scale or zero tensor for the block's
    rows ([NQ, BLOCK_N])."""
    if MASK_N:
        return tl.load(blk + g * stride_g, mask=n_ok2, other=0)
    return tl.load(blk + g * stride_g)


@triton.jit
def _tile_groups(t, qo, G, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, UC: tl.constexpr, BITS: tl.constexpr,
                 MASK_K: tl.constexpr):
    """Group indices of tile t's units (W3 g32/g64: of their 4 blocks; else all four equal)."""
    if BLOCK_K > GROUP:
        g0 = _group_of(t, qo, G, BLOCK_K, GROUP, MASK_K)
    else:  # the tile lies in one group: one index for all units
        g0 = (t * BLOCK_K) // GROUP
    g1, g2, g3 = g0, g0, g0
    if BITS == 3 and GROUP < UC:
        if GROUP == 32:
            g1 = _group_of(t, qo + 32, G, BLOCK_K, GROUP, MASK_K)
            g3 = _group_of(t, qo + 96, G, BLOCK_K, GROUP, MASK_K)
        g2 = _group_of(t, qo + 64, G, BLOCK_K, GROUP, MASK_K)
        if GROUP == 64:
            g3 = g2
    return g0, g1, g2, g3


@triton.jit
def _load_groups(blk, n_ok2, g0, g1, g2, g3, stride_g, BITS: tl.constexpr, GROUP: tl.constexpr,
                 UC: tl.constexpr, MASK_N: tl.constexpr):
    """Scales (or zeros) of a tile's units: W3 g32/g64 one per block of the 4, else the same
    four times."""
    v0 = _load_rows(blk, n_ok2, g0, stride_g, MASK_N)
    v1, v2, v3 = v0, v0, v0
    if BITS == 3 and GROUP < UC:
        if GROUP == 32:
            v1 = _load_rows(blk, n_ok2, g1, stride_g, MASK_N)
            v3 = _load_rows(blk, n_ok2, g3, stride_g, MASK_N)
        v2 = _load_rows(blk, n_ok2, g2, stride_g, MASK_N)
        if GROUP == 64:
            v3 = v2
    return v0, v1, v2, v3


@triton.jit
def _consts(z, BITS: tl.constexpr, E: tl.constexpr):
    """The fma addends −(1024·2^-p + z)·2^-E of a row's fields at bit p of a half (W4: p = 0, 4;
    W3: 0, 3, 6; W2: 0, 2, 4, 6), from its integer zero z. Integer ops only: o + z is exact in
    fp16 with bit pattern bits(o) + z/ulp(o) (0x6400 + z for 1024 + z, 0x5400 + 16z for
    64 + z, 0x5800 + 8z for 128 + z, 0x5C00 + 4z for 256 + z, 0x4C00 + 64z for 16 + z), the
    sign is 0x8000 and ·2^-E takes E from the exponent (E·0x400)."""
    z = z.to(tl.int32)
    D: tl.constexpr = E * 0x400
    c0 = pair16(0xE400 - D + z)
    if BITS == 4:
        c1 = pair16(0xD400 - D + 16 * z)
        c2 = c1
        c3 = c1
    elif BITS == 3:  # fields at bits 3 and 6: −(128 + z), −(16 + z)
        c1 = pair16(0xD800 - D + 8 * z)
        c2 = pair16(0xCC00 - D + 64 * z)
        c3 = c2
    else:
        c1 = pair16(0xDC00 - D + 4 * z)
        c2 = pair16(0xD400 - D + 16 * z)
        c3 = pair16(0xCC00 - D + 64 * z)
    return c0, c1, c2, c3


@triton.jit
def _load_x(x_ptr, xi, Kh, MASK_K: tl.constexpr):
    if MASK_K:
        return tl.load(x_ptr + xi, mask=xi < Kh, other=0)
    return tl.load(x_ptr + xi)


@triton.jit
def _word(wj, acc, x_ptr, xi, Kh, magic, c0, c1, c2, c3, m0, m1, m2, m3,
          BITS: tl.constexpr, MASK_K: tl.constexpr, EMULATE: tl.constexpr):
    """acc += the products of one weight word per (row, quad) with its x (loaded here)."""
    r0, r1, r2, r3 = _split4(_load_x(x_ptr, xi, Kh, MASK_K))
    if BITS == 4:
        p0, p1, p2, p3 = _xpairs4(r0, r1, r2, r3, EMULATE)
        acc = _word4(wj, acc, magic, c0, c1, m0, m1, p0, p1, p2, p3, EMULATE)
    else:
        r4, r5, r6, r7 = _split4(_load_x(x_ptr, xi + 4, Kh, MASK_K))
        p0, p1, p2, p3, p4, p5, p6, p7 = _xpairs2(r0, r1, r2, r3, r4, r5, r6, r7, EMULATE)
        acc = _word2(wj, acc, magic, c0, c1, c2, c3, m0, m1, m2, m3, p0, p1, p2, p3, p4, p5, p6, p7, EMULATE)
    return acc


@triton.jit
def _flush(facc, acc, s, EMULATE: tl.constexpr):
    """facc += s·(lo + hi) of an f16x2 chain, in fp32 (s: the chain's scale)."""
    return facc + s.to(tl.float32) * _to_f32(acc, EMULATE)


@triton.jit
def _tile(facc, w, s, z, x_ptr, xb, Kh, magic, m0, m1, m2, m3,
          BITS: tl.constexpr, E: tl.constexpr, MASK_K: tl.constexpr, EMULATE: tl.constexpr):
    """facc [NQ, BLOCK_N] fp32 += one tile: its 4 words per (quad, row) chained in f16x2,
    then scaled and added in fp32. xb: x word index of each quad's first code."""
    XW: tl.constexpr = 16 // BITS  # x int32 words per weight word
    c0, c1, c2, c3 = _consts(z, BITS, E)
    w0, w1, w2, w3 = _split4(w)
    acc = tl.zeros(facc.shape, dtype=tl.int32)  # f16x2 {0, 0}
    acc = _word(w0, acc, x_ptr, xb, Kh, magic, c0, c1, c2, c3, m0, m1, m2, m3, BITS, MASK_K, EMULATE)
    acc = _word(w1, acc, x_ptr, xb + XW, Kh, magic, c0, c1, c2, c3, m0, m1, m2, m3, BITS, MASK_K, EMULATE)
    acc = _word(w2, acc, x_ptr, xb + 2 * XW, Kh, magic, c0, c1, c2, c3, m0, m1, m2, m3, BITS, MASK_K, EMULATE)
    acc = _word(w3, acc, x_ptr, xb + 3 * XW, Kh, magic, c0, c1, c2, c3, m0, m1, m2, m3, BITS, MASK_K, EMULATE)
    return _flush(facc, acc, s, EMULATE)


@triton.jit
def _blk3(acc, w0, w1, w2, z, x_ptr, xi, Kh, magic, m0, m3, m6, E: tl.constexpr, MASK_K: tl.constexpr,
          EMULATE: tl.constexpr):
    """acc += one W3 block (32 codes) per (unit, row); xi: the x words of its first 8 codes."""
    c0, c3, c6, _ = _consts(z, 3, E)
    r0, r1, r2, r3 = _split4(_load_x(x_ptr, xi, Kh, MASK_K))
    r4, r5, r6, r7 = _split4(_load_x(x_ptr, xi + 4, Kh, MASK_K))
    p0, p1, p2, p3, p4, p5, p6, p7 = _xpairs2(r0, r1, r2, r3, r4, r5, r6, r7, EMULATE)  # {x_j, x_j+8}
    r0, r1, r2, r3 = _split4(_load_x(x_ptr, xi + 8, Kh, MASK_K))
    r4, r5, r6, r7 = _split4(_load_x(x_ptr, xi + 12, Kh, MASK_K))
    p8, p9, p10, p11, p12, p13, p14, p15 = _xpairs2(r0, r1, r2, r3, r4, r5, r6, r7, EMULATE)  # j = 16..23
    return _block3(w0, w1, w2, acc, magic, c0, c3, c6, m0, m3, m6, p0, p1, p2, p3, p4, p5, p6, p7,
                   p8, p9, p10, p11, p12, p13, p14, p15, EMULATE)


@triton.jit
def _tile3(facc, wa, wb, wc, s0, z0, s1, z1, s2, z2, s3, z3, x_ptr, xb, Kh, magic, m0, m3, m6,
           E: tl.constexpr, GROUP: tl.constexpr, MASK_K: tl.constexpr, EMULATE: tl.constexpr):
    """facc += one W3 tile: per (unit, row) the 12 words wa | wb | wc (4 blocks of 3 words,
    scales s0..s3), chained in f16x2 over two blocks at a time (32 products per half, as W2),
    one block at a time for g32 (a chain takes one scale)."""
    a0, a1, a2, a3 = _split4(wa)
    b0, b1, b2, b3 = _split4(wb)
    c0, c1, c2, c3 = _split4(wc)
    acc = tl.zeros(facc.shape, dtype=tl.int32)
    acc = _blk3(acc, a0, a1, a2, z0, x_ptr, xb, Kh, magic, m0, m3, m6, E, MASK_K, EMULATE)
    if GROUP == 32:
        facc = _flush(facc, acc, s0, EMULATE)
        acc = tl.zeros(facc.shape, dtype=tl.int32)
    acc = _blk3(acc, a3, b0, b1, z1, x_ptr, xb + 16, Kh, magic, m0, m3, m6, E, MASK_K, EMULATE)
    facc = _flush(facc, acc, s1, EMULATE)
    acc = tl.zeros(facc.shape, dtype=tl.int32)
    acc = _blk3(acc, b2, b3, c0, z2, x_ptr, xb + 32, Kh, magic, m0, m3, m6, E, MASK_K, EMULATE)
    if GROUP == 32:
        facc = _flush(facc, acc, s2, EMULATE)
        acc = tl.zeros(facc.shape, dtype=tl.int32)
    acc = _blk3(acc, c1, c2, c3, z3, x_ptr, xb + 48, Kh, magic, m0, m3, m6, E, MASK_K, EMULATE)
    return _flush(facc, acc, s3, EMULATE)


@triton.jit
def _load_w(ptrs, wq, n_ok, left, ok, WPT: tl.constexpr, MASKED: tl.constexpr, GATED: tl.constexpr):
    """Words of the tile; `left`: words of the row from this tile on; GATED: none unless `ok`
    (as no words left). (Cache hints on these loads, .cg or evict_first, measured no faster:
    docs/kernels.md §v12.)"""
    if GATED:
        left = tl.where(ok, tl.minimum(left, WPT), 0)
    if MASKED:
        return tl.load(ptrs, mask=n_ok & (wq < left), other=0)
    if GATED:
        return tl.load(ptrs, mask=wq < left, other=0)
    return tl.load(ptrs)


@triton.jit
def _load_words(qw_blk, t, ok, stride_qt, rows, wq, n_ok, Wn, WPT: tl.constexpr, BITS: tl.constexpr,
                MASKED: tl.constexpr, GATED: tl.constexpr):
    """Tile t's words: a quad per (unit, row), W3 three (for other bits the second and third
    are the first). GATED: read only if `ok` (a prefetch past the program's last tile)."""
    ptrs = qw_blk + t * stride_qt + rows + wq
    w = _load_w(ptrs, wq, n_ok, Wn - t * WPT, ok, WPT, MASKED, GATED)
    wb, wc = w, w
    if BITS == 3:  # the unit's other two quads
        wb = _load_w(ptrs + 4, wq + 4, n_ok, Wn - t * WPT, ok, WPT, MASKED, GATED)
        wc = _load_w(ptrs + 8, wq + 8, n_ok, Wn - t * WPT, ok, WPT, MASKED, GATED)
    return w, wb, wc


@triton.jit
def _group_of(t, qo, G, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, MASK_K: tl.constexpr):
    """Group index of code t·BLOCK_K + qo (qo [NQ, 1]: a quad's or a W3 block's first code)."""
    g = (t * BLOCK_K + qo) // GROUP
    if MASK_K:  # quads past K (a partial last tile) read the last group and meet x = 0
        g = tl.minimum(g, G - 1)
    return g


@triton.jit(do_not_specialize=["zero", "stride_sn", "stride_zn"])  # stride_sn/zn: see the layout comment
def _gemv_h2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    N, K8, Wn4, G, zero,
    stride_qb4, stride_qt4, stride_qn4, stride_sb, stride_sg, stride_sn, stride_zb, stride_zg, stride_zn,
    stride_os,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr, FUSED: tl.constexpr, STAGES: tl.constexpr, EMULATE: tl.constexpr,
    E: tl.constexpr, PREFETCH: tl.constexpr = 0, PDL: tl.constexpr = 0,
):
    # x_ptr: x as int32 words (fp16 pairs). K8 = K / 8, Wn4 = words per row / 4; the word strides
    # come divided by 4 so that Triton knows 16-byte alignment (128-bit loads, masks constant
    # over a quad). Addresses go through block/tile strides as in gemv.py: row-major codes
    # (a K tile = the next WPT words of each row) and tile-major ones (tiles.py: one tile =
    # one contiguous [BLOCK_N, WPT] block) share this code.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    K = K8 * 8
    Kh = K8 * 4
    Wn = Wn4 * 4
    stride_qt = stride_qt4 * 4
    # a unit: what one thread holds of a row per step, 4 words (W4/W2: a quad, 128 / BITS
    # codes) or 12 (W3: 3 quads, 4 blocks of 32 codes in 3 words)
    UW: tl.constexpr = 12 if BITS == 3 else 4
    UC: tl.constexpr = UW * 32 // BITS
    NQ: tl.constexpr = BLOCK_K // UC  # units per row and tile
    WPT: tl.constexpr = BLOCK_K * BITS // 32
    MASKED: tl.constexpr = not (EVEN_N and EVEN_K)
    MASK_K: tl.constexpr = not EVEN_K
    MASK_N: tl.constexpr = not EVEN_N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    r = tl.arange(0, BLOCK_N)
    # Tiles are [NQ, BLOCK_N, 4] words, quads first: Triton's coalescing breaks ties in
    # contiguity towards the first axis, so a warp's threads then span the quads of 8 rows
    # (512 contiguous bytes of a tile-major tile) and each thread holds 2+ rows of one quad,
    # sharing its x pairs. The scale and zero loads, [NQ, BLOCK_N], get the same split
    # (stride_sn is never specialised: a known unit stride would make rows their fast
    # axis), so nothing is shuffled through shared memory in the K loop.
    rows = r[None, :, None] * (stride_qn4 * 4)
    n_ok = n_mask[None, :, None]
    r2 = r[None, :] + tl.zeros([NQ, 1], dtype=tl.int32)  # [NQ, BLOCK_N]
    n_ok2 = (pid_n * BLOCK_N + r2) < N
    q1 = tl.arange(0, NQ)
    q3 = q1[:, None, None]
    wq = q3 * UW + tl.arange(0, 4)[None, None, :]  # word of the tile, [NQ, 1, 4] (W3: + 4, + 8)
    xq = q3 * (UC // 2) + tl.arange(0, 4)[None, None, :]  # the 4 x words of each unit's first 8 codes
    qo = q1[:, None] * UC  # first code of each unit in the tile, [NQ, 1]
    qw_blk = qw_ptr + pid_n * (stride_qb4 * 4)
    s_blk = s_ptr + pid_n * stride_sb + r2 * stride_sn
    z_blk = z_ptr + pid_n * stride_zb + r2 * stride_zn

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    if PDL > 1:  # launched early (pdl.py): the first PDL − 1 code tiles into L2 meanwhile
        n_pre = tl.minimum(tl.maximum(t_end - t_start, 1), PDL - 1)
        prefetch_l2(qw_blk + tl.minimum(t_start, k_tiles - 1) * stride_qt, n_pre * (BLOCK_N * WPT * 4))
    if PDL > 0:
        pdl_wait()

    # a 0 in every thread's own register: the f16x2 constants below are then per-thread
    # values; from the uniform `zero` ptxas kept them in uniform registers and copied one
    # into a register for every PTX block (0.4 instructions per code)
    zero = _thread_zero(r2, zero, EMULATE)
    magic = zero + 0x64006400
    # {2^-(p+E)}² for the fields at bit p of a half (pow2_f16(n) = (15 − n) << 10)
    m0 = zero + ((15 - E) << 10) * 0x10001
    if BITS == 2:  # p = 2, 4, 6
        m1 = zero + ((13 - E) << 10) * 0x10001
        m2 = zero + ((11 - E) << 10) * 0x10001
        m3 = zero + ((9 - E) << 10) * 0x10001
    elif BITS == 3:  # p = 3, 6
        m1 = zero + ((12 - E) << 10) * 0x10001
        m2 = zero + ((9 - E) << 10) * 0x10001
        m3 = m2
    else:  # p = 4
        m1 = zero + ((11 - E) << 10) * 0x10001
        m2 = m1
        m3 = m1
    if PER_CHANNEL:
        s = _load_rows(s_blk, n_ok2, 0, stride_sg, MASK_N)
        z = _load_rows(z_blk, n_ok2, 0, stride_zg, MASK_N)

    facc = tl.zeros([NQ, BLOCK_N], dtype=tl.float32)
    if not PER_CHANNEL:
        # Scales are loaded one tile ahead: they are needed only when a chain is flushed, so
        # ptxas issues their loads late in the trip, and read in the same trip their latency
        # came on top of the words' (measured 2026-11-24: grouped classes up to 1.5× slower)
        g0, g1, g2, g3 = _tile_groups(tl.minimum(t_start, k_tiles - 1), qo, G, BLOCK_K, GROUP, UC, BITS, MASK_K)
        sn0, sn1, sn2, sn3 = _load_groups(s_blk, n_ok2, g0, g1, g2, g3, stride_sg, BITS, GROUP, UC, MASK_N)
        if PREFETCH:
            zn0, zn1, zn2, zn3 = _load_groups(z_blk, n_ok2, g0, g1, g2, g3, stride_zg, BITS, GROUP, UC, MASK_N)
    if PREFETCH:  # the words of tile t + 1 are read while tile t is unpacked
        wn0, wn1, wn2 = _load_words(qw_blk, t_start, t_start < t_end, stride_qt, rows, wq, n_ok, Wn, WPT, BITS,
                                    MASKED, True)
    # STAGES > 1: Triton's pipeliner copies the words STAGES − 1 tiles ahead (cp.async)
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        if PREFETCH:
            w, wb, wc = wn0, wn1, wn2
            wn0, wn1, wn2 = _load_words(qw_blk, t + 1, t + 1 < t_end, stride_qt, rows, wq, n_ok, Wn, WPT, BITS,
                                        MASKED, True)
        else:
            w, wb, wc = _load_words(qw_blk, t, True, stride_qt, rows, wq, n_ok, Wn, WPT, BITS, MASKED, False)
        if not PER_CHANNEL:
            # each unit's own group: a tile may span groups (a unit never does, but for W3
            # g32/g64, whose blocks get their own)
            if PREFETCH:
                z, z1, z2, z3 = zn0, zn1, zn2, zn3
            else:
                g0, g1, g2, g3 = _tile_groups(t, qo, G, BLOCK_K, GROUP, UC, BITS, MASK_K)
                z, z1, z2, z3 = _load_groups(z_blk, n_ok2, g0, g1, g2, g3, stride_zg, BITS, GROUP, UC, MASK_N)
            s, s1, s2, s3 = sn0, sn1, sn2, sn3
            h0, h1, h2, h3 = _tile_groups(tl.minimum(t + 1, k_tiles - 1), qo, G, BLOCK_K, GROUP, UC, BITS, MASK_K)
            sn0, sn1, sn2, sn3 = _load_groups(s_blk, n_ok2, h0, h1, h2, h3, stride_sg, BITS, GROUP, UC, MASK_N)
            if PREFETCH:
                zn0, zn1, zn2, zn3 = _load_groups(z_blk, n_ok2, h0, h1, h2, h3, stride_zg, BITS, GROUP, UC, MASK_N)
        else:
            s1, s2, s3, z1, z2, z3 = s, s, s, z, z, z
        if BITS == 3:
            facc = _tile3(facc, w, wb, wc, s, z, s1, z1, s2, z2, s3, z3, x_ptr, t * (BLOCK_K // 2) + xq, Kh,
                          magic, m0, m1, m2, E, GROUP, MASK_K, EMULATE)
        else:
            facc = _tile(facc, w, s, z, x_ptr, t * (BLOCK_K // 2) + xq, Kh, magic, m0, m1, m2, m3, BITS, E,
                         MASK_K, EMULATE)

    y = tl.sum(facc, axis=0) * (1 << E)  # the chains' 2^-E back (exact)
    _store_rows(out_ptr, stride_os, 0, pid_k, pid_k * 0, y_ptr, 0, cnt_ptr + pid_n, y, y, y, y,
                b_ptr, offs_n, n_mask, 1, 1, SPLIT_K, HAS_BIAS, FUSED)


def gemv_h2_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int | None,
                   bias: Tensor | None = None, config: dict | None = None, out: Tensor | None = None,
                   workspace: Tensor | None = None, emulate: bool = False) -> Tensor:
    """gemv_matmul's packed-half2 path (M = 1, fp16, W4/W3/W2); eligibility is gemv.h2_eligible's.

    qweight row-major [N, Wn] or tile-major (tiles.py), scales/zeros [N, G] or [N/BN, G, BN];
    out/workspace as in gemv_matmul (split-K partials added by the row block's last program).
    config keys: BLOCK_N, BLOCK_K (whole units: a quad of words, W3 12 words; tile-major: the
    layout's tile), SPLIT_K, num_warps, STAGES. emulate=True runs the Triton twin of every PTX
    block (the interpreter's path)."""
    M, K = x.shape
    N, Wn, BN_l, wpt = packed_geometry(qweight)
    tiled = BN_l != 0
    sig = ("gemv_h2", tuple(qweight.shape), bits, group_size, scales.dim(), bias is not None)
    resident = occupancy.recorded(sig)
    defaulted = config is None
    if defaulted:
        fixed = {"BLOCK_N": BN_l, "BLOCK_K": wpt * 32 // bits} if tiled else None
        config = default_h2_config(N, K, bits, group_size, _num_sms(x.device), fixed, tiled=tiled, resident=resident)
    cfg = {k: v for k, v in config.items() if k not in ("H2", "BLOCK_M")}
    BN, BK, SK = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("SPLIT_K")
    stages = int(cfg.pop("STAGES", 1))
    prefetch = int(cfg.pop("PREFETCH", 0))
    cfg.setdefault("num_stages", 1)
    pdl = 0 if emulate else pdl_mode(x.device)
    if pdl:
        pdl = pdl if tiled else 1  # a row-major program's tiles are not one contiguous block
        cfg["launch_pdl"] = True
    unit = h2_unit_codes(bits)
    assert M == 1 and x.dtype == torch.float16 and bits in (2, 3, 4)
    assert K % 8 == 0 and Wn % 4 == 0 and qweight.stride(-1) == 1 and x.data_ptr() % 4 == 0
    assert BK % unit == 0, "whole units (a quad of words; W3: 3 quads) per row and tile"
    assert group_size is None or group_size % h2_group_codes(bits) == 0, "a unit (W3: a block) in one group"
    if tiled:
        assert (BN, BK) == (BN_l, wpt * 32 // bits), "config tile differs from the tile-major layout"
        q_strides = (qweight.stride(0), qweight.stride(1), qweight.stride(2))
    else:
        q_strides = (BN * qweight.stride(0), words_per_tile(bits, BK), qweight.stride(0))
    assert all(st % 4 == 0 for st in q_strides), "quads of words must be 16-byte aligned"
    if scales.dim() == 3:  # [N / BN, G, BN]
        assert scales.shape[2] == BN and zeros.shape == scales.shape
        s_strides = (scales.stride(0), scales.stride(1), scales.stride(2))
        z_strides = (zeros.stride(0), zeros.stride(1), zeros.stride(2))
    else:
        s_strides = (BN * scales.stride(0), scales.stride(1), scales.stride(0))
        z_strides = (BN * zeros.stride(0), zeros.stride(1), zeros.stride(0))
    grid = (triton.cdiv(N, BN), SK)
    out, stride_os, y, counters, fused = split_k_buffers(x, M, N, SK, grid[0], out, workspace)
    x32 = x.reshape(K).view(torch.int32)  # fp16 pairs {x_2m, x_2m+1}
    compiled = _gemv_h2_kernel[grid](
        x32, qweight, scales, zeros, bias if bias is not None else scales, out, y, counters,
        N, K // 8, Wn // 4, scales.shape[1], 0,
        *(st // 4 for st in q_strides), *s_strides, *z_strides, stride_os,
        BITS=bits, GROUP=group_size or 0, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK,
        HAS_BIAS=bias is not None, EVEN_N=N % BN == 0, EVEN_K=K % BK == 0,
        PER_CHANNEL=group_size is None, FUSED=fused, STAGES=stages, EMULATE=emulate,
        E=PRESCALE_LOG2[bits], PREFETCH=prefetch, PDL=pdl, **cfg,
    )
    if defaulted and resident is None and not emulate:
        occupancy.record(sig, compiled)
    return y if fused else split_k_result(out, SK, bias, x.dtype)
