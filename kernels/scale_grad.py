"""PEQA scale gradient, fused: ∂L/∂s[n, g] = Σ_m dY[m, n] · Σ_{k∈g} x[m, k] (q[n, k] − z[n, g]).

Shapes: x [M, K], dY [M, N] (fp16/bf16), qweight/zeros as stored -> grad [N, G] fp32.
Ŵ = s·(q − z) is linear in s, so the gradient is the forward product without its scale,
Y0_g = x_g (q_g − z_g)ᵀ per group g, reduced against dY. Nothing of size N×K or M×N×G
is written: each program holds one dY tile [BLOCK_M, BLOCK_N] in registers, walks the
groups, forms Y0_g tile by tile on the tensor cores and keeps only Σ_m dY ⊙ Y0_g, a
vector of BLOCK_N per group. Programs along M write partials [M-tiles, N, G] that the
wrapper sums (deterministic, unlike atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtool_kernels._unpack import code_offset, unpack_tile
from torch import Tensor


@triton.jit
def _scale_grad_kernel(
    x_ptr, dy_ptr, qw_ptr, z_ptr, out_ptr,
    M, N, K, Wn, G, group_len, chunks_per_group,
    stride_xm, stride_dym, stride_qn, stride_zn, stride_om, stride_on,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    dy = tl.load(
        dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
        mask=m_mask[:, None] & n_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BM, BN]
    OFF: tl.constexpr = code_offset(IS_BF16, BITS)
    for g in range(0, G):
        z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32) + OFF
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c in range(0, chunks_per_group):
            k0 = g * group_len + c * BLOCK_K
            q = unpack_tile(qw_ptr, offs_n, n_mask, k0, Wn, stride_qn, BITS, BLOCK_N, BLOCK_K, IS_BF16)
            w = (q.to(tl.float32) - z[:, None]).to(x_ptr.dtype.element_ty)  # exact: |q − z| ≤ 255
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k[None, :] < K),
                other=0.0,
            )  # [BM, BK]
            y0 = tl.dot(xt, tl.trans(w))  # [BM, BN]
            acc += tl.sum(y0 * dy, axis=0)
        tl.store(out_ptr + pid_m * stride_om + offs_n * stride_on + g, acc, mask=n_mask)


def scale_grad(
    x: Tensor,
    dy: Tensor,
    qweight: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    block_m: int = 64,
    block_n: int = 64,
) -> Tensor:
    """∂L/∂s [N, G] fp32 for y = x · (s·(q − z))ᵀ, given x [M, K] and dY = ∂L/∂y [M, N]."""
    from qtool_kernels.tiles import as_row_major

    qweight = as_row_major(qweight)  # training keeps the stored layout; a copy if not
    M, K = x.shape
    N, Wn = qweight.shape
    G = zeros.shape[1]
    assert dy.shape == (M, N) and dy.dtype == x.dtype
    assert x.stride(1) == 1 and dy.stride(1) == 1
    group_len = K if group_size is None else group_size
    block_k = min(group_len, 128) if group_size is not None else 128
    chunks = triton.cdiv(group_len, block_k)
    m_tiles = triton.cdiv(M, block_m)
    partial = torch.empty(m_tiles, N, G, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), m_tiles)
    _scale_grad_kernel[grid](
        x, dy, qweight, zeros, partial,
        M, N, K, Wn, G, group_len, chunks,
        x.stride(0), dy.stride(0), qweight.stride(0), zeros.stride(0), partial.stride(0), partial.stride(1),
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IS_BF16=x.dtype == torch.bfloat16, num_warps=4,
    )
    return partial.sum(0)


def reference_scale_grad(
    x: Tensor, dy: Tensor, qweight: Tensor, zeros: Tensor, bits: int, group_size: int | None
) -> Tensor:
    """float64 ∂L/∂s by autograd through y = x · (s·(q − z))ᵀ with L = Σ dY ⊙ y."""
    from qtool.quant.grid import dequantize
    from qtool.quant.pack import unpack

    K = x.shape[1]
    N, G = zeros.shape
    s = torch.ones(N, G, dtype=torch.float64, device=x.device, requires_grad=True)
    W = dequantize(unpack(qweight, bits, K), s, zeros, group_size)
    y = x.double() @ W.T
    (grad,) = torch.autograd.grad((y * dy.double()).sum(), s)
    return grad
