"""The dispatcher through QuantLinear: forward and gradients vs the torch path in float64."""

from __future__ import annotations

import os

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, rel_err

from qtool.nn.qlinear import QuantLinear
from qtool.quant.grid import QuantSpec, rtn


def _layer(N: int, K: int, bits: int, group_size: int | None, device: str, bias: bool) -> QuantLinear:
    W = torch.randn(N, K, device=device)
    b = torch.randn(N, device=device) if bias else None
    return QuantLinear.from_quantized(rtn(W, QuantSpec(bits, group_size)), bits, group_size, b)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 y through the layer's own dequantize (the torch fallback's math)."""
    W = layer.dequantize(torch.float64)
    y = x.double() @ W.T
    return y if layer.bias is None else y + layer.bias.double()


def _check(layer: QuantLinear, M: int, dtype: torch.dtype, device: str) -> None:
    K, N = layer.in_features, layer.out_features
    layer.scale_delta = torch.nn.Parameter(0.01 * torch.randn(N, layer.n_groups, device=device))
    x = torch.randn(2, M, K, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(2, M, N, device=device).to(dtype)
    y = qk.quant_linear(layer, x)
    assert y is not None and y.shape == (2, M, N) and y.dtype == dtype
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    delta64 = layer.scale_delta.detach().double().requires_grad_(True)
    from qtool.quant.grid import dequantize

    W = dequantize(layer.codes(), layer.scales.double() + delta64, layer.zeros, layer.group_size)
    ref = x64 @ W.T + layer.bias.double()
    ref.backward(dy.double())
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(x.grad, x64.grad) < TOL[dtype]
    assert rel_err(layer.scale_delta.grad, delta64.grad) < TOL[torch.float32]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, None), (2, 32)])
@pytest.mark.parametrize("M", [1, 17])  # 1: skinny kernel; 17 rows of 2 batches: dequant + matmul
def test_dispatch_interpreter(bits: int, group_size: int | None, M: int) -> None:
    layer = _layer(48, 576, bits, group_size, "cpu", bias=True)
    _check(layer, M, torch.float16, "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
def test_no_grad_matches_fallback() -> None:
    layer = _layer(48, 576, 4, 64, "cpu", bias=False)
    x = torch.randn(3, 576).half()
    with torch.no_grad():
        y = qk.quant_linear(layer, x)
        fallback = layer(x.float())  # CPU: QuantLinear's own torch path
    assert rel_err(y, fallback) < TOL[torch.float16]


def test_unsupported_returns_none() -> None:
    layer = _layer(48, 576, 4, 64, "cpu", bias=False)
    assert qk.quant_linear(layer, torch.randn(3, 576)) is None  # fp32 activations: torch path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, 32), (8, None), (4, None)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_gpu(bits, group_size, M, dtype) -> None:
    layer = _layer(1536, 576, bits, group_size, "cuda", bias=True)
    _check(layer, M, dtype, "cuda")
    # Through QuantLinear.forward itself (x.is_cuda routes to qtool_kernels).
    x = torch.randn(M, 576, device="cuda").to(dtype)
    layer.scale_delta = None
    with torch.no_grad():
        y = layer(x)
        layer.use_kernels = False
        y_torch = layer(x)
    assert rel_err(y, _reference(layer, x)) < TOL[dtype]
    assert rel_err(y_torch, _reference(layer, x)) < TOL[dtype]
