"""Tile-major re-layout of a packed weight for the M = 1 GEMV (docs/kernels.md §v6).

The checkpoint layout (qtool.quant.pack) keeps each row's codes together, so a GEMV program
that owns BLOCK_N rows reads BLOCK_N short runs per K tile, each a full row (K·b/8 bytes)
away from the next. On the H100 those scattered reads, not the bytes, set the GEMV's speed
(§v5: the same kernel on a contiguous view of the matrix was 1.3–2.2× faster). Tile-major
puts the words one program reads per K tile next to each other, and a program's successive
K tiles after them: [N / BLOCK_N, Wn / words per tile, BLOCK_N, words per tile].

Pure reshapes and permutes (no arithmetic): the codes, their bit order inside each word and
the 3-bit 3-word blocks are unchanged, so every unpacking routine applies as is. Scales and
zeros may follow ([N / BLOCK_N, G, BLOCK_N]: one tile's scales are one contiguous load) or
stay [N, G]; gemv_matmul reads either, told by the tensors' ranks.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["as_row_major", "fit_block_k", "groups_row_major", "groups_tile_major", "packed_geometry", "row_major",
           "tile_major", "words_per_tile"]


def words_per_tile(bits: int, block_k: int) -> int:
    """Packed int32 words per row in a K tile of block_k codes (a multiple of 32)."""
    assert block_k % 32 == 0, block_k
    return block_k * bits // 32


def tile_major(qweight: Tensor, block_n: int, block_k: int, bits: int) -> Tensor:
    """qweight [N, Wn] -> [N / block_n, Wn / wpt, block_n, wpt] contiguous (wpt = words per tile)."""
    N, Wn = qweight.shape
    wpt = words_per_tile(bits, block_k)
    if N % block_n or Wn % wpt:
        raise ValueError(f"tile-major needs whole tiles: {N}×{Wn} words, tile {block_n}×{wpt}")
    return qweight.reshape(N // block_n, block_n, Wn // wpt, wpt).permute(0, 2, 1, 3).contiguous()


def row_major(tiled: Tensor) -> Tensor:
    """The inverse of tile_major: [NB, KT, BN, wpt] -> [NB·BN, KT·wpt]."""
    NB, KT, BN, wpt = tiled.shape
    return tiled.permute(0, 2, 1, 3).reshape(NB * BN, KT * wpt)


def groups_tile_major(t: Tensor, block_n: int) -> Tensor:
    """Scales or zeros [N, G] -> [N / block_n, G, block_n] contiguous."""
    N, G = t.shape
    if N % block_n:
        raise ValueError(f"tile-major needs whole row blocks: N = {N}, BLOCK_N = {block_n}")
    return t.reshape(N // block_n, block_n, G).transpose(1, 2).contiguous()


def groups_row_major(t: Tensor) -> Tensor:
    """The inverse of groups_tile_major, contiguous (the kernels read [N, G] with unit stride
    along G; a plain reshape would be a strided view when G = 1)."""
    NB, G, BN = t.shape
    return t.transpose(1, 2).reshape(NB * BN, G).contiguous()


def packed_geometry(qweight: Tensor) -> tuple[int, int, int, int]:
    """(N, Wn, TILE_N, TILE_W) of row-major [N, Wn] (tile 0, 0) or tile-major qweight."""
    if qweight.dim() == 2:
        return qweight.shape[0], qweight.shape[1], 0, 0
    NB, KT, BN, wpt = qweight.shape
    return NB * BN, KT * wpt, BN, wpt


def as_row_major(qweight: Tensor) -> Tensor:
    """qweight in the checkpoint's [N, Wn] layout (a copy if it was tile-major)."""
    return qweight if qweight.dim() == 2 else row_major(qweight)


def fit_block_k(block_k: int, bits: int, tile_w: int) -> int:
    """The largest tile width ≤ block_k (halving) whose words lie inside one tile-major tile
    column of tile_w words (tile_w = 0: row-major, anything goes)."""
    if tile_w == 0:
        return block_k
    layout_k = tile_w * 32 // bits
    while layout_k % block_k and block_k > 32:
        block_k //= 2
    assert layout_k % block_k == 0, (block_k, layout_k)
    return block_k
