"""Triton helpers shared by the kernels: unpack a tile of packed codes straight into fp16/bf16.

The packed layout is qtool.quant.pack's (or its tile-major permutation, tiles.py): row n of
`qweight` is a little-endian bit stream, code k at stream bits [k·b, (k+1)·b). A tile is
BLOCK_N rows × BLOCK_K codes starting at code k0; k0 and BLOCK_K are multiples of 32, so
a tile always starts on a word boundary and 32 codes fill exactly `b` words.

Cost model (why it is written this way): at M = 1 the H100 must turn ~6e12 codes/s into
fp16 to keep up with HBM at 4 bits, close to the integer pipe's rate (64 ops/clk/SM). So
 - each word is loaded once, by one thread, and unpacked in registers;
 - two codes 16 bits apart are extracted by one shift and one AND-OR (`& 0x000F000F |
   0x64006400`): each 16-bit half is then the fp16 number 1024 + code, read by a
   truncation/bitcast, with no int->float conversion (I2F runs at 1/8 the FMA rate);
 - the +1024 (fp16) or +128 (bf16) offset is not subtracted per element: callers fold it
   into the zero-point, Σ (o + q − o − z) x = Σ (o + q) x − (o + z) Σ x;
 - the codes are reassembled with tl.join, which keeps them in the registers of the
   thread that unpacked them (a broadcast-and-shift would spread each word over 8 threads).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def code_offset(IS_BF16: tl.constexpr, BITS: tl.constexpr):
    """The constant o in the values `unpack_tile` returns (o + code)."""
    if IS_BF16:
        if BITS == 8:
            return 0.0
        return 128.0
    return 1024.0


@triton.jit
def _halves(t, IS_BF16: tl.constexpr):
    """int32 holding two 16-bit float patterns -> (low, high) as fp16/bf16."""
    # One return statement: Triton checks every return of a function has one type.
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    lo = t.to(tl.int16).to(DT, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _pair(w, SHIFT: tl.constexpr, MASK: tl.constexpr, MAGIC: tl.constexpr, IS_BF16: tl.constexpr):
    # Codes at bits SHIFT and SHIFT+16 of w, as two floats (MAGIC's value + code).
    lo, hi = _halves(((w >> SHIFT) & MASK) | MAGIC, IS_BF16)
    return tl.join(lo, hi)


@triton.jit
def word_ptrs(qw_ptr, offs_n, w0, wl, stride_qn, Wn, TILE_N: tl.constexpr = 0, TILE_W: tl.constexpr = 0):
    """Pointers [len(offs_n), len(wl)] to words w0 + wl of rows offs_n (w0 a scalar), in
    row-major (TILE_N = 0: row n at n·stride_qn) or tile-major storage (tiles.py:
    [N/TILE_N, Wn/TILE_W, TILE_N, TILE_W]; the words w0 + wl must lie in one tile column,
    which callers ensure by tiles whose word count divides TILE_W). The word axis stays
    `scalar + arange`, so Triton still sees contiguous, aligned runs and vectorises the loads."""
    # if/else, not an early return: Triton still folds constants after a returning branch,
    # and w0 // TILE_W with both compile-time zeros would divide by zero
    if TILE_N == 0:
        ptrs = qw_ptr + offs_n[:, None] * stride_qn + (w0 + wl)[None, :]
    else:
        TILE: tl.constexpr = TILE_N * TILE_W
        nb = offs_n // TILE_N
        rows = nb * (Wn // TILE_W) * TILE + (offs_n - nb * TILE_N) * TILE_W
        wb = w0 // TILE_W
        ptrs = qw_ptr + (wb * TILE + (w0 - wb * TILE_W)) + rows[:, None] + wl[None, :]
    return ptrs


@triton.jit
def load3(qw_ptr, offs_n, stride_qn, w0, wl, n_mask, Wn, MASKED: tl.constexpr,
          TILE_N: tl.constexpr = 0, TILE_W: tl.constexpr = 0):
    """The three words of 3-bit 32-code blocks starting at words w0 + wl [NB] (w0 a scalar)
    of rows `offs_n` (a block never straddles two tile-major tiles: TILE_W is a multiple of 3)."""
    base = word_ptrs(qw_ptr, offs_n, w0, wl, stride_qn, Wn, TILE_N, TILE_W)
    return load3_at(base, n_mask[:, None] & ((w0 + wl)[None, :] < Wn), MASKED)


@triton.jit
def load3_at(base, mask, MASKED: tl.constexpr):
    """The three words of 3-bit blocks whose first words `base` points at (any shape)."""
    if MASKED:
        a = tl.load(base, mask=mask, other=0)
        b = tl.load(base + 1, mask=mask, other=0)
        c = tl.load(base + 2, mask=mask, other=0)
    else:
        a = tl.load(base)
        b = tl.load(base + 1)
        c = tl.load(base + 2)
    return a, b, c


@triton.jit
def code3(w0, w1, w2, J: tl.constexpr):
    """Integer 3-bit code J (0..31) of a 32-code block held in words w0, w1, w2."""
    B: tl.constexpr = 3 * J
    A: tl.constexpr = B // 32
    S: tl.constexpr = B % 32
    if A == 0:
        w = w0
        nxt = w1
    elif A == 1:
        w = w1
        nxt = w2
    else:
        w = w2
        nxt = w2
    if S <= 29:
        c = (w >> S) & 7
    else:  # straddles two words (codes 10 and 21)
        c = ((w >> S) & ((1 << (32 - S)) - 1)) | ((nxt << (32 - S)) & 7)
    return c


@triton.jit
def _one3(w0, w1, w2, J: tl.constexpr, IS_BF16: tl.constexpr):
    """3-bit code J (0..31) of a 32-code block held in words w0, w1, w2, as o + code."""
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    MAGIC: tl.constexpr = 0x4300 if IS_BF16 else 0x6400
    return (code3(w0, w1, w2, J) | MAGIC).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _tree4(a, b, c, d):
    # tl.join appends a minor axis, so nesting joins interleaves: leaves given in
    # bit-reversed order (0, 2, 1, 3) come out in natural order.
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def _tree8(a0, a1, a2, a3, a4, a5, a6, a7):
    return tl.join(_tree4(a0, a2, a4, a6), _tree4(a1, a3, a5, a7))


@triton.jit
def _c3(w0, w1, w2, J: tl.constexpr, STEP: tl.constexpr, IS_BF16: tl.constexpr):
    """_tree8 of the 3-bit codes J, J+STEP, …, J+7·STEP."""
    return _tree8(_one3(w0, w1, w2, J, IS_BF16), _one3(w0, w1, w2, J + STEP, IS_BF16),
                  _one3(w0, w1, w2, J + 2 * STEP, IS_BF16), _one3(w0, w1, w2, J + 3 * STEP, IS_BF16),
                  _one3(w0, w1, w2, J + 4 * STEP, IS_BF16), _one3(w0, w1, w2, J + 5 * STEP, IS_BF16),
                  _one3(w0, w1, w2, J + 6 * STEP, IS_BF16), _one3(w0, w1, w2, J + 7 * STEP, IS_BF16))


@triton.jit
def _tree32(w0, w1, w2, IS_BF16: tl.constexpr):
    """All 32 codes of a 3-bit block in natural order: shape [..., 2, 2, 2, 2, 2].

    The natural-order tree of n leaves is join(tree(even leaves), tree(odd leaves)),
    applied twice here above _tree8: leaves ≡ 0, 2, 1, 3 (mod 4).
    """
    return tl.join(tl.join(_c3(w0, w1, w2, 0, 4, IS_BF16), _c3(w0, w1, w2, 2, 4, IS_BF16)),
                   tl.join(_c3(w0, w1, w2, 1, 4, IS_BF16), _c3(w0, w1, w2, 3, 4, IS_BF16)))


@triton.jit
def unpack_tile(
    qw_ptr,
    offs_n,
    n_mask,
    k0,
    Wn,
    stride_qn,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_BF16: tl.constexpr,
    MASKED: tl.constexpr = True,
    TILE_N: tl.constexpr = 0,
    TILE_W: tl.constexpr = 0,
):
    """[BLOCK_N, BLOCK_K] fp16/bf16 tile of o + code (o = code_offset), codes k0 … k0+BLOCK_K−1.

    Exact: o + code is an integer below 2^11 (fp16) or 2^8 (bf16). Words past the end of a
    row (Wn words) read as 0; callers mask the matching activations. MASKED=False (the
    caller knows N and K are multiples of the tile) drops the bounds checks. TILE_N, TILE_W:
    the storage's tile-major tile (0: row-major), see word_ptrs.
    """
    if IS_BF16:
        MAGIC: tl.constexpr = 0x43004300
    else:
        MAGIC: tl.constexpr = 0x64006400
    if BITS == 3:
        NB: tl.constexpr = BLOCK_K // 32
        w0, w1, w2 = load3(qw_ptr, offs_n, stride_qn, (k0 // 32) * 3, tl.arange(0, NB) * 3, n_mask, Wn, MASKED,
                           TILE_N, TILE_W)
        vals = _tree32(w0, w1, w2, IS_BF16)
    else:
        CPW: tl.constexpr = 32 // BITS  # codes per word
        BW: tl.constexpr = BLOCK_K // CPW
        wi = k0 // CPW + tl.arange(0, BW)
        ptrs = word_ptrs(qw_ptr, offs_n, k0 // CPW, tl.arange(0, BW), stride_qn, Wn, TILE_N, TILE_W)
        if MASKED:
            w = tl.load(ptrs, mask=n_mask[:, None] & (wi[None, :] < Wn), other=0)
        else:
            w = tl.load(ptrs)
        if BITS == 4:
            # pair i holds codes (i, i + 4)
            vals = _tree4(_pair(w, 0, 0x000F000F, MAGIC, IS_BF16), _pair(w, 4, 0x000F000F, MAGIC, IS_BF16),
                          _pair(w, 8, 0x000F000F, MAGIC, IS_BF16), _pair(w, 12, 0x000F000F, MAGIC, IS_BF16))
        elif BITS == 2:
            # pair i holds codes (i, i + 8)
            vals = _tree8(_pair(w, 0, 0x00030003, MAGIC, IS_BF16), _pair(w, 2, 0x00030003, MAGIC, IS_BF16),
                          _pair(w, 4, 0x00030003, MAGIC, IS_BF16), _pair(w, 6, 0x00030003, MAGIC, IS_BF16),
                          _pair(w, 8, 0x00030003, MAGIC, IS_BF16), _pair(w, 10, 0x00030003, MAGIC, IS_BF16),
                          _pair(w, 12, 0x00030003, MAGIC, IS_BF16), _pair(w, 14, 0x00030003, MAGIC, IS_BF16))
        else:
            # 8 bits: pair i holds codes (i, i + 2); fp16 holds 1024 + code exactly, bf16 does
            # not, so bf16 subtracts the offset in fp16 first (code ≤ 255 is exact in bf16).
            p0 = _pair(w, 0, 0x00FF00FF, 0x64006400, False)
            p1 = _pair(w, 8, 0x00FF00FF, 0x64006400, False)
            vals = tl.join(p0, p1)
            if IS_BF16:
                vals = (vals - 1024.0).to(tl.bfloat16)
    return tl.reshape(vals, [BLOCK_N, BLOCK_K])


# ---------------------------------------------------------------- W4 pairs for tl.dot (skinny)
# tl.dot on ≤ 2 warps is mma.sync fed from registers: with kWidth 8 a thread holds the 8
# codes of one word as 4 registers of (k, k+1) pairs. The pairs one LOP3 extracts are
# {c_i, c_{i+4}}, so unpack_tile's tile needs 4 PRMT per word to re-pair them, and its
# zero-point subtraction runs on single halves (docs/kernels.md §v14). Here the tile is
# handed to tl.dot in a *permuted* K order, logical 8j + 2i + e = code i + 4e of word j, so
# each extracted pair is already one operand register, and x is permuted the same way
# (`pairs4_x`: a register permute of the x operand, shared by every row). A dot product does
# not care about the order of K. Per word: one shift, 4 LOP3, 4 f16x2 FMA (q − z, exact),
# plus one f16x2 multiply per pair when a tile spans groups (SCALED).
# $0..$3 = pairs i = 0..3 {c_i, c_{i+4}}, $4 = word, $5 = magic², $6/$7 = mul/add for pairs
# 0, 2, $8/$9 for pairs 1, 3, $10 = {s}², $11 = {−0}² (SCALED). fp16: pairs 1 and 3 are masked at bits
# 4–7 in place (1024 + 16q; mul 1/16, add −(64 + z), exact: Marlin's trick, as in gemv_h2).
def _pairs4_asm(bf16: bool, scaled: bool) -> str:
    t = "bf16x2" if bf16 else "f16x2"
    if bf16:  # 128 + 16q is not a bf16 integer above 255: shift each field down to bits 0–3
        head = ["shr.u32 a, $4, 4;", "shr.u32 b, $4, 8;", "shr.u32 c, $4, 12;"]
        src = (("$4", "0x000F000F"), ("a", "0x000F000F"), ("b", "0x000F000F"), ("c", "0x000F000F"))
    else:
        head = ["shr.u32 b, $4, 8;"]
        src = (("$4", "0x000F000F"), ("$4", "0x00F000F0"), ("b", "0x000F000F"), ("b", "0x00F000F0"))
    lines = ["{", ".reg .b32 a, b, c, t0, t1, t2, t3;", *head]
    for i, (w, mask) in enumerate(src):
        lines.append(f"lop3.b32 t{i}, {w}, {mask}, $5, 0xEA;")
        lines.append(f"fma.rn.{t} t{i}, t{i}, {'$6, $7' if i % 2 == 0 else '$8, $9'};")
        if scaled:  # bf16x2 mul needs sm_90 in PTX; an fma with −0 is the same rounding everywhere
            lines.append(f"fma.rn.{t} t{i}, t{i}, $10, $11;" if bf16 else f"mul.rn.{t} t{i}, t{i}, $10;")
    lines += [f"mov.b32 ${i}, t{i};" for i in range(4)] + ["}"]
    return "\n".join(lines)


_PAIRS4_F16 = tl.constexpr(_pairs4_asm(False, False))
_PAIRS4_F16_S = tl.constexpr(_pairs4_asm(False, True))
_PAIRS4_BF16 = tl.constexpr(_pairs4_asm(True, False))
_PAIRS4_BF16_S = tl.constexpr(_pairs4_asm(True, True))


@triton.jit
def _emu_pair(w, P: tl.constexpr, z, s, SCALED: tl.constexpr, IS_BF16: tl.constexpr):
    # What the PTX yields for pair P, in Triton ops (the interpreter runs no PTX): (q − z)·s
    # with one rounding to fp16/bf16 when SCALED (q − z is exact).
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    lo = ((w >> (4 * P)) & 0xF).to(tl.float32) - z
    hi = ((w >> (4 * P + 16)) & 0xF).to(tl.float32) - z
    if SCALED:
        lo = lo * s
        hi = hi * s
    return tl.join(lo.to(DT), hi.to(DT))


@triton.jit
def _split(p, IS_BF16: tl.constexpr):
    # int32 pair -> [..., 2] (low half first): register-free, the halves are the operand register
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    return tl.join(p.to(tl.int16).to(DT, bitcast=True), (p >> 16).to(tl.int16).to(DT, bitcast=True))


@triton.jit
def pair16(b):
    """16-bit pattern b (int32, 0..0xFFFF) in both halves."""
    return b | (b << 16)


@triton.jit
def pairs4_consts(z, s, IS_BF16: tl.constexpr):
    """The PTX's per-group operands from integer zero points z (0 ≤ z < 16, any int dtype) and
    scales s in fp16/bf16 (any shape, before they are broadcast over a group's words, so each
    is computed once per group and row): (add for pairs 0 and 2, add for pairs 1 and 3, {s}²).

    The adds are −(1024 + z) and −(64 + z) in fp16 (−(128 + z) in bf16), exact: they are
    written as bit patterns, not converted (the fp16 1024 + z is 0x6400 + z, 64 + z is
    0x5400 + 16z; the bf16 128 + z is 0x4300 + z), which takes 2 integer ops per value
    where int → fp32 → add → fp16 took 3 conversions and adds (§v15), as gemv_h2's
    `_load_sz` builds its own."""
    zi = z.to(tl.int32)
    if IS_BF16:
        add_a = pair16(0xC300 | zi)
        add_b = add_a
    else:
        add_a = pair16(0xE400 | zi)
        add_b = pair16(0xD400 + (zi << 4))
    return add_a, add_b, pair16(s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)


@triton.jit
def pairs4_tile(w, z, s, add_a, add_b, s2, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_BF16: tl.constexpr,
                SCALED: tl.constexpr, EMULATE: tl.constexpr):
    """W4 words w [BLOCK_N, BLOCK_K / 8] -> [BLOCK_N, BLOCK_K] (q − z) (times s if SCALED) in
    fp16/bf16, in the permuted K order of `pairs4_x` (code i + 4e of word j at 8j + 2i + e).
    Per word, all [BLOCK_N, BLOCK_K / 8]: z, s fp32 (read by EMULATE), add_a, add_b, s2 from
    `pairs4_consts` (read by the PTX); s and s2 unused unless SCALED."""
    if EMULATE:
        p0 = _emu_pair(w, 0, z, s, SCALED, IS_BF16)
        p1 = _emu_pair(w, 1, z, s, SCALED, IS_BF16)
        p2 = _emu_pair(w, 2, z, s, SCALED, IS_BF16)
        p3 = _emu_pair(w, 3, z, s, SCALED, IS_BF16)
    else:
        if IS_BF16:
            magic = tl.full(w.shape, 0x43004300, tl.int32)
            mul_a = tl.full(w.shape, 0x3F803F80, tl.int32)  # 1.0
            mul_b = mul_a
        else:
            magic = tl.full(w.shape, 0x64006400, tl.int32)
            mul_a = tl.full(w.shape, 0x3C003C00, tl.int32)  # 1.0
            mul_b = tl.full(w.shape, 0x2C002C00, tl.int32)  # 1/16
        if SCALED:
            if IS_BF16:
                asm: tl.constexpr = _PAIRS4_BF16_S
            else:
                asm: tl.constexpr = _PAIRS4_F16_S
            q0, q1, q2, q3 = tl.inline_asm_elementwise(
                asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [w, magic, mul_a, add_a, mul_b, add_b, s2,
                                                     tl.full(w.shape, -0x7FFF8000, tl.int32)],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            if IS_BF16:
                asm: tl.constexpr = _PAIRS4_BF16
            else:
                asm: tl.constexpr = _PAIRS4_F16
            q0, q1, q2, q3 = tl.inline_asm_elementwise(
                asm, "=r,=r,=r,=r,r,r,r,r,r,r", [w, magic, mul_a, add_a, mul_b, add_b],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        p0 = _split(q0, IS_BF16)
        p1 = _split(q1, IS_BF16)
        p2 = _split(q2, IS_BF16)
        p3 = _split(q3, IS_BF16)
    # [BN, BW, e, a, b] with pair i = 2a + b (joins append a minor axis), then e innermost
    v = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    return tl.reshape(tl.permute(v, (0, 1, 3, 4, 2)), [BLOCK_N, BLOCK_K])


@triton.jit
def pairs4_x(xt, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x tile [BLOCK_M, BLOCK_K] in natural K order -> the order of `pairs4_tile`."""
    return tl.reshape(tl.permute(tl.reshape(xt, [BLOCK_M, BLOCK_K // 8, 2, 4]), (0, 1, 3, 2)), [BLOCK_M, BLOCK_K])
