"""CUDA-core GEMV kernel (kernels/gemv.py) vs the float64 reference: every bit-width, group
size, odd shapes, split-K, rows of x past a BLOCK_M multiple, and the dispatcher switch."""

from __future__ import annotations

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, check_fused_split_k, fresh_generator, random_packed, rel_err
from qtool_kernels.gemv import default_gemv_config

SMALL = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}


def _cfg(group_size: int | None, **kw) -> dict:
    cfg = dict(SMALL, **kw)
    if group_size is not None:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)  # a tile lies inside one group
    return cfg


def _inputs(N: int, K: int, M: int, bits: int, group_size: int | None, device: str = "cpu",
            dtype: torch.dtype = torch.float16, symmetric: bool = False):
    gen, seed = fresh_generator()
    print(f"seed={seed}")
    qweight, scales, zeros = random_packed(N, K, bits, group_size, symmetric, gen=gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    return qweight.to(device), scales.to(device), zeros.to(device), x.to(device)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_interpreter(bits: int, group_size: int | None, M: int) -> None:
    # K = 576: with g = 128 the last group is short (64 codes); N = 80: a partial N tile.
    N, K = 80, 576
    qweight, scales, zeros, x = _inputs(N, K, M, bits, group_size)
    bias = torch.randn(N) if M == 3 else None
    cfg = _cfg(group_size, SPLIT_K=2 if M == 1 else 1)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, bias, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr() or cfg["SPLIT_K"] > 1
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "block_k", "split_k", "M"), [
    (32, 128, 1, 2),   # tiles of 4 groups (_gemv_groups_kernel)
    (64, 256, 2, 3),   # ... split, 3 rows
    (128, 512, 1, 1),  # one partial tile: groups past K are clamped
])
def test_gemv_tiles_span_groups(bits: int, group_size: int, block_k: int, split_k: int, M: int) -> None:
    # K = 600 (padded to 608): the last tile is partial, its last group short
    N, K = 48, 600
    qweight, scales, zeros, x = _inputs(N, K, M, bits, group_size)
    cfg = dict(SMALL, BLOCK_K=block_k, SPLIT_K=split_k)
    bias = torch.randn(N) if M == 3 else None
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, bias, config=cfg, out=out if split_k == 1 else None)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "block_n", "block_k", "split_k", "M", "tiled_scales"), [
    (128, 16, 128, 2, 1, True),    # one group per tile, split K, tile-major scales
    (64, 32, 256, 1, 1, False),    # tiles of 4 groups (_gemv_groups_kernel), row-major scales
    (None, 16, 128, 3, 2, True),   # per channel, 2 rows of x
    (32, 32, 64, 1, 3, True),      # two tiles per group
])
def test_gemv_tile_major(bits: int, group_size: int | None, block_n: int, block_k: int, split_k: int, M: int,
                         tiled_scales: bool) -> None:
    from qtool_kernels.tiles import groups_row_major, groups_tile_major, row_major, tile_major

    N, K = 64, 512
    qweight, scales, zeros, x = _inputs(N, K, M, bits, group_size)
    qt = tile_major(qweight, block_n, block_k, bits)
    assert torch.equal(row_major(qt), qweight)
    st, zt = scales, zeros
    if tiled_scales:
        st, zt = groups_tile_major(scales, block_n), groups_tile_major(zeros, block_n)
        assert torch.equal(groups_row_major(st), scales) and torch.equal(groups_row_major(zt), zeros)
    bias = torch.randn(N) if M == 3 else None
    cfg = dict(SMALL, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.gemv_matmul(x, qt, st, zt, bits, group_size, bias, config=cfg, out=out if split_k == 1 else None)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    assert rel_err(y, ref) < TOL[torch.float16]
    # the default config adopts the layout's tile
    y2 = qk.gemv_matmul(x, qt, st, zt, bits, group_size, bias)
    assert rel_err(y2, ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("group_size", "block_k"), [(128, 128), (32, 128), (None, 128)])  # 32: groups kernel
@pytest.mark.parametrize("tiled", [False, True])
def test_gemv_pipelined(bits: int, group_size: int | None, block_k: int, tiled: bool) -> None:
    """STAGES = 3 (Triton's pipeliner over the K loop) computes the same product; odd K with
    a short last group, a partial N tile (row-major) and split K with uneven slices."""
    from qtool_kernels.tiles import groups_tile_major, tile_major

    N, K, split = (64, 512, 3) if tiled else (80, 576, 2)
    qweight, scales, zeros, x = _inputs(N, K, 1, bits, group_size)
    q, s, z = qweight, scales, zeros
    if tiled:
        q, s, z = tile_major(qweight, 32, block_k, bits), groups_tile_major(scales, 32), groups_tile_major(zeros, 32)
    cfg = dict(SMALL, BLOCK_K=block_k, SPLIT_K=split, STAGES=3)
    y = qk.gemv_matmul(x, q, s, z, bits, group_size, config=cfg)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
    assert rel_err(y, ref) < TOL[torch.float16]


def test_tile_major_rejects_partial_tiles() -> None:
    from qtool_kernels.tiles import tile_major

    with pytest.raises(ValueError, match="whole tiles"):
        tile_major(torch.zeros(48, 20, dtype=torch.int32), 32, 128, 4)


@pytest.mark.parametrize(("bits", "group_size", "M"), [(4, 128, 3), (3, None, 1)])
def test_gemv_default_config(bits: int, group_size: int | None, M: int) -> None:
    # SmolLM2-like shape (N = 1536, K = 576) through the default tiles.
    N, K = 1536, 576
    qweight, scales, zeros, x = _inputs(N, K, M, bits, group_size)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, out=out)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [3, 4])
def test_gemv_k_not_multiple_of_32(bits: int) -> None:
    # K = 600: the packed row is padded to 608 codes, the last group of 64 holds 24 of them;
    # codes past K must contribute nothing (x is masked there, whatever the padding holds).
    N, K = 48, 600
    qweight, scales, zeros, x = _inputs(N, K, 2, bits, 64, symmetric=True)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, 64, config=_cfg(64))
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, 64)
    assert rel_err(y, ref) < TOL[torch.float16]


def _x_views(M: int, K: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    """x [M, K] (K even) as a contiguous tensor, as a view whose rows start 2 bytes off a 4-byte
    boundary, and as one with an odd row stride: only the first may be read two elements per
    32-bit load."""
    gen, seed = fresh_generator()
    print(f"seed={seed}")
    even = torch.randn(M, K + 4, generator=gen).to(dtype).to(device)  # row stride K + 4: even
    odd = torch.randn(M, K + 1, generator=gen).to(dtype).to(device)
    return {"aligned": even[:, :K].contiguous(), "offset": even[:, 1:K + 1], "odd stride": odd[:, :K]}


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("group_size", "block_k"), [(128, 128), (32, 128)])  # 32: the groups kernel
def test_gemv_x_pairs(bits: int, group_size: int, block_k: int) -> None:
    """x read two elements per 32-bit load (X_PAIRS) gives bit for bit the per-element result
    (the same fp32 products in the same order), and is used only where the rows allow it."""
    from qtool_kernels.gemv import _x_pairs

    N, K, M = 48, 576, 2
    qweight, scales, zeros, _ = _inputs(N, K, M, bits, group_size)
    cfg = dict(SMALL, BLOCK_K=block_k, SPLIT_K=2)
    views = _x_views(M, K, torch.float16)
    assert [_x_pairs(v) for v in views.values()] == [True, False, False]
    for name, x in views.items():
        y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, config=dict(cfg, X_PAIRS=True))
        y1 = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, config=dict(cfg, X_PAIRS=False))
        assert torch.equal(y, y1), name
        assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)) < TOL[torch.float16], name


def test_gemv_split_k_partials_all_written() -> None:
    N, K, bits = 64, 1024, 4
    qweight, scales, zeros, x = _inputs(N, K, 1, bits, 128)
    ws = torch.full((4, 1, N), float("nan"))
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, 128, config=_cfg(128, SPLIT_K=4), workspace=ws)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, 128)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize(("M", "block_m", "split_k", "bias"), [(1, 1, 4, False), (3, 2, 3, True), (4, 4, 5, True)])
def test_gemv_fused_split_k(M: int, block_m: int, split_k: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last program of each row block sums the partials in split order: bit for bit the
    fp32 sum (split 0 first), + bias, one rounding, of the partials the unfused path writes;
    the ticket counters are back at 0 afterwards; rows past M and y are never left unwritten.
    The interpreter runs the programs one after another, so this checks the arithmetic, not
    who is last under concurrency: that is the GPU test below and the sm_90 SASS ordering
    test (test_compile_sm90.py)."""
    N, K, bits = 80, 1024, 4  # 80 rows: the last 32-row block is partial
    qweight, scales, zeros, x = _inputs(N, K, M, bits, 128)
    b = torch.randn(N).half() if bias else None
    cfg = _cfg(128, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=32)
    y = check_fused_split_k(lambda **kw: qk.gemv_matmul(x, qweight, scales, zeros, bits, 128, b, config=cfg, **kw),
                            split_k, M, N, b, 3 * -(-M // block_m), monkeypatch)
    assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, bits, 128, b)) < TOL[torch.float16]


def test_gemv_rows_past_block_m() -> None:
    # M = 5 in programs of 2 rows: the last program's second row does not exist (it reads
    # row 4 again and must not be stored); the output is poisoned to catch stray writes.
    N, K, M, bits = 40, 256, 5, 4
    qweight, scales, zeros, x = _inputs(N, K, M, bits, None)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, None, config=_cfg(None, BLOCK_M=2), out=out)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, None)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("M", [1, 2, 4, 9])
def test_default_gemv_config_tiles(group_size: int | None, M: int) -> None:
    N, K = 8192, 28672
    cfg = default_gemv_config(M, N, K, 4, group_size, 132)
    assert cfg["BLOCK_K"] % 32 == 0
    if group_size is not None:  # inside one group, or a power of two of whole groups (tuned "SPAN_GROUPS")
        bk = cfg["BLOCK_K"]
        assert group_size % bk == 0 or (bk % group_size == 0 and (bk // group_size) & (bk // group_size - 1) == 0)
    assert 1 <= cfg["BLOCK_M"] <= 4 and cfg["BLOCK_M"] == min(M, 4)
    k_tiles = -(-K // cfg["BLOCK_K"])
    assert 1 <= cfg["SPLIT_K"] <= 16 and k_tiles // cfg["SPLIT_K"] >= 4


def test_dispatch_gemv_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """M ≤ gemv_max_m() goes to the GEMV unless QTOOL_GEMV=0; above it, the skinny kernel."""
    import qtool_kernels.linear as lin

    calls: list[str] = []
    gemv, skinny = lin.gemv_matmul, lin.skinny_matmul
    monkeypatch.setattr(lin, "gemv_matmul", lambda *a, **k: calls.append("gemv") or gemv(*a, **k))
    monkeypatch.setattr(lin, "skinny_matmul", lambda *a, **k: calls.append("skinny") or skinny(*a, **k))
    N, K, bits = 32, 128, 4
    qweight, scales, zeros, _ = _inputs(N, K, 1, bits, 128)
    monkeypatch.delenv("QTOOL_GEMV", raising=False)
    top = lin.gemv_max_m()  # 4 by default, 1 with the H100-measured kernels/tuned_skinny.json
    assert top >= 1
    for M, env, path in [(1, "1", "gemv"), (top, "1", "gemv"), (1, "0", "skinny"), (top + 1, "1", "skinny")]:
        monkeypatch.setenv("QTOOL_GEMV", env)
        calls.clear()
        x = torch.randn(M, K).half()
        y = lin.forward_packed(x, qweight, scales, zeros, bits, 128, None)
        assert calls == [path], (M, env, calls)
        assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, bits, 128)) < TOL[torch.float16]
    monkeypatch.setenv("QTOOL_GEMV", "1")
    calls.clear()
    lin.forward_packed(torch.randn(2, K).half(), qweight, scales, zeros, bits, 128, None, max_m=0)
    assert calls == []  # max_m = 0 forces dequantize + matmul, GEMV included


# Compilation dominates the GPU run (one kernel per constexpr combination), so each bits ×
# group × dtype × M class (M = 1: one row per program; M = 7: BLOCK_M = 4 and a program with
# rows past M) runs once, on one of three shapes taken in turn (odd K = 1000, short last
# group K = 576, even 4096).
GPU_SHAPES = [(1536, 576), (1000, 1000), (4096, 4096)]
GPU_CASES = [(bits, g, dtype, GPU_SHAPES[i % 3], M)
             for i, (bits, g, dtype, M) in enumerate(
                 (b, g, d, m) for b in (2, 3, 4, 8) for g in (32, 64, 128, None)
                 for d in (torch.float16, torch.bfloat16) for m in (1, 7))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bits", "group_size", "dtype", "shape", "M"), GPU_CASES)
def test_gemv_gpu(bits, group_size, dtype, shape, M) -> None:
    """The fp32 GEMV (config given without "H2": M = 1 fp16 W4/W2 would otherwise take the
    packed-half2 kernel, tested in test_gemv_h2.py)."""
    N, K = shape
    qweight, scales, zeros, x = _inputs(N, K, M, bits, group_size, device="cuda", dtype=dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    cfg = default_gemv_config(M, N, K, bits, group_size, torch.cuda.get_device_properties(0).multi_processor_count)
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, config=cfg, out=out)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "cfg"), [
    (torch.float16, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 2}),
    (torch.bfloat16, {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}),
    (torch.float16, {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 8, "num_stages": 3}),
    (torch.bfloat16, {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 2, "num_stages": 1}),
    (torch.bfloat16, {"BLOCK_N": 16, "BLOCK_K": 1024, "SPLIT_K": 3, "num_warps": 4, "num_stages": 2}),
    (torch.float16, {"BLOCK_N": 8, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 2, "num_stages": 2}),
])
def test_gemv_gpu_configs(dtype, cfg) -> None:
    """Other tile configs compile and agree (bias, fp32 scales as PEQA passes them)."""
    N, K, M = 2048, 4096, 4
    qweight, scales, zeros, x = _inputs(N, K, M, 4, 128, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    y = qk.gemv_matmul(x, qweight, scales.float(), zeros, 4, 128, bias, config=cfg)
    ref = qk.reference_gemv(x, qweight, scales.float(), zeros, 4, 128, bias)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "block_k"), [(128, 128), (64, 128), (None, 128)])  # 64: groups kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stages", [2, 3])
def test_gemv_pipelined_gpu(bits, group_size, block_k, dtype, stages) -> None:
    """The cp.async-pipelined K loop (STAGES > 1) on tile-major weights, fused split-K with
    uneven slices, and on row-major weights with a partial N tile and a short last group."""
    from qtool_kernels.tiles import groups_tile_major, tile_major

    for N, K, tiled in ((4096, 4096, True), (1000, 1000, False)):
        qweight, scales, zeros, x = _inputs(N, K, 1, bits, group_size, device="cuda", dtype=dtype)
        q, s, z = qweight, scales, zeros
        if tiled:
            q = tile_major(qweight, 64, block_k, bits)
            s, z = groups_tile_major(scales, 64), groups_tile_major(zeros, 64)
        cfg = {"BLOCK_N": 64, "BLOCK_K": block_k, "SPLIT_K": 5, "num_warps": 4, "num_stages": 2, "STAGES": stages}
        y = qk.gemv_matmul(x, q, s, z, bits, group_size, config=cfg)
        ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
        assert rel_err(y, ref) < TOL[dtype], (N, K, tiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_x_pairs_gpu(bits: int, dtype: torch.dtype) -> None:
    """On the GPU the pair loads convert each half with PTX (fp16) or bit operations (bf16):
    bit for bit the per-element kernel, on tile-major weights and on misaligned views of x."""
    from qtool_kernels.tiles import groups_tile_major, tile_major

    N, K, M = 1024, 4096, 1
    qweight, scales, zeros, _ = _inputs(N, K, M, bits, 128, device="cuda", dtype=dtype)
    q, s, z = tile_major(qweight, 64, 128, bits), groups_tile_major(scales, 64), groups_tile_major(zeros, 64)
    cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 2}
    for name, x in _x_views(M, K, dtype, "cuda").items():
        y = qk.gemv_matmul(x, q, s, z, bits, 128, config=dict(cfg, X_PAIRS=True))
        y1 = qk.gemv_matmul(x, q, s, z, bits, 128, config=dict(cfg, X_PAIRS=False))
        assert torch.equal(y, y1), name
        assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, bits, 128)) < TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemv_fused_split_k_gpu_graph_and_streams() -> None:
    """On the GPU the last-ticket reduction must see every partial: eager, 50 CUDA-graph
    replays and two streams at once give the same bits as the unfused path's fp32 sum."""
    import os

    gen, seed = fresh_generator("cuda")
    print(f"seed={seed}")
    N, K, bits, g = 4096, 11008, 4, 128
    qweight = torch.randint(-(2**31), 2**31 - 1, (N, K * bits // 32), device="cuda", dtype=torch.int32, generator=gen)
    scales = (torch.rand(N, K // g, device="cuda", generator=gen) * 0.015 + 0.005).half()
    zeros = torch.randint(0, 16, (N, K // g), device="cuda", dtype=torch.uint8, generator=gen)
    x = torch.randn(1, K, device="cuda", generator=gen).half()
    cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 13, "num_warps": 4, "num_stages": 2}
    os.environ["QTOOL_FUSED_SPLIT_K"] = "0"
    try:
        expected = qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)
    finally:
        os.environ.pop("QTOOL_FUSED_SPLIT_K")
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)
    torch.cuda.synchronize()
    assert rel_err(y, expected) < 1e-3  # torch's sum(0) may add the partials in another order
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        yg = qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)
    outs = []
    for _ in range(50):
        graph.replay()
        outs.append(yg.clone())
    s2 = torch.cuda.Stream()
    with torch.cuda.stream(s2):  # a second stream, running beside the default one
        y2 = qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)
    y1 = qk.gemv_matmul(x, qweight, scales, zeros, bits, g, config=cfg)
    torch.cuda.synchronize()
    assert all(torch.equal(o, y) for o in outs)
    assert torch.equal(y1, y) and torch.equal(y2, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_gpu_matches_skinny(dtype) -> None:
    """Both decode kernels on one input: they must agree to the output rounding."""
    N, K, M = 4096, 11008, 1
    qweight, scales, zeros, x = _inputs(N, K, M, 4, 128, device="cuda", dtype=dtype)
    a = qk.gemv_matmul(x, qweight, scales, zeros, 4, 128)
    b = qk.skinny_matmul(x, qweight, scales, zeros, 4, 128)
    assert rel_err(a, b.double()) < 2 * TOL[dtype]


def _large_classes() -> list[tuple[int, int | None]]:
    from qtool_kernels.skinny import _tuned

    return [(int(b), None if g == "pc" else int(g)) for b, g, _ in
            (k.split(":") for k, v in _tuned().get("gemv_tiled", {}).items() if "large" in v)]


@pytest.mark.parametrize(("bits", "group_size"), _large_classes())
def test_large_entry_sets_layout_and_kernel(bits: int, group_size: int | None) -> None:
    """A class's "large" entry applies to layers of ≥ min_codes codes in both places that must
    agree: the tile-major layout (tile_major_tile) and the kernel's config."""
    from qtool_kernels.gemv import tile_major_tile
    from qtool_kernels.skinny import _tuned

    e = _tuned()["gemv_tiled"][f"{bits}:{group_size or 'pc'}:1"]
    big, small = (8192, 28672), (4096, 4096)
    assert big[0] * big[1] >= e["large"]["min_codes"] > small[0] * small[1]
    for (N, K), want in ((big, e["large"]), (small, e)):
        tile = tile_major_tile(bits, group_size, N, K)
        assert tile == (want.get("BLOCK_N", e["BLOCK_N"]), want.get("BLOCK_K", e["BLOCK_K"]))
        cfg = default_gemv_config(1, N, K, bits, group_size, 132, {"BLOCK_N": tile[0], "BLOCK_K": tile[1]}, tiled=True)
        assert cfg["num_warps"] == want.get("num_warps", e["num_warps"])
        assert cfg["STAGES"] == want.get("STAGES", e.get("STAGES", 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bits", "group_size"), _large_classes())
def test_gemv_large_layers_gpu(bits: int, group_size: int | None) -> None:
    """Layers past a "large" entry's min_codes through the decode path (tile_major_layout +
    default config), against float64."""
    from qtool.bench.kernels import random_packed_layer
    from qtool.nn.qlinear import tile_major_layout

    N, K = 8192, 16384  # 2^27 codes
    L = random_packed_layer(N, K, bits, group_size)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    with tile_major_layout(torch.nn.ModuleList([L])):
        y = qk.gemv_matmul(x, L.qweight, L.scales, L.zeros, bits, group_size)
    assert rel_err(y, qk.reference_gemv(x, L.qweight, L.scales, L.zeros, bits, group_size)) < TOL[torch.float16]
