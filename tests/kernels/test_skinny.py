"""Skinny (decode) kernel vs the float64 reference: every bit-width, group size, odd shapes."""

from __future__ import annotations

import pytest
import qtool_kernels as qk
import torch
import triton
import triton.language as tl
from kernel_testutil import TOL, check_fused_split_k, random_packed, rel_err
from qtool_kernels._unpack import pairs4_consts

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_skinny_interpreter(bits: int, group_size: int | None, M: int) -> None:
    # K = 576: with g = 128 the last group is short (64 codes); N = 80: a partial N tile.
    N, K = 80, 576
    qweight, scales, zeros = random_packed(N, K, bits, group_size)
    x = torch.randn(M, K).half()
    bias = torch.randn(N) if M == 3 else None
    cfg = dict(SMALL, SPLIT_K=2 if M == 1 else 1)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.skinny_matmul(x, qweight, scales, zeros, bits, group_size, bias, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr() or cfg["SPLIT_K"] > 1
    ref = qk.reference_skinny(x, qweight, scales, zeros, bits, group_size, bias)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [3, 4])
def test_skinny_k_not_multiple_of_32(bits: int) -> None:
    # K = 600: the packed row is padded to 608 codes; tiles past K must contribute nothing.
    N, K = 48, 600
    qweight, scales, zeros = random_packed(N, K, bits, 64, symmetric=True)
    x = torch.randn(2, K).half()
    y = qk.skinny_matmul(x, qweight, scales, zeros, bits, 64, config=dict(SMALL, BLOCK_K=256))
    ref = qk.reference_skinny(x, qweight, scales, zeros, bits, 64)
    assert rel_err(y, ref) < TOL[torch.float16]


def test_split_k_partials_all_written() -> None:
    N, K, bits = 64, 1024, 4
    qweight, scales, zeros = random_packed(N, K, bits, 128)
    x = torch.randn(1, K).half()
    ws = torch.full((4, 1, N), float("nan"))
    y = qk.skinny_matmul(x, qweight, scales, zeros, bits, 128, config=dict(SMALL, SPLIT_K=4), workspace=ws)
    ref = qk.reference_skinny(x, qweight, scales, zeros, bits, 128)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize(("M", "split_k", "bias"), [(2, 4, False), (17, 3, True)])
def test_skinny_fused_split_k(M: int, split_k: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last program of each output block adds the partials in split order: bit for bit the
    fp32 sum of the unfused path's partials (split 0 first) + bias, one rounding; the ticket
    counters end at 0; M = 17 leaves the second 16-row block mostly empty (masked)."""
    N, K, bits = 80, 1024, 4
    qweight, scales, zeros = random_packed(N, K, bits, 128)
    x = torch.randn(M, K).half()
    b = torch.randn(N).half() if bias else None
    cfg = dict(SMALL, SPLIT_K=split_k)
    y = check_fused_split_k(lambda **kw: qk.skinny_matmul(x, qweight, scales, zeros, bits, 128, b, config=cfg, **kw),
                            split_k, M, N, b, 3 * -(-M // 16), monkeypatch)
    assert rel_err(y, qk.reference_skinny(x, qweight, scales, zeros, bits, 128, b)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1536, 576), (1000, 1000)])
@pytest.mark.parametrize("M", [1, 16, 17, 64])
def test_skinny_gpu(bits, group_size, dtype, shape, M) -> None:
    N, K = shape
    qweight, scales, zeros = random_packed(N, K, bits, group_size, device="cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    y = qk.skinny_matmul(x, qweight, scales, zeros, bits, group_size, out=out)
    ref = qk.reference_skinny(x, qweight, scales, zeros, bits, group_size)
    assert rel_err(y, ref) < TOL[dtype]


def _tuned_skinny_classes() -> list[tuple[int, int | None]]:
    from qtool_kernels.skinny import _tuned

    return [(int(b), None if g == "pc" else int(g)) for b, g in (k.split(":") for k in _tuned().get("skinny", {}))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bits", "group_size"), _tuned_skinny_classes())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_tuned_classes_gpu(bits: int, group_size: int | None, dtype: torch.dtype) -> None:
    """Each class tuned_skinny.json gives its own skinny tile (2 warps: mma.sync instead of
    wgmma) at M = 5 and 16, on row-major weights with a partial N tile and on tile-major ones
    (what decode runs)."""
    from qtool_kernels.tiles import groups_tile_major, tile_major

    for N, K, tiled in ((1000, 1024, False), (4096, 4096, True)):
        qweight, scales, zeros = random_packed(N, K, bits, group_size, device="cuda")
        q, s, z = qweight, scales, zeros
        if tiled:
            q = tile_major(qweight, 64, 128, bits)
            s, z = groups_tile_major(scales, 64), groups_tile_major(zeros, 64)
        for M in (5, 16):
            x = torch.randn(M, K, device="cuda").to(dtype)
            out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
            y = qk.skinny_matmul(x, q, s, z, bits, group_size, out=out)
            ref = qk.reference_skinny(x, qweight, scales, zeros, bits, group_size)
            assert rel_err(y, ref) < TOL[dtype], (N, K, tiled, M)


@pytest.mark.parametrize(("group_size", "options"), [(128, {"PAIRS": False}), (128, {"DEQUANT": True}),
                                                     (None, {"DEQUANT": True}), (64, {})])
def test_skinny_w4_pairs_options(group_size: int | None, options: dict) -> None:
    """W4 through unpack_tile (PAIRS off) and through register pairs with the partial sums
    scaled or each element dequantized (DEQUANT): the same product, odd K (576: g = 128's
    last group is short) and a partial N tile, split K."""
    N, K = 80, 576
    qweight, scales, zeros = random_packed(N, K, 4, group_size)
    x = torch.randn(5, K).half()
    y = qk.skinny_matmul(x, qweight, scales, zeros, 4, group_size, config=dict(SMALL, SPLIT_K=2, **options))
    assert rel_err(y, qk.reference_skinny(x, qweight, scales, zeros, 4, group_size)) < TOL[torch.float16]


@triton.jit
def _consts_kernel(z_ptr, s_ptr, out_ptr, IS_BF16: tl.constexpr):
    i = tl.arange(0, 16)
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    a, b, s2 = pairs4_consts(tl.load(z_ptr + i), tl.load(s_ptr + i).to(DT), IS_BF16)
    tl.store(out_ptr + i, a)
    tl.store(out_ptr + 16 + i, b)
    tl.store(out_ptr + 32 + i, s2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairs4_consts_bit_patterns(dtype: torch.dtype) -> None:
    """The PTX's operands are built as bit patterns, not converted (_unpack.pairs4_consts): they
    must be the fp16/bf16 values −(1024 + z), −(64 + z) (bf16: −(128 + z) twice) and s, in both
    halves, for every 4-bit zero point. The GPU tests run them through the PTX; the CPU
    interpreter runs the emulation, which does not read them, so they are checked here."""
    z = torch.arange(16, dtype=torch.uint8)
    s = (torch.randn(16) * 1e-2).to(dtype)
    out = torch.zeros(48, dtype=torch.int32)
    _consts_kernel[(1,)](z, s, out, IS_BF16=dtype == torch.bfloat16)

    def both(v: torch.Tensor) -> torch.Tensor:
        h = v.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        return h | (h << 16)

    base_a, base_b = (128.0, 128.0) if dtype == torch.bfloat16 else (1024.0, 64.0)
    assert torch.equal(out[:16], both(-(z.float() + base_a)))
    assert torch.equal(out[16:32], both(-(z.float() + base_b)))
    assert torch.equal(out[32:], both(s))
