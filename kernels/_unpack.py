"""Triton helpers shared by the kernels: unpack a tile of packed codes, turn codes into floats.

The packed layout is qtool.quant.pack's, read as stored (no re-layout): row n of
`qweight` is a little-endian bit stream, code k at stream bits [k·b, (k+1)·b). A tile is
BLOCK_N rows × BLOCK_K codes starting at code k0; k0 and BLOCK_K are multiples of 32, so
a tile always starts on a word boundary and 32 codes fill exactly `b` words.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
):
    """Codes int32 [BLOCK_N, BLOCK_K] for rows offs_n, codes k0 … k0+BLOCK_K-1.

    Each packed word is loaded once and unpacked in registers. Words past the end of a
    row (Wn words) read as 0; callers mask the matching activations, so those codes
    never reach a result.
    """
    if BITS == 3:
        # 32 codes live in 3 words. Two 64-bit windows cover them without a shift by 32 or
        # more: codes 0..20 lie in bits [0, 63) of w0|w1, codes 21..31 in bits [31, 96)
        # of the stream, i.e. [-1+32, 64) of w1|w2.
        NB: tl.constexpr = BLOCK_K // 32
        blk = (k0 // 32 + tl.arange(0, NB)) * 3
        base = qw_ptr + offs_n[:, None] * stride_qn + blk[None, :]
        m = n_mask[:, None] & (blk[None, :] < Wn)
        w0 = tl.load(base, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w1 = tl.load(base + 1, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w2 = tl.load(base + 2, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = w0 | (w1 << 32)
        hi = w1 | (w2 << 32)
        j = tl.arange(0, 32)
        first = j <= 20
        sh = tl.where(first, 3 * j, 3 * j - 32).to(tl.uint64)
        src = tl.where(first[None, None, :], lo[:, :, None], hi[:, :, None])
        codes3 = ((src >> sh[None, None, :]) & 7).to(tl.int32)
        codes = tl.reshape(codes3, [BLOCK_N, BLOCK_K])
    else:
        CPW: tl.constexpr = 32 // BITS  # codes per word
        BW: tl.constexpr = BLOCK_K // CPW
        wi = k0 // CPW + tl.arange(0, BW)
        ptrs = qw_ptr + offs_n[:, None] * stride_qn + wi[None, :]
        words = tl.load(ptrs, mask=n_mask[:, None] & (wi[None, :] < Wn), other=0)
        sh = tl.arange(0, CPW) * BITS
        # Arithmetic shift of a negative word fills the top with sign bits; the mask drops them.
        codes3 = (words[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes3, [BLOCK_N, BLOCK_K])
    return codes


@triton.jit
def codes_to_float(codes, IS_BF16: tl.constexpr, BITS: tl.constexpr):
    """int32 codes -> exact fp16/bf16 values without an int->float conversion instruction.

    I2F runs at 1/8 the rate of FMA on Hopper; OR-ing a code into the mantissa of a power of
    two (1024 in fp16, 128 in bf16) and subtracting that power is two cheap ops and exact.
    """
    if IS_BF16:
        if BITS <= 7:
            h = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            q = h - 128.0
        else:
            q = codes.to(tl.bfloat16)  # 8-bit codes do not fit bf16's 7-bit mantissa trick
    else:
        h = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        q = h - 1024.0
    return q
