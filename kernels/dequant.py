"""Ŵ = s · (q − z) for one layer, written in the activation dtype, for cuBLAS to consume.

Shapes: qweight int32 [N, ceil(K/32)·b], scales [N, G], zeros uint8 [N, G] -> W [N, K].
Used by the prefill/training path (M above the skinny crossover) and by the backward
(dX = dY · Ŵ). Ŵ lives only for the one matmul that needs it, so a model never holds
more than one layer's dense weight at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtool_kernels._unpack import code_offset, unpack_tile
from qtool_kernels.skinny import group_constexpr
from torch import Tensor


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K, Wn, G,
    stride_qn, stride_sn, stride_zn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_BF16: tl.constexpr,
    TILE_N: tl.constexpr = 0, TILE_W: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = pid_k * BLOCK_K
    OFF: tl.constexpr = code_offset(IS_BF16, BITS)
    q = unpack_tile(qw_ptr, offs_n, n_mask, k0, Wn, stride_qn, BITS, BLOCK_N, BLOCK_K, IS_BF16,
                    True, TILE_N, TILE_W).to(tl.float32)
    q = q - OFF
    GS: tl.constexpr = BLOCK_K // GPB
    g = k0 // GROUP + tl.arange(0, GPB)
    sz_mask = n_mask[:, None] & (g[None, :] < G)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=sz_mask, other=0).to(tl.float32)
    q3 = tl.reshape(q, [BLOCK_N, GPB, GS])
    w = tl.reshape(s[:, :, None] * (q3 - z[:, :, None]), [BLOCK_N, BLOCK_K])
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_k[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=n_mask[:, None] & (offs_k[None, :] < K),
    )


def dequantize_packed(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    K: int,
    dtype: torch.dtype,
    block_n: int = 16,
    block_k: int = 512,
    out: Tensor | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Dense Ŵ [N, K] in `dtype` (fp16/bf16) from the packed layout (row- or tile-major), into
    `out` if given. The default 16 × 512 tile (4 warps) was the fastest of twelve on the H100
    at 4096×11008 and 8192×8192 over W2/W3/W4 (81–89 % of copy; docs/kernels.md §Findings v16)."""
    from qtool_kernels.tiles import fit_block_k, packed_geometry

    N, Wn, TN, TW = packed_geometry(qweight)
    assert TN == 0 or qweight.is_contiguous()
    block_k = fit_block_k(block_k, bits, TW)
    G = scales.shape[1]
    assert dtype in (torch.float16, torch.bfloat16), dtype
    GROUP = group_constexpr(group_size)
    if GROUP < block_k:
        gpb = block_k // GROUP
    else:
        block_k = min(block_k, GROUP)
        gpb = 1
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    assert out.shape == (N, K) and out.dtype == dtype and out.stride(1) == 1
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequant_kernel[grid](
        qweight, scales, zeros, out, N, K, Wn, G,
        qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP=GROUP, GPB=gpb, BLOCK_N=block_n, BLOCK_K=block_k,
        IS_BF16=dtype == torch.bfloat16, TILE_N=TN, TILE_W=TW, num_warps=num_warps,
    )
    return out


def reference_dequantize(
    qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int | None, K: int
) -> Tensor:
    """float64 Ŵ [N, K]."""
    from qtool_kernels.tiles import as_row_major

    from qtool.quant.grid import dequantize
    from qtool.quant.pack import unpack

    return dequantize(unpack(as_row_major(qweight), bits, K), scales.double(), zeros, group_size)
