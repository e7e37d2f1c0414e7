"""Dequantize kernel vs the float64 reference."""

from __future__ import annotations

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, random_packed, rel_err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_dequant_interpreter(bits: int, group_size: int | None) -> None:
    N, K = 40, 576
    qweight, scales, zeros = random_packed(N, K, bits, group_size)
    out = torch.full((N, K), float("nan"), dtype=torch.float16)
    W = qk.dequantize_packed(qweight, scales, zeros, bits, group_size, K, torch.float16, out=out)
    ref = qk.reference_dequantize(qweight, scales, zeros, bits, group_size, K)
    # Each element is one fp16 rounding of an exact value: 2^-11 relative at most.
    assert rel_err(W, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1536, 576), (1000, 1000), (11008, 4096)])
def test_dequant_gpu(bits, group_size, dtype, shape) -> None:
    N, K = shape
    qweight, scales, zeros = random_packed(N, K, bits, group_size, device="cuda")
    out = torch.full((N, K), float("nan"), dtype=dtype, device="cuda")
    W = qk.dequantize_packed(qweight, scales, zeros, bits, group_size, K, dtype, out=out)
    ref = qk.reference_dequantize(qweight, scales, zeros, bits, group_size, K)
    assert rel_err(W, ref) < TOL[dtype] / 2
