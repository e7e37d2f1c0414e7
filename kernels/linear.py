"""QuantLinear's CUDA path: pick a kernel by M, and make it differentiable.

Forward  y = x Ŵᵀ + b:  M ≤ GEMV_MAX_M    -> fused dequant GEMV on the CUDA cores (gemv.py),
                                               unless QTOOL_GEMV=0; at M = 1, fp16, W4/W2
                                               its packed-half2 kernel (gemv_h2.py) unless
                                               QTOOL_GEMV_H2=0 (gemv.gemv_path says which);
                         M ≤ SKINNY_MAX_M  -> fused dequant + skinny product (skinny.py);
                         larger M           -> dequantize this layer (dequant.py) + cuBLAS.
Backward dX = dY Ŵ:      dequantize this layer + cuBLAS (Ŵ is transient, one layer at a time).
         ∂L/∂Δs:         fused scale-gradient kernel (scale_grad.py), when PEQA trains Δs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from qtool_kernels.dequant import dequantize_packed
from qtool_kernels.gemv import gemv_matmul
from qtool_kernels.scale_grad import scale_grad
from qtool_kernels.skinny import interpreting, skinny_matmul
from qtool_kernels.tiles import groups_row_major
from torch import Tensor

if TYPE_CHECKING:
    from qtool.nn.qlinear import QuantLinear

# Above this many rows, dequantize + cuBLAS beats the skinny kernel. The measured H100
# crossover (qtool.bench.sweep) is stored as "skinny_max_m" in kernels/tuned_skinny.json.
SKINNY_MAX_M = 16


def skinny_max_m() -> int:
    from qtool_kernels.skinny import _tuned

    return int(_tuned().get("skinny_max_m", SKINNY_MAX_M))


# Up to this many rows the CUDA-core GEMV (gemv.py) replaces the skinny kernel: it unpacks
# each code once per 4 rows of x, so its cost grows with M where the tensor-core kernel's
# does not. "gemv_max_m" in kernels/tuned_skinny.json overrides it (scripts/bench/gemv_ab.py
# measures both); QTOOL_GEMV=0 turns the GEMV off (the skinny kernel for every M it covered).
GEMV_MAX_M = 4


def gemv_max_m() -> int:
    """Largest M routed to gemv_matmul; 0 when QTOOL_GEMV=0 (read on every call, so a
    process can A/B both paths)."""
    if os.environ.get("QTOOL_GEMV", "1") == "0":
        return 0
    from qtool_kernels.skinny import _tuned

    return int(_tuned().get("gemv_max_m", GEMV_MAX_M))


SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (None, 32, 64, 128)


def forward_packed(
    x2d: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None,
    max_m: int | None = None,
) -> Tensor:
    """y [M, N] = x2d [M, K] · Ŵᵀ + bias, no autograd.

    max_m: the largest M for a fused kernel (default skinny_max_m()); within it, M ≤
    gemv_max_m() takes the GEMV and the rest the skinny kernel. Tile-major scales and zeros
    [N / BN, G, BN] (tiles.groups_tile_major, inside `tile_major_layout`) are read by the GEMV
    and the skinny kernel as they are and put back in row order (N·G elements) for dequant."""
    M, K = x2d.shape
    if M <= (skinny_max_m() if max_m is None else max_m) and M <= gemv_max_m():
        return gemv_matmul(x2d, qweight, scales, zeros, bits, group_size, bias)
    if M <= (skinny_max_m() if max_m is None else max_m):
        return skinny_matmul(x2d, qweight, scales, zeros, bits, group_size, bias)
    if scales.dim() == 3:
        scales, zeros = groups_row_major(scales), groups_row_major(zeros)
    W = dequantize_packed(qweight, scales, zeros, bits, group_size, K, x2d.dtype)
    return F.linear(x2d, W, None if bias is None else bias.to(x2d.dtype))


@torch.library.custom_op("qtool::forward_packed", mutates_args=())
def _forward_packed_op(x2d: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                       group_size: int | None, bias: Tensor | None) -> Tensor:
    # One opaque op for torch.compile: dynamo would otherwise trace the launch wrappers'
    # host-side logic (configs, occupancy records, ticket arenas) and break the graph there.
    return forward_packed(x2d, qweight, scales, zeros, bits, group_size, bias)


@_forward_packed_op.register_fake
def _(x2d, qweight, scales, zeros, bits, group_size, bias):
    from qtool_kernels.tiles import packed_geometry

    return x2d.new_empty(x2d.shape[0], packed_geometry(qweight)[0])


def _forward_no_grad(x2d: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                     group_size: int | None, bias: Tensor | None) -> Tensor:
    """forward_packed, as one custom op while torch.compile traces (eager calls skip the op's dispatch)."""
    fn = _forward_packed_op if torch.compiler.is_compiling() else forward_packed
    return fn(x2d, qweight, scales, zeros, bits, group_size, bias)


class _QuantMatmul(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = (s₀ + Δs)(q − z); gradients for x and Δs only (q, z, s₀ are frozen)."""

    @staticmethod
    def forward(ctx, x2d, scale_delta, qweight, scales, zeros, bias, bits, group_size):
        if scales.dim() == 3:  # tile-major groups (frozen layers in tile_major_layout)
            scales, zeros = groups_row_major(scales), groups_row_major(zeros)
        s = scales if scale_delta is None else scales.float() + scale_delta
        y = forward_packed(x2d, qweight, s, zeros, bits, group_size, bias)
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, qweight, s, zeros)
        ctx.bits, ctx.group_size, ctx.K = bits, group_size, x2d.shape[1]
        ctx.delta_dtype = None if scale_delta is None else scale_delta.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, qweight, s, zeros = ctx.saved_tensors
        dy = dy.contiguous()
        dx = d_delta = None
        if ctx.needs_input_grad[0]:
            W = dequantize_packed(qweight, s, zeros, ctx.bits, ctx.group_size, ctx.K, dy.dtype)
            dx = dy @ W
        if ctx.needs_input_grad[1]:
            d_delta = scale_grad(x2d, dy, qweight, zeros, ctx.bits, ctx.group_size).to(ctx.delta_dtype)
        return dx, d_delta, None, None, None, None, None, None


def quant_linear(layer: QuantLinear, x: Tensor) -> Tensor | None:
    """QuantLinear.forward's kernel path; None when no kernel covers the case (torch fallback)."""
    if not (x.is_cuda or interpreting()):
        return None
    if x.dtype not in (torch.float16, torch.bfloat16):
        return None
    if layer.bits not in SUPPORTED_BITS or layer.group_size not in SUPPORTED_GROUPS:
        return None
    if layer.qweight.device != x.device:
        return None
    K, N = layer.in_features, layer.out_features
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    delta = layer.scale_delta
    train_delta = delta is not None and delta.requires_grad and torch.is_grad_enabled()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or train_delta)
    if not needs_grad:
        scales = layer.effective_scales()
        if delta is not None:
            scales = scales.detach()
        y = _forward_no_grad(x2d, layer.qweight, scales, layer.zeros, layer.bits, layer.group_size, layer.bias)
    else:
        y = _QuantMatmul.apply(
            x2d, delta if train_delta else None, layer.qweight,
            layer.scales if delta is None or train_delta else layer.effective_scales().detach(),
            layer.zeros, layer.bias, layer.bits, layer.group_size,
        )
    return y.reshape(*x.shape[:-1], N)
