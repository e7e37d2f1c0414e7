"""NF4 (QLoRA) weights × fp16/bf16 activations, read from NF4Linear's storage as stored.

Storage (qtool/nn/nf4linear.py, docs/format.md §NF4). W [N, K] is flattened row-major
into n = N·K values and cut into blocks of b = `block_size` (32, 64, 128, 256)
consecutive values; the blocks run over the flat index, so when b does not divide K a
block straddles two rows:
  codes         uint8 [ceil(n/2)]   two 4-bit codes per byte, first value in the HIGH nibble
  absmax        fp32 [B]            without double quantization, or instead:
  absmax_q      uint8 [B]           dynamic-map 8-bit codes of absmax − mean
  absmax_scale  fp32 [ceil(B/256)]  one per 256 constants
  absmax_mean   fp32 [1]
Ŵ[i] = levels[code_i] · absmax_{i // b},  absmax_j = dq_map[absmax_q_j] · absmax_scale_{j // 256} + mean.

Kernels (design and predictions: docs/kernels.md §NF4):
  `nf4_skinny_matmul`  M ≤ NF4_SKINNY_MAX_M: fused decode + tensor-core product, split-K.
  `dequantize_nf4`     Ŵ [N, K] in fp16/bf16 for cuBLAS (prefill, and the backward dX = dY·Ŵ).
  `nf4_linear`         NF4Linear's CUDA path (dispatch by M + autograd for dX).
References beside them: `nf4_linear_ref`, `reference_dequantize_nf4` (float64).

Decoding a code is a lookup in the 16-entry table of levels. On the GPU the skinny kernel
holds the table in registers, the operands of `prmt` byte permutes (inline PTX,
`DECODE_ASM`): one int32 word of 8 codes becomes 4 registers of fp16/bf16 pairs in 22
integer instructions (21 after ptxas), ~2.7 per code, no memory traffic. The alternatives compiled for
sm_90 (Triton 3.9) cost more: a load from a 32-byte table in global memory (L1-resident)
is 1 load + 2 address instructions per code and ~10 instructions per code in the loop in
all; `tl.gather` from a register tensor becomes 4 warp shuffles + selects per value; a
`tl.where` tree 15 selects. The interpreter cannot run PTX, so under TRITON_INTERPRET (and
for layouts the word path does not cover) the kernels use the table load, which the GPU
tests also exercise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from qtool_kernels import occupancy
from qtool_kernels._unpack import _halves, _tree8
from qtool_kernels.occupancy import slots, split_k_one_wave
from qtool_kernels.skinny import _num_sms, interpreting, split_k_buffers, split_k_result
from qtool_kernels.tickets import store_nm_tile
from torch import Tensor

from qtool.quant.nf4 import BLOCK_SIZES, DQ_BLOCK, NF4_LEVELS

if TYPE_CHECKING:
    from qtool.nn.nf4linear import NF4Linear

# Above this many rows, dequantize + cuBLAS. Same crossover as the integer kernel until
# `qtool bench kernels --nf4` measures NF4's own.
NF4_SKINNY_MAX_M = 16
SUPPORTED_BLOCKS = BLOCK_SIZES  # powers of two: the kernels' // and % by b are shifts and masks


class NF4Weight(NamedTuple):
    """One NF4 layer's stored tensors (no copies). Exactly one of `absmax` and the three
    double-quantization tensors is set."""

    codes: Tensor
    absmax: Tensor | None
    absmax_q: Tensor | None
    absmax_scale: Tensor | None
    absmax_mean: Tensor | None
    block_size: int
    N: int
    K: int

    @classmethod
    def of(cls, layer: NF4Linear) -> NF4Weight:
        return cls(layer.nf4_codes, layer.absmax, layer.absmax_q, layer.absmax_scale, layer.absmax_mean,
                   layer.block_size, layer.out_features, layer.in_features)

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    def n_blocks(self) -> int:
        return (self.N * self.K + self.block_size - 1) // self.block_size

    def pointers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(absmax, absmax_q, absmax_scale, absmax_mean) for a kernel launch; the unused
        ones point at `codes` (never dereferenced: DQ is a constexpr)."""
        c = self.codes
        if self.double_quant:
            return c, self.absmax_q, self.absmax_scale, self.absmax_mean
        return self.absmax, c, c, c


def level_bits(dtype: torch.dtype) -> list[int]:
    """The 16 NF4 levels rounded to fp16/bf16, as 16-bit patterns (the table the kernels use)."""
    return [b & 0xFFFF for b in torch.tensor(NF4_LEVELS, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]


def table_words(dtype: torch.dtype) -> list[int]:
    """The level table as 8 int32 words for `prmt`: low bytes of levels 0-3, 4-7, 8-11,
    12-15, then the high bytes likewise; level first+i in byte i of its word."""
    lv = level_bits(dtype)
    words = [sum(((lv[f + i] >> (8 * byte)) & 0xFF) << (8 * i) for i in range(4))
             for byte in (0, 1) for f in (0, 4, 8, 12)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as int32


# One int32 word of packed codes ($4) -> 4 int32 registers of fp16/bf16 level pairs ($0..$3),
# the table in registers ($5..$12 = table_words: low bytes {$5,$6} levels 0-7, {$7,$8}
# 8-15; high bytes {$9,$10}, {$11,$12}).
# The word's bytes are little-endian, each two codes with the first in the high nibble, so
# a 16-bit half holds codes (c0, c1, c2, c3) in nibbles (1, 0, 3, 2). `prmt.b32 d, a, b,
# sel` takes byte i of d from the 8 bytes {a, b} by bits 0-2 of nibble i of sel (bit 3
# would switch to sign replication, so it is masked off). Per half: 4 table permutes; 2
# take the 8-15 result where bit 3 of the code is set (selector nibble i = i + 4·bit3);
# 2 interleave low and high bytes into (c0 | c1 << 16) and (c2 | c3 << 16). 22 integer
# instructions per 8 codes; $0..$3 hold codes (0, 1), (2, 3), (4, 5), (6, 7).
_DECODE_HALF = """prmt.b32 ll, $5, $6, {s7};
prmt.b32 lh, $7, $8, {s7};
prmt.b32 hl, $9, $10, {s7};
prmt.b32 hh, $11, $12, {s7};
prmt.b32 lo, ll, lh, {sa};
prmt.b32 hi, hl, hh, {sa};
prmt.b32 {o0}, lo, hi, 0x4051;
prmt.b32 {o1}, lo, hi, 0x6273;
"""
DECODE_ASM = ("{\n.reg .b32 s7, sa, s7h, sah, ll, lh, hl, hh, lo, hi;\n"
              "and.b32 s7, $4, 0x77777777;\n"
              "shr.u32 sa, $4, 1;\n"
              "and.b32 sa, sa, 0x44444444;\n"
              "or.b32 sa, sa, 0x32103210;\n"
              "shr.u32 s7h, s7, 16;\n"
              "shr.u32 sah, sa, 16;\n"
              + _DECODE_HALF.format(s7="s7", sa="sa", o0="$0", o1="$1")
              + _DECODE_HALF.format(s7="s7h", sa="sah", o0="$2", o1="$3") + "}")
_DECODE_ASM = tl.constexpr(DECODE_ASM)


_TABLES: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}


def _tables(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(NF4 levels [16] in `dtype`, dynamic 8-bit map fp32 [256], table_words int32 [8]) on
    `device`, made once: creating them inside a CUDA-graph capture would fail, and per call
    would cost a copy."""
    key = (device, dtype)
    if key not in _TABLES:
        from qtool.quant import nf4

        words = torch.tensor(table_words(dtype) if dtype != torch.float32 else [0] * 8, dtype=torch.int32)
        _TABLES[key] = (nf4.nf4_levels().to(device=device, dtype=dtype), nf4.dynamic_map().to(device),
                        words.to(device))
    return _TABLES[key]


@triton.jit
def _block_absmax(a_ptr, aq_ptr, as_ptr, am_ptr, map_ptr, blk, mask, DQ: tl.constexpr, DQB: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape): as stored, or decoded from the double quantization."""
    if DQ:
        q = tl.load(aq_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(as_ptr + blk // DQB, mask=mask, other=0.0)
        a = tl.load(map_ptr + q) * s + tl.load(am_ptr)
    else:
        a = tl.load(a_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _decode_bytes(b, lut_ptr):
    """uint8 [R, C] -> levels [R, C, 2]: the high nibble is the first value of each pair, so
    reshaping to [R, 2C] gives the flat order."""
    b = b.to(tl.int32)
    return tl.join(tl.load(lut_ptr + (b >> 4)), tl.load(lut_ptr + (b & 15)))


@triton.jit
def _decode_words(cw, t0, t1, t2, t3, t4, t5, t6, t7, IS_BF16: tl.constexpr):
    """int32 [R, C] words of packed codes -> levels [R, C, 2, 2, 2] (flat order), the table
    words t0..t7 in registers (loaded once per program: as PTX immediates, ptxas
    re-materialised them before every permute, one extra move per code)."""
    r0, r1, r2, r3 = tl.inline_asm_elementwise(
        _DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [cw, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    a0, a1 = _halves(r0, IS_BF16)
    a2, a3 = _halves(r1, IS_BF16)
    a4, a5 = _halves(r2, IS_BF16)
    a6, a7 = _halves(r3, IS_BF16)
    return _tree8(a0, a1, a2, a3, a4, a5, a6, a7)


@triton.jit
def _nf4_skinny_kernel(
    # pointers
    x_ptr, c_ptr, a_ptr, aq_ptr, as_ptr, am_ptr, lut_ptr, map_ptr, tab_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    # sizes
    M, N, K, stride_cn, BPR,
    # strides (elements)
    stride_xm, stride_os, stride_om, stride_ym,
    # meta
    BLOCK: tl.constexpr, DQ: tl.constexpr, DQB: tl.constexpr, ALIGNED: tl.constexpr, GPB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, EVEN: tl.constexpr,
    LUT_REGS: tl.constexpr, FUSED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    HK: tl.constexpr = BLOCK_K // 2  # bytes per row of a tile

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    if LUT_REGS:
        t0 = tl.load(tab_ptr)
        t1 = tl.load(tab_ptr + 1)
        t2 = tl.load(tab_ptr + 2)
        t3 = tl.load(tab_ptr + 3)
        t4 = tl.load(tab_ptr + 4)
        t5 = tl.load(tab_ptr + 5)
        t6 = tl.load(tab_ptr + 6)
        t7 = tl.load(tab_ptr + 7)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
        if ALIGNED:
            # b divides K: each row holds K/b whole blocks and starts on a byte, so a tile is
            # BLOCK_K/2 contiguous bytes per row; stride_cn is K/2 bytes, or K/8 int32 words
            # when the codes are read as words (LUT_REGS).
            if LUT_REGS:
                offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                c_ptrs = c_ptr + offs_n[:, None] * stride_cn + offs_w[None, :]
                if EVEN:
                    cw = tl.load(c_ptrs)
                else:
                    cw = tl.load(c_ptrs, mask=n_mask[:, None] & (offs_w[None, :] < stride_cn), other=0)
                v = _decode_words(cw, t0, t1, t2, t3, t4, t5, t6, t7, IS_BF16)
                v = tl.reshape(v, [BLOCK_N, BLOCK_K])  # levels in DT
            else:
                offs_b = k0 // 2 + tl.arange(0, HK)
                c_ptrs = c_ptr + offs_n[:, None] * stride_cn + offs_b[None, :]
                if EVEN:
                    cb = tl.load(c_ptrs)
                else:
                    cb = tl.load(c_ptrs, mask=n_mask[:, None] & (offs_b[None, :] < stride_cn), other=0)
                v = tl.reshape(_decode_bytes(cb, lut_ptr), [BLOCK_N, BLOCK_K])  # levels in DT
            if GPB == 1:
                # The tile lies inside one absmax block per row: the fp32 absmax multiplies
                # the tile's partial sums, Σ_k level·absmax·x = absmax · Σ_k level·x.
                blk = offs_n * BPR + k0 // BLOCK
                am = _block_absmax(a_ptr, aq_ptr, as_ptr, am_ptr, map_ptr, blk, n_mask, DQ, DQB)
                acc += am[:, None] * tl.dot(v, tl.trans(xt))
            else:
                # Several blocks per tile: scale per element (one rounding to fp16/bf16).
                gi = k0 // BLOCK + tl.arange(0, GPB)
                g_mask = n_mask[:, None] & (gi[None, :] < BPR)
                am = _block_absmax(a_ptr, aq_ptr, as_ptr, am_ptr, map_ptr, offs_n[:, None] * BPR + gi[None, :],
                                   g_mask, DQ, DQB).to(DT)
                w = tl.reshape(tl.reshape(v, [BLOCK_N, GPB, BLOCK]) * am[:, :, None], [BLOCK_N, BLOCK_K])
                acc = tl.dot(w, tl.trans(xt), acc)
        else:
            # b does not divide K (blocks straddle rows) or K is odd (rows start mid-byte):
            # every value finds its byte, nibble and block from its flat index. Correct for
            # any shape, at several integer ops and two gathers per value.
            i = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
            valid = n_mask[:, None] & (offs_k[None, :] < K)
            cb = tl.load(c_ptr + (i >> 1), mask=valid, other=0).to(tl.int32)
            code = (cb >> (((i & 1) ^ 1) * 4).to(tl.int32)) & 15
            am = _block_absmax(a_ptr, aq_ptr, as_ptr, am_ptr, map_ptr, i // BLOCK, valid, DQ, DQB)
            w = tl.load(lut_ptr + code) * am.to(DT)
            acc = tl.dot(w, tl.trans(xt), acc)

    store_nm_tile(out_ptr, y_ptr, cnt_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, pid_n, pid_k, pid_m,
                  stride_os, stride_om, stride_ym, SPLIT_K, HAS_BIAS, FUSED)


def is_aligned(K: int, block_size: int) -> bool:
    """True when every row holds whole absmax blocks (then K is even too, b ≥ 32)."""
    return K % block_size == 0


def nf4_config(M: int, N: int, K: int, block_size: int, n_sm: int, resident: int | None = None) -> dict:
    """Tile sizes for the NF4 skinny kernel (chosen from the sm_90 SASS, not yet timed).

    BLOCK_K = b for b = 64/128 (one absmax per row and tile: the scale goes on the partial
    sums, no per-element multiply), 128 for b = 256, 64 for b = 32 (two blocks per tile,
    scaled per element with HMUL2). BLOCK_N makes a tile 4 KB of codes (128 × 64 or
    64 × 128): per thread 64 codes per loop trip, which halves the loop overhead per code
    of a 64 × 64 tile (5.8 vs 7.7 instructions per code in the compiled loop). Rows of x
    beyond 16 keep BLOCK_N = 64 (register pressure). K is split as in the integer kernel:
    into as many slices as fit in one wave of 8 programs per SM, or of `resident` (what the
    compiled kernel fits) when fewer, keeping ≥ 4 K tiles per program.
    """
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if is_aligned(K, block_size):
        block_k = min(max(block_size, 64), 128)
        block_n = 128 if block_k == 64 and block_m == 16 else 64
    else:
        block_k, block_n = 64, 64
    n_tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, block_k)
    split_k = split_k_one_wave(n_tiles, k_tiles, slots(n_sm, 8, resident), 8)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": 4, "num_stages": 3}


def nf4_skinny_matmul(
    x: Tensor,
    w: NF4Weight,
    bias: Tensor | None = None,
    config: dict | None = None,
    out: Tensor | None = None,
    workspace: Tensor | None = None,
    lut_in_registers: bool | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] · Ŵᵀ (+ bias), decoding the NF4 codes and constants in the kernel.

    `out` [M, N] (x's dtype) receives y; `workspace` [SPLIT_K, M, N] fp32 holds the split-K
    partials, added up by the kernel's last program per block (skinny.split_k_buffers).
    Both are allocated when not given.
    `lut_in_registers`: decode with the PTX register table (default: on the GPU, when b
    divides K and the codes can be read as aligned int32 words); False forces the
    table load (the interpreter's path), for tests.
    """
    M, K = x.shape
    N = w.N
    assert K == w.K, (K, w.K)
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert x.stride(1) == 1 and w.codes.is_contiguous()
    assert w.block_size in SUPPORTED_BLOCKS, w.block_size
    aligned = is_aligned(K, w.block_size)
    # Word reads need 4-byte alignment (a sliced or mmapped buffer may lack it); K is a
    # multiple of 32 whenever b divides it, so rows start on a word.
    words_ok = aligned and w.codes.numel() % 4 == 0 and w.codes.data_ptr() % 4 == 0
    regs = (not interpreting()) if lut_in_registers is None else lut_in_registers
    regs = regs and words_ok
    sig = ("nf4", x.dtype, N, K, w.block_size, w.double_quant, bias is not None, M, regs)  # what the split depends on
    resident = occupancy.recorded(sig)
    cfg = dict(config or nf4_config(M, N, K, w.block_size, _num_sms(x.device), resident))
    BM, BN, BK, SK = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("SPLIT_K")
    if aligned:
        if BK <= w.block_size:
            assert w.block_size % BK == 0, "a tile must not straddle two absmax blocks"
            gpb = 1
        else:
            assert BK % w.block_size == 0, "a tile must hold whole absmax blocks"
            gpb = BK // w.block_size
    else:
        gpb = 1  # unused: the unaligned path scales per element
    grid = (triton.cdiv(N, BN), SK, triton.cdiv(M, BM))
    out, stride_os, y, counters, fused = split_k_buffers(x, M, N, SK, grid[0] * grid[2], out, workspace)
    codes, stride_cn = (w.codes.view(torch.int32), K // 8) if regs else (w.codes, K // 2)
    lut, dq_map, tab = _tables(x.device, x.dtype)
    a, aq, a_s, a_m = w.pointers()
    compiled = _nf4_skinny_kernel[grid](
        x, codes, a, aq, a_s, a_m, lut, dq_map, tab, bias if bias is not None else lut, out, y, counters,
        M, N, K, stride_cn, K // w.block_size,
        x.stride(0), stride_os, out.stride(-2), y.stride(0),
        BLOCK=w.block_size, DQ=w.double_quant, DQB=DQ_BLOCK, ALIGNED=aligned, GPB=gpb,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK, HAS_BIAS=bias is not None,
        IS_BF16=x.dtype == torch.bfloat16, EVEN=(N % BN == 0) and (K % BK == 0), LUT_REGS=regs, FUSED=fused,
        **cfg,
    )
    if config is None and resident is None:
        occupancy.record(sig, compiled)
    return y if fused else split_k_result(out, SK, bias, x.dtype)


@triton.jit
def _nf4_dequant_kernel(
    c_ptr, a_ptr, aq_ptr, as_ptr, am_ptr, lut_ptr, map_ptr, out_ptr,
    n, n_bytes, n_blocks,
    BLOCK: tl.constexpr, DQ: tl.constexpr, DQB: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Ŵ [N, K] row-major is the flat order of the codes, so one program writes BLOCK_E
    # consecutive values whatever N, K and b are (BLOCK_E is a multiple of b).
    pid = tl.program_id(0).to(tl.int64)  # n can exceed 2^31 (e.g. a 128k-vocab lm_head)
    HB: tl.constexpr = BLOCK_E // 2
    NB: tl.constexpr = BLOCK_E // BLOCK
    offs_b = pid * HB + tl.arange(0, HB)
    cb = tl.load(c_ptr + offs_b, mask=offs_b < n_bytes, other=0)
    v = tl.reshape(_decode_bytes(cb, lut_ptr), [NB, BLOCK])  # fp32 levels
    blk = pid * NB + tl.arange(0, NB)
    am = _block_absmax(a_ptr, aq_ptr, as_ptr, am_ptr, map_ptr, blk, blk < n_blocks, DQ, DQB)
    # fp32 product, one rounding: the same value as NF4Linear.dequantize(dtype).
    wv = tl.reshape(v * am[:, None], [BLOCK_E])
    offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    tl.store(out_ptr + offs, wv.to(out_ptr.dtype.element_ty), mask=offs < n)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype, out: Tensor | None = None, block_e: int = 2048) -> Tensor:
    """Dense Ŵ [N, K] in `dtype` (fp16/bf16; fp32 works too) into `out` if given."""
    assert w.block_size in SUPPORTED_BLOCKS and block_e % w.block_size == 0
    assert w.codes.is_contiguous()
    n = w.N * w.K
    if out is None:
        out = torch.empty(w.N, w.K, dtype=dtype, device=w.codes.device)
    assert out.shape == (w.N, w.K) and out.dtype == dtype and out.is_contiguous()
    lut, dq_map, _ = _tables(w.codes.device, torch.float32)
    a, aq, a_s, a_m = w.pointers()
    _nf4_dequant_kernel[(triton.cdiv(n, block_e),)](
        w.codes, a, aq, a_s, a_m, lut, dq_map, out, n, w.codes.numel(), w.n_blocks(),
        BLOCK=w.block_size, DQ=w.double_quant, DQB=DQ_BLOCK, BLOCK_E=block_e, num_warps=4,
    )
    return out


def nf4_forward(x2d: Tensor, w: NF4Weight, bias: Tensor | None, max_m: int | None = None) -> Tensor:
    """y [M, N] = x2d [M, K] · Ŵᵀ + bias, no autograd: skinny kernel for few rows, else this
    layer's Ŵ (transient) + cuBLAS."""
    if x2d.shape[0] <= (NF4_SKINNY_MAX_M if max_m is None else max_m):
        return nf4_skinny_matmul(x2d, w, bias)
    W = dequantize_nf4(w, x2d.dtype)
    return F.linear(x2d, W, None if bias is None else bias.to(x2d.dtype))


class _NF4Matmul(torch.autograd.Function):
    """y = x Ŵᵀ + b; gradient for x only (QLoRA trains adapters beside a frozen NF4 base)."""

    @staticmethod
    def forward(ctx, x2d, bias, w):
        # The NF4 tensors are frozen buffers: kept by reference (no copy), not saved for
        # version checks, as nothing in qtool writes them during training.
        ctx.w = w
        return nf4_forward(x2d, w, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            # Ŵ lives only for this product: one layer's dense weight at a time.
            dx = dy.contiguous() @ dequantize_nf4(ctx.w, dy.dtype)
        return dx, None, None


def nf4_linear(layer: NF4Linear, x: Tensor) -> Tensor | None:
    """NF4Linear.forward's kernel path; None when no kernel covers the case (torch fallback)."""
    if not (x.is_cuda or interpreting()):
        return None
    if x.dtype not in (torch.float16, torch.bfloat16):
        return None
    if layer.block_size not in SUPPORTED_BLOCKS or layer.nf4_codes.device != x.device:
        return None
    K, N = layer.in_features, layer.out_features
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    w = NF4Weight.of(layer)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _NF4Matmul.apply(x2d, layer.bias, w)
    else:
        y = nf4_forward(x2d, w, layer.bias)
    return y.reshape(*x.shape[:-1], N)


def reference_absmax(w: NF4Weight) -> Tensor:
    """float64 [B]: the absmax constants the kernels use (after double dequantization)."""
    if not w.double_quant:
        return w.absmax.double()
    from qtool.quant import nf4

    dq_map = nf4.dynamic_map().to(w.codes.device).double()
    B = w.absmax_q.numel()
    scale = w.absmax_scale.double().repeat_interleave(DQ_BLOCK)[:B]
    return dq_map[w.absmax_q.long()] * scale + w.absmax_mean.double()


def reference_dequantize_nf4(w: NF4Weight) -> Tensor:
    """float64 Ŵ [N, K] = levels[code] · absmax (the stored fp32 levels, no rounding after)."""
    from qtool.quant import nf4

    n = w.N * w.K
    codes = nf4.unpack_nibbles(w.codes, n).long()
    levels = nf4.nf4_levels(w.codes.device).double()
    am = reference_absmax(w).repeat_interleave(w.block_size)[:n]
    return (levels[codes] * am).reshape(w.N, w.K)


def nf4_linear_ref(x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """float64 x · Ŵᵀ (+ bias): what `nf4_skinny_matmul` / `nf4_forward` compute, without rounding."""
    y = x.double() @ reference_dequantize_nf4(w).T
    if bias is not None:
        y = y + bias.double()
    return y
