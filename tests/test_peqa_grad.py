"""ScaleLinearFunction vs autograd through the dequantized weight (the reference).

Reference: Ŵ = (s₀ + Δs)·(q − z) built as a dense tensor, y = x Ŵᵀ + b, gradients by
torch.autograd. Tolerances: fp64 agrees to ~1e-12 (the two routes only reorder sums);
fp32 to 2e-5 relative (sum reordering over M·K products, fp32 rounding); bf16 autocast
against an fp32 reference to 2e-2 (bf16 has an 8-bit significand).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtool.nn.qlinear import QuantLinear
from qtool.nn.scale_grad import ScaleLinearFunction, codes_minus_zero, scale_trainable_linear
from qtool.quant.grid import QuantSpec, dequantize, expand_groups, rtn
from qtool.quant.pack import unpack


def make_layer(N: int, K: int, bits: int, group_size: int | None, bias: bool = False, act_order: bool = False,
               seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen)
    qw = rtn(W, QuantSpec(bits, group_size))
    if act_order:
        qw.perm = torch.randperm(K, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    layer = QuantLinear.from_quantized(qw, bits, group_size, b)
    delta = 0.01 * torch.randn(layer.scales.shape, generator=gen) * layer.scales.float()
    layer.scale_delta = torch.nn.Parameter(delta)
    return layer


def reference(layer: QuantLinear, x: torch.Tensor, dtype: torch.dtype):
    """Autograd through the dense dequantized weight, in `dtype`."""
    delta = layer.scale_delta.detach().to(dtype).requires_grad_(True)
    xr = x.detach().to(dtype).requires_grad_(True)
    s = layer.scales.to(dtype) + delta
    W = dequantize(layer.codes(), s, layer.zeros, layer.group_size)
    if layer.perm is not None:
        xr_in = xr.index_select(-1, layer.perm)
    else:
        xr_in = xr
    y = F.linear(xr_in, W, None if layer.bias is None else layer.bias.to(dtype))
    return xr, delta, y


def run_both(layer: QuantLinear, x: torch.Tensor, dtype: torch.dtype, route: str):
    xr, dref, yref = reference(layer, x, dtype)
    gen = torch.Generator().manual_seed(1)
    dY = torch.randn(yref.shape, generator=gen, dtype=torch.float64).to(dtype)
    yref.backward(dY)

    delta = layer.scale_delta.detach().to(dtype).requires_grad_(True)
    xc = x.detach().to(dtype).requires_grad_(True)
    x_in = xc.index_select(-1, layer.perm) if layer.perm is not None else xc
    y = ScaleLinearFunction.apply(x_in, delta, layer.qweight, layer.scales, layer.zeros, layer.bias,
                                  layer.bits, layer.group_size, route)
    y.backward(dY)
    return (yref, xr.grad, dref.grad), (y, xc.grad, delta.grad)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # N, K, bits, group size: per-channel, per-group, and SmolLM2's K = 576 with a short last group
    (48, 64, 4, None),
    (40, 96, 3, 32),
    (33, 576, 4, 128),
    (24, 576, 2, 64),
    (16, 160, 8, 128),
]


@pytest.mark.parametrize("N,K,bits,g", CASES)
@pytest.mark.parametrize("route", ["y0", "dw"])
def test_matches_autograd_fp64(N, K, bits, g, route):
    layer = make_layer(N, K, bits, g, bias=True)
    x = torch.randn(3, 7, K, dtype=torch.float64)
    ref, got = run_both(layer, x, torch.float64, route)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("N,K,bits,g", CASES)
@pytest.mark.parametrize("route", ["y0", "dw", "auto"])
def test_matches_autograd_fp32(N, K, bits, g, route):
    layer = make_layer(N, K, bits, g)
    x = torch.randn(5, 130, K)  # M = 650 > K for K < 650: auto takes the dW route, else Y0
    ref, got = run_both(layer, x, torch.float32, route)
    for a, b in zip(got, ref, strict=True):
        assert rel_err(a, b) < 2e-5


def test_act_order_and_quantlinear_forward():
    """The layer's own forward (perm applied, Function used when Δs trains) vs the reference."""
    layer = make_layer(32, 576, 4, 128, bias=True, act_order=True)
    x = torch.randn(4, 9, 576)
    xr, dref, yref = reference(layer, x, torch.float32)
    dY = torch.randn(yref.shape)
    yref.backward(dY)
    xc = x.clone().requires_grad_(True)
    y = layer(xc)
    y.backward(dY)
    assert rel_err(y, yref) < 1e-6
    assert rel_err(xc.grad, xr.grad) < 2e-5
    assert rel_err(layer.scale_delta.grad, dref.grad) < 2e-5


def test_bf16_autocast_close_to_fp32():
    layer = make_layer(64, 576, 4, None)
    x = torch.randn(2, 64, 576)
    _, dref, yref = reference(layer, x, torch.float32)
    dY = torch.randn(yref.shape)
    yref.backward(dY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scale_trainable_linear(layer, x)
    assert y.dtype == torch.bfloat16
    y.backward(dY.to(torch.bfloat16))
    assert layer.scale_delta.grad.dtype == torch.float32
    assert rel_err(y, yref) < 2e-2
    assert rel_err(layer.scale_delta.grad, dref.grad) < 2e-2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_minus_zero_matches_unpack(bits):
    layer = make_layer(7, 100, bits, 32)
    qz = codes_minus_zero(layer.qweight, layer.zeros, bits, 32, 100, torch.float32)
    ref = unpack(layer.qweight, bits, 100).float() - expand_groups(layer.zeros.float(), 32, 100)
    assert torch.equal(qz, ref)


def test_saves_no_dense_weight():
    """Nothing N×K and floating point is kept for backward: Ŵ is recomputed there."""
    N, K = 96, 80
    layer = make_layer(N, K, 4, None)
    saved: list[torch.Tensor] = []

    def pack_hook(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = layer(torch.randn(8, K, requires_grad=True))
    assert saved
    for t in saved:
        big_float = t.is_floating_point() and t.numel() >= N * K
        assert not big_float, f"saved a float tensor of shape {tuple(t.shape)}"
    y.sum().backward()
    assert layer.scale_delta.grad is not None
