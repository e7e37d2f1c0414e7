"""Bit packing of integer codes into int32 words.

Layout (one definition for every bit-width b ∈ {2, 3, 4, 8}): each row of codes is
a little-endian bit stream. Code j of a row occupies stream bits [j·b, (j+1)·b),
least-significant bit first; stream bit t lives in word t // 32 at bit t % 32. Rows
are padded with zero codes to a multiple of 32 codes, so a row of K codes takes
ceil(K / 32) · b words and 32 codes always fill exactly b words. For b = 2, 4, 8
this is the usual "32/b codes per word, lowest code in the lowest bits"; for b = 3
it is the dense stream (code 10 straddles words 0 and 1, code 21 words 1 and 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_BITS = 1 << 22  # bits per chunk: the bit matrix is int64, 8 bytes a bit (32 MiB per chunk)


def packed_words(K: int, bits: int) -> int:
    return (K + 31) // 32 * bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8/int codes [N, K] with values < 2^bits -> int32 [N, ceil(K/32)·bits]."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    N, K = codes.shape
    K32 = (K + 31) // 32 * 32
    out = torch.empty(N, K32 // 32 * bits, dtype=torch.int32, device=codes.device)
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word, one shift-and-sum (the same bit stream)
        per = 32 // bits
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
        rows = max(1, _CHUNK_BITS // K32)
        for r0 in range(0, N, rows):
            c = codes[r0 : r0 + rows].to(torch.int64)
            if K32 != K:
                c = torch.nn.functional.pad(c, (0, K32 - K))
            words = (c.reshape(c.shape[0], -1, per) << shifts).sum(-1)
            words = torch.where(words >= 2**31, words - 2**32, words)
            out[r0 : r0 + rows] = words.to(torch.int32)
        return out
    shifts_in = torch.arange(bits, device=codes.device, dtype=torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    rows = max(1, _CHUNK_BITS // (K32 * bits))
    for r0 in range(0, N, rows):
        c = codes[r0 : r0 + rows].to(torch.int64)
        if K32 != K:
            c = torch.nn.functional.pad(c, (0, K32 - K))
        stream = (c.unsqueeze(-1) >> shifts_in) & 1  # [n, K32, b] bits, LSB first
        words = (stream.reshape(c.shape[0], -1, 32) * weights).sum(-1)  # [n, W] in [0, 2^32)
        words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement view
        out[r0 : r0 + rows] = words.to(torch.int32)
    return out


def _code_windows(K32: int, bits: int, device) -> tuple[Tensor, Tensor]:
    """For every code j: index of the word holding its first bit, and that bit's offset."""
    first_bit = torch.arange(K32, device=device, dtype=torch.int64) * bits
    return first_bit // 32, first_bit % 32


def unpack(packed: Tensor, bits: int, K: int) -> Tensor:
    """int32 [N, ceil(K/32)·bits] -> uint8 codes [N, K]; exact inverse of `pack`.

    Each code is read from a 64-bit window (its first word, plus the next word shifted
    up by 32), so codes that straddle two words (3-bit) need no special case."""
    N, Wn = packed.shape
    if Wn != packed_words(K, bits):
        raise ValueError(f"packed row has {Wn} words, expected {packed_words(K, bits)} for K={K}, b={bits}")
    K32 = Wn // bits * 32
    word, shift = _code_windows(K32, bits, packed.device)
    nxt = torch.clamp(word + 1, max=Wn - 1)
    spans = (shift + bits > 32).to(torch.int64)  # only then is the next word needed
    mask = (1 << bits) - 1
    out = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    rows = max(1, _CHUNK_BITS // (8 * K32))  # a few int64 [rows, K32] temporaries, 32 MiB each
    for r0 in range(0, N, rows):
        w = packed[r0 : r0 + rows].to(torch.int64) & 0xFFFFFFFF
        window = w[:, word] | ((w[:, nxt] * spans) << 32)
        out[r0 : r0 + rows] = ((window >> shift) & mask)[:, :K].to(torch.uint8)
    return out
