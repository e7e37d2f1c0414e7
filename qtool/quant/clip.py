"""Learnable weight clipping (LWC: OmniQuant, ApiQ; METHODS.md §1 and §5). Pure functions.

W is [N out, K in]; groups run along K as in qtool.quant.grid (G = ceil(K / g), a short last
group when g does not divide K). Each group has two logits, γ and β [N, G], and its clipped range

    max' = σ(γ)·max(W_group),   min' = σ(β)·min(W_group)      (γ = β = 4 at start: σ(4) ≈ 0.982)

gives the asymmetric grid of qtool.quant.grid: s = (max' − min') / (2^b − 1), z = round(−min' / s),
q = clamp(round(W / s) + z, 0, 2^b − 1), Ŵ = s·(q − z). The range is widened to contain 0, as
grid.choose_qparams does, so z is an integer inside the code range (a weight group almost always
straddles 0, so this only matters for one-signed groups).

`fake_quant` is the differentiable forward used while training γ, β: the rounding of W / s is a
straight-through estimator (gradient 1), as in the OmniQuant and ApiQ reference code; z is rounded
without a gradient, as there too, so β learns through s only. Its backward is written out
(`_FakeQuant`) so that no W-sized temporaries are kept between forward and backward. The scale is rounded to its storage
dtype inside the forward (again straight-through), so the Ŵ that training sees is exactly the Ŵ
that `quantize_clipped` stores: the learned clipping is folded into the stored scales and zeros and
the result loads as a plain QuantLinear.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.quant.grid import QuantizedWeight, QuantSpec, group_view

INIT_LOGIT = 4.0  # γ = β = 4 at start (ApiQ, OmniQuant): σ(4) ≈ 0.982 keeps ~the full range
MIN_SCALE = 1e-5  # the reference code's floor: keeps W / s finite for (near-)constant groups


def group_range(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-group (min, max) of W, fp32 [N, G] each; a short last group counts its real columns
    only (zero padding cannot change it: the range is widened to contain 0 anyway)."""
    Wg = group_view(W.detach().float(), spec.group_len(W.shape[1]))
    return Wg.amin(dim=2), Wg.amax(dim=2)


def init_logits(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """γ, β [N, G] fp32, every entry INIT_LOGIT."""
    N, K = W.shape
    shape = (N, spec.n_groups(K))
    return (torch.full(shape, INIT_LOGIT, device=W.device), torch.full(shape, INIT_LOGIT, device=W.device))


def _ste(x: Tensor, y: Tensor) -> Tensor:
    """Value y, gradient of x."""
    return x + (y - x).detach()


def clipped_qparams(wmin: Tensor, wmax: Tensor, gamma: Tensor, beta: Tensor, spec: QuantSpec,
                    scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Scale (fp32, differentiable in γ and β) and integer zero-point (fp32, no gradient), [N, G].

    With `scale_dtype` the scale takes the value it will have in storage (gradient straight through)."""
    if spec.symmetric:
        raise ValueError("learnable clipping is defined for the asymmetric grid only")
    hi = torch.sigmoid(gamma) * wmax
    lo = torch.sigmoid(beta) * wmin
    hi = torch.clamp(hi, min=0.0)  # widen to contain 0 (grid.choose_qparams)
    lo = torch.clamp(lo, max=0.0)
    scale = ((hi - lo) / spec.qmax).clamp(MIN_SCALE, 1e4)
    if scale_dtype is not None:
        scale = _ste(scale, scale.detach().to(scale_dtype).float())
    zero = torch.round(-lo.detach() / scale.detach()).clamp(0, spec.qmax)
    return scale, zero


class _FakeQuant(torch.autograd.Function):
    """Ŵ = s·(clamp(round(W/s) + z, 0, qmax) − z) with a straight-through round, differentiable in s only.

    Autograd of the plain expression would keep several W-sized temporaries per layer for the
    backward; this keeps none (W is the caller's frozen buffer, s and z are [N, G]) and recomputes
    W/s in the backward: ∂Ŵ/∂s = (q − z) − [0 ≤ round(W/s) + z ≤ qmax]·W/s (the clamp passes the
    gradient where its input is inside the range, as torch.clamp does)."""

    @staticmethod
    def forward(ctx, W: Tensor, scale: Tensor, zero: Tensor, qmax: int, g: int) -> Tensor:
        ctx.save_for_backward(W, scale, zero)
        ctx.qmax, ctx.g = qmax, g
        N, K = W.shape
        Wg = group_view(W, g)  # [N, G, g], the short last group zero-padded
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = torch.clamp(torch.round(Wg / s) + z, 0, qmax)
        return (s * (q - z)).reshape(N, -1)[:, :K]

    @staticmethod
    def backward(ctx, grad: Tensor):
        W, scale, zero = ctx.saved_tensors
        N, K = W.shape
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        x = group_view(W, ctx.g) / s
        q = torch.round(x) + z
        inside = (q >= 0) & (q <= ctx.qmax)
        dW_ds = torch.clamp(q, 0, ctx.qmax) - z - torch.where(inside, x, 0.0)
        grad_s = (group_view(grad.float(), ctx.g) * dW_ds).sum(-1)  # padded columns have grad 0
        return None, grad_s, None, None, None


def fake_quant(W: Tensor, gamma: Tensor, beta: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None,
               w_range: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Ŵ [N, K] fp32, differentiable in γ and β (straight-through rounding). `w_range` is
    `group_range(W, spec)` when the caller keeps it (W is frozen, so it never changes)."""
    wmin, wmax = group_range(W, spec) if w_range is None else w_range
    scale, zero = clipped_qparams(wmin, wmax, gamma, beta, spec, scale_dtype)
    return _FakeQuant.apply(W.detach().float(), scale, zero, spec.qmax, spec.group_len(W.shape[1]))


@torch.no_grad()
def quantize_clipped(W: Tensor, gamma: Tensor, beta: Tensor, spec: QuantSpec,
                     scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """The hard quantization that `fake_quant` simulates: codes, storage-dtype scales and integer
    zeros in qtool.quant.grid's conventions, so that grid.dequantize(...) equals fake_quant(...)
    bit for bit (same scale, same arithmetic)."""
    N, K = W.shape
    wmin, wmax = group_range(W, spec)
    scale, zero = clipped_qparams(wmin, wmax, gamma.float(), beta.float(), spec, scale_dtype)
    Wg = group_view(W.float(), spec.group_len(K))
    q = torch.clamp(torch.round(Wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, spec.qmax)
    codes = q.reshape(N, -1)[:, :K].to(torch.uint8)
    return QuantizedWeight(codes, scale.to(scale_dtype), zero.to(torch.uint8))
