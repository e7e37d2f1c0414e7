"""Tile-major codes (kernels/tiles.py): every kernel that reads them against the float64
reference, and QuantLinear's tile_major_layout (converted in place, restored bit for bit)."""

from __future__ import annotations

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, fresh_generator, random_packed, rel_err
from qtool_kernels.tiles import fit_block_k, groups_tile_major, packed_geometry, tile_major


def _tiled(N: int, K: int, bits: int, group_size: int | None, bn: int, bk: int):
    gen, seed = fresh_generator()
    print(f"seed={seed}")
    qweight, scales, zeros = random_packed(N, K, bits, group_size, gen=gen)
    return qweight, tile_major(qweight, bn, bk, bits), scales, zeros, gen


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "bn", "bk"), [(128, 64, 128), (64, 32, 256), (None, 16, 128)])
def test_dequant_tile_major(bits: int, group_size: int | None, bn: int, bk: int) -> None:
    N, K = 64, 512
    qweight, qt, scales, zeros, _ = _tiled(N, K, bits, group_size, bn, bk)
    assert packed_geometry(qt) == (N, qweight.shape[1], bn, bk * bits // 32)
    out = torch.full((N, K), float("nan"), dtype=torch.float16)
    W = qk.dequantize_packed(qt, scales, zeros, bits, group_size, K, torch.float16, out=out)
    ref = qk.reference_dequantize(qweight, scales, zeros, bits, group_size, K)
    assert rel_err(W, ref) < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("group_size", "bn", "bk", "M"), [(128, 64, 128, 5), (64, 32, 256, 16), (None, 64, 128, 2)])
@pytest.mark.parametrize("tiled_scales", [False, True])
def test_skinny_tile_major(bits: int, group_size: int | None, bn: int, bk: int, M: int, tiled_scales: bool) -> None:
    N, K = 128, 512
    qweight, qt, scales, zeros, gen = _tiled(N, K, bits, group_size, bn, bk)
    x = torch.randn(M, K, generator=gen).half()
    # a config whose K tile (256) is wider than a 128-code layout tile: the wrapper narrows it;
    # its 32-row blocks are not the scales' blocks (bn rows), so both index maps are exercised
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256 if group_size != 128 else 128, "SPLIT_K": 2,
           "num_warps": 4, "num_stages": 1}
    s, z = (groups_tile_major(scales, bn), groups_tile_major(zeros, bn)) if tiled_scales else (scales, zeros)
    y = qk.skinny_matmul(x, qt, s, z, bits, group_size, config=cfg)
    ref = qk.reference_skinny(x, qweight, scales, zeros, bits, group_size)
    assert rel_err(y, ref) < TOL[torch.float16]


def test_fit_block_k() -> None:
    assert fit_block_k(256, 4, 0) == 256  # row-major: unchanged
    assert fit_block_k(256, 4, 16) == 128  # 16 words of W4 = 128 codes
    assert fit_block_k(64, 3, 12) == 64  # W3: 12 words = 128 codes, 64 divides it
    assert fit_block_k(512, 2, 16) == 256


def test_tile_major_layout_roundtrip() -> None:
    from torch import nn

    from qtool.nn.qlinear import QuantLinear, tile_major_layout
    from qtool.quant.grid import QuantSpec, rtn

    gen, seed = fresh_generator()
    print(f"seed={seed}")
    layers = []
    for bits, g, (N, K) in [(4, 128, (128, 256)), (2, 64, (128, 512)), (3, 128, (128, 256)), (4, 128, (80, 256))]:
        qw = rtn(torch.randn(N, K, generator=gen), QuantSpec(bits, g))
        layers.append(QuantLinear.from_quantized(qw, bits, g, None))
    # a task's frozen Δs (after swap-scales): codes go tile-major, s₀ + Δs stays in row order
    frozen = QuantLinear.from_quantized(rtn(torch.randn(64, 256, generator=gen), QuantSpec(4, 128)), 4, 128, None)
    frozen.scale_delta = nn.Parameter(0.01 * torch.randn(frozen.scales.shape, generator=gen), requires_grad=False)
    layers.append(frozen)
    peqa = QuantLinear.from_quantized(rtn(torch.randn(64, 256, generator=gen), QuantSpec(4, 128)), 4, 128, None)
    peqa.scale_delta = nn.Parameter(torch.zeros_like(peqa.scales, dtype=torch.float32))  # trains: left as is
    model = nn.Sequential(*layers, peqa)
    before = [(m.qweight.clone(), m.scales.clone(), m.zeros.clone()) for m in layers]
    codes = [m.codes() for m in layers]
    # M = 1: the GEMV reads the tile-major scales; M = 3: the skinny kernel gets them back in row order
    xs = [torch.randn(M, m.in_features, generator=gen).half() for m in layers for M in (1, 3)]
    with tile_major_layout(model) as n:
        # 80 rows are not whole 64-row tiles: that layer stays row-major
        assert n == 4 and [m.qweight.dim() for m in layers] == [4, 4, 4, 2, 4] and peqa.qweight.dim() == 2
        assert [(m.scales.dim(), m.zeros.dim()) for m in layers] == [(3, 3)] * 3 + [(2, 2)] * 2
        assert all(torch.equal(m.codes(), c) for m, c in zip(layers, codes, strict=True))
        ys = [qk.quant_linear(m, xs[2 * i + j]) for i, m in enumerate(layers) for j in (0, 1)]  # kernels (interpreter)
        ys_torch = [m(xs[2 * i + j]) for i, m in enumerate(layers) for j in (0, 1)]  # CPU tensors: the torch fallback
    for i, (m, (q, s, z)) in enumerate(zip(layers, before, strict=True)):
        assert torch.equal(m.qweight, q) and torch.equal(m.scales, s) and torch.equal(m.zeros, z)
        assert m.qweight.is_contiguous() and m.scales.is_contiguous() and m.zeros.is_contiguous()
        for j in (0, 1):
            x = xs[2 * i + j]
            ref = x.double() @ m.dense_weight(torch.float64).T
            assert rel_err(ys[2 * i + j], ref) < TOL[torch.float16]
            assert rel_err(ys_torch[2 * i + j], ref) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, None), (4, 64), (3, 128), (3, 64), (2, 64), (2, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 100])
def test_tile_major_gpu(bits: int, group_size: int | None, dtype: torch.dtype, M: int) -> None:
    # the tuned tile of the class, on a 7B-like shape, through the dispatcher for M
    N, K = 4096, 11008 if bits != 3 else 4096
    tile = qk.tile_major_tile(bits, group_size, N, K)
    assert tile is not None
    gen, seed = fresh_generator("cuda")
    print(f"seed={seed}")
    # random codes drawn on the GPU (an RTN of a 45M-element matrix on the host takes seconds)
    qweight = torch.randint(-(2**31), 2**31 - 1, (N, K * bits // 32), device="cuda", dtype=torch.int32, generator=gen)
    G = 1 if group_size is None else K // group_size
    scales = (torch.rand(N, G, device="cuda", generator=gen) * 0.015 + 0.005).half()
    zeros = torch.randint(0, 2**bits, (N, G), device="cuda", dtype=torch.uint8, generator=gen)
    qt = tile_major(qweight, tile[0], tile[1], bits)
    x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
    # [N, G] scales, and the tile-major ones tile_major_layout makes
    for s, z in [(scales, zeros), (groups_tile_major(scales, tile[0]), groups_tile_major(zeros, tile[0]))]:
        for _ in range(2):  # the first launch records the kernel's occupancy, the second splits K by it
            y = qk.forward_packed(x, qt, s, z, bits, group_size, None)
            assert rel_err(y, ref) < TOL[dtype]
