"""PEQA's scale-only autograd: y = x · Ŵᵀ + b, Ŵ = (s₀ + Δs) · (q − z), only Δs (and x) get gradients.

Shapes: x [M, K] (leading dims flattened), q, z → (q − z) [N, K], s₀ and Δs [N, G]
(G = 1 per channel), y and dY [M, N]. Groups run along K; the last one may be short.

Gradients (METHODS.md §3):
  dX = dY · Ŵ
  per group j with columns k ∈ j:  ∂L/∂s_{n,j} = Σ_m dY_mn · Y0ʲ_mn,  Y0ʲ = x_{:,j} (q − z)_{:,j}ᵀ
which is the same number as Σ_{k ∈ j} dW_nk · (q − z)_nk with dW = dYᵀ x. Both routes cost
one M·N·K matmul; they differ in the transient they need: Y0ʲ is M×N (one group at a time),
dW is N×K. `backward` takes whichever is smaller for the call at hand (few tokens: Y0;
a training batch of thousands of tokens: dW), so the peak stays at most one N×K-sized
temporary, which is also what the recomputed Ŵ costs.

Memory: forward saves x (any layer with a weight gradient must) and the small integer and
scale tensors, never Ŵ. Ŵ is rebuilt from the packed codes in backward and freed at once,
so no N×K float tensor outlives one layer's forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.quant.pack import unpack

ROUTES = ("auto", "y0", "dw")


def codes_minus_zero(qweight: Tensor, zeros: Tensor, bits: int, group_size: int | None, K: int,
                     dtype: torch.dtype) -> Tensor:
    """(q − z) [N, K] in `dtype`, unpacked from int32 words (layout: qtool.quant.pack).

    For b ∈ {2, 4, 8} a code never straddles words, so one shift per code slot replaces
    pack.unpack's per-bit stream (≈ b·8 times less temporary memory); 3-bit uses unpack."""
    N = qweight.shape[0]
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
        # Arithmetic shift sign-extends the top code; the mask drops those bits again.
        codes = (qweight.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [N, words, per_word]
        codes = codes.reshape(N, -1)[:, :K]
    else:
        codes = unpack(qweight, bits, K)
    g = K if group_size is None else group_size
    G = zeros.shape[1]
    if G * g != K:
        codes = F.pad(codes, (0, G * g - K))  # short last group: pad, subtract, cut below
    # Broadcast z over its group instead of materialising an expanded N×K copy.
    qz = codes.reshape(N, G, g).to(dtype) - zeros.to(dtype).unsqueeze(-1)
    return qz.reshape(N, G * g)[:, :K]


def _weight(qz: Tensor, s: Tensor, g: int, dtype: torch.dtype) -> Tensor:
    """Ŵ = s · (q − z), formed in s's precision and then rounded to the compute dtype, as
    QuantLinear.dequantize does, so training and inference see the same Ŵ."""
    N, K = qz.shape
    G = s.shape[1]
    if G == 1:
        return (qz.to(s.dtype) * s).to(dtype)
    if G * g != K:
        qz = F.pad(qz, (0, G * g - K))
    W = qz.to(s.dtype).reshape(N, G, g) * s.unsqueeze(-1)
    return W.reshape(N, G * g)[:, :K].to(dtype)


def scale_grad(x: Tensor, dY: Tensor, qz: Tensor, g: int, route: str = "auto") -> Tensor:
    """∂L/∂s [N, G] for y = x · (s · (q − z))ᵀ; x [M, K], dY [M, N], qz = (q − z) [N, K].

    Returned in fp32 (fp64 for fp64 inputs) whatever the compute dtype."""
    M, K = x.shape
    N = qz.shape[0]
    G = (K + g - 1) // g
    acc = torch.promote_types(torch.float32, x.dtype)  # reductions in fp32 (fp64 in fp64 tests)
    if route == "auto":
        route = "y0" if M <= K else "dw"
    if route == "y0":
        ds = torch.empty(N, G, dtype=acc, device=x.device)
        dYa = dY.to(acc)
        for j in range(G):
            cols = slice(j * g, min((j + 1) * g, K))
            Y0 = x[:, cols] @ qz[:, cols].to(x.dtype).T  # [M, N] partial product of group j
            ds[:, j] = (dYa * Y0.to(acc)).sum(0)
            del Y0
        return ds
    if route == "dw":
        dW = (dY.T @ x).to(acc) * qz.to(acc)  # [N, K]: dW ⊙ (q − z), freed on return
        if G * g != K:
            dW = F.pad(dW, (0, G * g - K))
        return dW.reshape(N, G, g).sum(-1)
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


class ScaleLinearFunction(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = (s₀ + Δs)(q − z); gradients for x and Δs only."""

    @staticmethod
    def forward(ctx, x: Tensor, scale_delta: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                bias: Tensor | None, bits: int, group_size: int | None, route: str) -> Tensor:
        K = x.shape[-1]
        g = K if group_size is None else group_size
        # fp32 scales (fp64 in fp64 tests): s₀ is stored fp16/bf16, Δs is a tiny fp32 update.
        sdtype = torch.promote_types(torch.float32, scale_delta.dtype)
        s = scales.to(sdtype) + scale_delta.to(sdtype)
        qz = codes_minus_zero(qweight, zeros, bits, group_size, K, sdtype)
        W = _weight(qz, s, g, x.dtype)
        del qz
        y = F.linear(x, W, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, scale_delta, qweight, scales, zeros)
        ctx.bits, ctx.group_size, ctx.route = bits, group_size, route
        return y

    @staticmethod
    def backward(ctx, dY: Tensor):
        x, scale_delta, qweight, scales, zeros = ctx.saved_tensors
        K = x.shape[-1]
        g = K if ctx.group_size is None else ctx.group_size
        sdtype = torch.promote_types(torch.float32, scale_delta.dtype)
        qz = codes_minus_zero(qweight, zeros, ctx.bits, ctx.group_size, K, sdtype)
        dX = ds = None
        if ctx.needs_input_grad[0]:
            s = scales.to(sdtype) + scale_delta.to(sdtype)
            W = _weight(qz, s, g, dY.dtype)
            dX = dY @ W
            del W
        if ctx.needs_input_grad[1]:
            x2, dY2 = x.reshape(-1, K), dY.reshape(-1, dY.shape[-1]).to(x.dtype)
            ds = scale_grad(x2, dY2, qz, g, ctx.route).to(scale_delta.dtype)
        return dX, ds, None, None, None, None, None, None, None


def scale_trainable_linear(layer: nn.Module, x: Tensor, route: str = "auto") -> Tensor:
    """QuantLinear's forward while its `scale_delta` trains (x already act-order permuted).

    Autocast is resolved here, outside the Function: x is cast to the autocast dtype and the
    Function runs with autocast off, so forward and backward use one explicit dtype
    (backward may run on a thread where autocast is not active)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return ScaleLinearFunction.apply(x, layer.scale_delta, layer.qweight, layer.scales, layer.zeros,
                                         layer.bias, layer.bits, layer.group_size, route)
