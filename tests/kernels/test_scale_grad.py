"""Fused PEQA scale gradient vs float64 autograd (reference_scale_grad)."""

from __future__ import annotations

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, random_packed, rel_err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("M", [1, 17])
def test_scale_grad_interpreter(bits: int, group_size: int | None, M: int) -> None:
    N, K = 40, 576
    qweight, _, zeros = random_packed(N, K, bits, group_size)
    x = torch.randn(M, K).half()
    dy = torch.randn(M, N).half()
    g = qk.scale_grad(x, dy, qweight, zeros, bits, group_size, block_m=16, block_n=32)
    ref = qk.reference_scale_grad(x, dy, qweight, zeros, bits, group_size)
    assert g.shape == ref.shape
    assert rel_err(g, ref) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 17, 300])
def test_scale_grad_gpu(bits, group_size, dtype, M) -> None:
    N, K = 1536, 576
    qweight, _, zeros = random_packed(N, K, bits, group_size, device="cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    g = qk.scale_grad(x, dy, qweight, zeros, bits, group_size)
    ref = qk.reference_scale_grad(x, dy, qweight, zeros, bits, group_size)
    assert rel_err(g, ref) < TOL[torch.float32]
