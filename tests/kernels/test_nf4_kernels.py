"""NF4 kernels (kernels/nf4.py) vs the float64 reference: skinny, dequantize, dispatch + dX.

Fresh random weights and activations on every run (the seed is printed; QTOOL_TEST_SEED
replays it). Bounds (‖out − ref‖/‖ref‖, kernel_testutil.TOL): the levels are stored rounded
to fp16/bf16 (≤ 2⁻¹¹ / 2⁻⁸ relative), products accumulate in fp32, and the output is
rounded once more, so the error is a few unit roundoffs at most: fp16 2e-3, bf16 1e-2.
A dequantized Ŵ is one rounding of an fp32 value: fp16 < 1e-3, bf16 < 5e-3.
"""

from __future__ import annotations

import os

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, check_fused_split_k, fresh_generator, random_nf4, rel_err

from qtool.nn import kernel_dispatch
from qtool.quant import nf4

INTERP = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")


@pytest.fixture
def gen() -> torch.Generator:
    g, seed = fresh_generator()
    print(f"QTOOL_TEST_SEED={seed}")
    return g


def _x(M: int, K: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    return torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)


# ----------------------------------------------------------------- CPU, no Triton


def test_reference_is_the_layers_dequantize(gen) -> None:
    # K = 600: blocks straddle rows; the reference must index the flat weight as the format does.
    for dq in (True, False):
        layer = random_nf4(24, 600, 64, dq, gen=gen)
        ref = qk.reference_dequantize_nf4(qk.NF4Weight.of(layer))
        assert rel_err(layer.dequantize(torch.float32), ref) < 1e-6


def _prmt(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """PTX prmt.b32 (default mode), elementwise on int64 tensors holding 32-bit values."""
    pool = torch.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)], -1)
    out = torch.zeros_like(sel)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = pool.gather(-1, (s & 7).unsqueeze(-1)).squeeze(-1)
        byte = torch.where((s & 8) != 0, torch.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def _run_decode_asm(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Execute qk.nf4.DECODE_ASM line by line (it uses only and/or/shr/prmt)."""
    regs = {"$4": words}
    for i, t in enumerate(qk.nf4.table_words(dtype)):
        regs[f"${5 + i}"] = torch.full_like(words, t & 0xFFFFFFFF)

    def val(tok: str) -> torch.Tensor:
        return torch.full_like(words, int(tok, 0)) if tok[0].isdigit() else regs[tok]

    for line in qk.nf4.DECODE_ASM.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *args = [a.strip() for a in rest.split(",")]
        if op == "and.b32":
            r = val(args[0]) & val(args[1])
        elif op == "or.b32":
            r = val(args[0]) | val(args[1])
        elif op == "shr.u32":
            r = val(args[0]) >> val(args[1])
        elif op == "prmt.b32":
            r = _prmt(val(args[0]), val(args[1]), val(args[2]))
        else:
            raise AssertionError(f"emulator lacks {op}")
        regs[d] = r & 0xFFFFFFFF
    return torch.stack([regs[f"${i}"] for i in range(4)], -1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_register_table_decode_all_codes(dtype, gen) -> None:
    # The GPU decoder (PTX) cannot run here; emulate it on every 16-bit half in both halves of
    # the word (all 4-code combinations) and compare with the levels rounded to `dtype`.
    h = torch.arange(1 << 16, dtype=torch.int64)
    words = h | (h[torch.randperm(1 << 16, generator=gen)] << 16)  # each half takes every value once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~50 small bitwise ops: thread start-up on a loaded CI box costs 10-50×
    try:
        out = _run_decode_asm(words, dtype)  # [n, 4] registers, 2 values each
    finally:
        torch.set_num_threads(threads)
    got = torch.stack([out & 0xFFFF, out >> 16], -1).reshape(-1, 8)  # 8 values per word, in order
    by = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], -1)
    codes = torch.stack([by >> 4, by & 0xF], -1).reshape(-1, 8)  # first value in the high nibble
    want = nf4.nf4_levels().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got, want[codes])


def test_nan_never_passes() -> None:
    ref = torch.randn(4, 8, dtype=torch.float64)
    out = ref.clone()
    out[1, 2] = float("nan")
    assert rel_err(out, ref) == float("inf")
    assert rel_err(torch.full_like(ref, float("nan")), ref) == float("inf")


def test_kernels_off_and_fp32_use_torch(monkeypatch, gen) -> None:
    layer = random_nf4(16, 64, gen=gen)
    monkeypatch.setenv("QTOOL_KERNELS", "0")
    assert kernel_dispatch.nf4_linear(layer, torch.randn(2, 64).half()) is None
    monkeypatch.delenv("QTOOL_KERNELS")
    assert qk.nf4_linear(layer, torch.randn(2, 64)) is None  # fp32 activations


# ----------------------------------------------------------------- interpreter (CPU CI)


@INTERP
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_nf4_skinny_interpreter(double_quant: bool, M: int, gen) -> None:
    # K = 576 = 9 blocks of 64 per row; N = 80: a partial N tile.
    N, K = 80, 576
    layer = random_nf4(N, K, 64, double_quant, bias=M == 3, gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(M, K, torch.float16, gen)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = qk.nf4_skinny_matmul(x, w, layer.bias, out=out)
    ref = qk.nf4_linear_ref(x, w, layer.bias)
    assert rel_err(y, ref) < TOL[torch.float16]


@INTERP
@pytest.mark.parametrize("K,block_size", [(600, 64), (301, 32), (576, 128)])
def test_nf4_skinny_unaligned_interpreter(K: int, block_size: int, gen) -> None:
    # b does not divide K: blocks straddle rows (600/64; 576/128 is SmolLM2 at b = 128);
    # K = 301 is odd, so every other row starts in the low nibble of a byte.
    N, M = 40, 3
    layer = random_nf4(N, K, block_size, True, gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(M, K, torch.float16, gen)
    y = qk.nf4_skinny_matmul(x, w, out=torch.full((M, N), float("nan"), dtype=torch.float16))
    assert rel_err(y, qk.nf4_linear_ref(x, w)) < TOL[torch.float16]


@INTERP
@pytest.mark.parametrize("block_size,block_k", [(32, 64), (256, 128)])
def test_nf4_skinny_blocks_per_tile_interpreter(block_size: int, block_k: int, gen) -> None:
    # b = 32 with 64-wide tiles: two absmax per row and tile (per-element scaling);
    # b = 256 with 128-wide tiles: one absmax spans two tiles. Split-K into a poisoned workspace.
    N, K, M = 48, 512, 2
    layer = random_nf4(N, K, block_size, True, gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(M, K, torch.float16, gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 2, "num_warps": 4}
    ws = torch.full((2, M, N), float("nan"))
    y = qk.nf4_skinny_matmul(x, w, config=cfg, workspace=ws)
    assert rel_err(y, qk.nf4_linear_ref(x, w)) < TOL[torch.float16]


@INTERP
def test_nf4_skinny_fused_split_k(gen, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split-K finished by the last program of each block: bit for bit the fp32 sum of the
    unfused path's partials in split order + bias, one rounding; counters left at 0."""
    N, K, M, split_k = 48, 512, 3, 3
    w = qk.NF4Weight.of(random_nf4(N, K, 64, True, gen=gen))
    x = _x(M, K, torch.float16, gen)
    b = torch.randn(N, generator=gen).half()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": split_k, "num_warps": 4}
    y = check_fused_split_k(lambda **kw: qk.nf4_skinny_matmul(x, w, b, config=cfg, **kw), split_k, M, N, b, 2,
                            monkeypatch)
    assert rel_err(y, qk.nf4_linear_ref(x, w, b)) < TOL[torch.float16]


@INTERP
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("N,K,block_size", [(40, 576, 64), (17, 301, 32)])
def test_nf4_dequant_interpreter(double_quant: bool, N: int, K: int, block_size: int, gen) -> None:
    layer = random_nf4(N, K, block_size, double_quant, gen=gen)
    w = qk.NF4Weight.of(layer)
    out = torch.full((N, K), float("nan"), dtype=torch.float16)
    W = qk.dequantize_nf4(w, torch.float16, out=out)
    assert W.data_ptr() == out.data_ptr()
    assert rel_err(W, qk.reference_dequantize_nf4(w)) < 1e-3
    assert rel_err(W, layer.dequantize(torch.float16)) < 1e-3


@INTERP
@pytest.mark.parametrize("M", [1, 17])  # 1: skinny kernel; 17 rows × 2 batches: dequantize + matmul
def test_nf4_dispatch_interpreter(M: int, gen) -> None:
    N, K = 48, 576
    layer = random_nf4(N, K, 64, True, bias=True, gen=gen)
    x = torch.randn(2, M, K, generator=gen).half().requires_grad_(True)
    dy = torch.randn(2, M, N, generator=gen).half()
    y = kernel_dispatch.nf4_linear(layer, x)
    assert y is not None and y.shape == (2, M, N) and y.dtype == torch.float16
    y.backward(dy)
    W64 = qk.reference_dequantize_nf4(qk.NF4Weight.of(layer))
    assert rel_err(y, x.detach().double() @ W64.T + layer.bias.double()) < TOL[torch.float16]
    assert rel_err(x.grad, dy.double() @ W64) < TOL[torch.float16]


@INTERP
def test_nf4_no_grad_matches_fallback(gen) -> None:
    layer = random_nf4(48, 576, 64, True, gen=gen)
    x = torch.randn(3, 576, generator=gen).half()
    with torch.no_grad():
        y = qk.nf4_linear(layer, x)
        fallback = layer(x.float())  # CPU: NF4Linear's own torch path
    assert rel_err(y, fallback) < TOL[torch.float16]


# ----------------------------------------------------------------- GPU (pytest -m gpu)

SHAPES = [
    (1536, 576, 64),    # SmolLM2 MLP up, default block
    (1536, 576, 128),   # 576 = 4.5 blocks of 128: straddling blocks
    (576, 1536, 256),
    (1536, 576, 32),    # two blocks per 64-wide tile
    (1000, 1000, 64),   # 1000 = 15.6 blocks; partial N tile
    (4096, 4096, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_skinny_gpu(shape, M, double_quant, dtype, gen) -> None:
    N, K, b = shape
    layer = random_nf4(N, K, b, double_quant, bias=M == 3, device="cuda", gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(M, K, dtype, gen, "cuda")
    ref = qk.nf4_linear_ref(x, w, layer.bias)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")  # used when K is not split
    y = qk.nf4_skinny_matmul(x, w, layer.bias, out=out)
    assert rel_err(y, ref) < TOL[dtype]
    # The table-load decoder (the interpreter's path) on the GPU too.
    y = qk.nf4_skinny_matmul(x, w, layer.bias, lut_in_registers=False)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_k,block_n", [(64, 64), (64, 128), (128, 64)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_skinny_configs_gpu(dtype, block_k, block_n, gen) -> None:
    # Tiles other than the defaults (b = 64 with 128-wide tiles: per-element scaling), split-K
    # partials into a poisoned workspace.
    N, K, M = 1536, 576, 1
    layer = random_nf4(N, K, 64, True, device="cuda", gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(M, K, dtype, gen, "cuda")
    cfg = {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": 3, "num_warps": 4, "num_stages": 3}
    ws = torch.full((3, M, N), float("nan"), device="cuda")
    y = qk.nf4_skinny_matmul(x, w, config=cfg, workspace=ws)
    assert rel_err(y, qk.nf4_linear_ref(x, w)) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES + [(11008, 4096, 64), (4096, 11008, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_dequant_gpu(shape, double_quant, dtype, gen) -> None:
    N, K, b = shape
    layer = random_nf4(N, K, b, double_quant, device="cuda", gen=gen)
    w = qk.NF4Weight.of(layer)
    out = torch.full((N, K), float("nan"), dtype=dtype, device="cuda")
    W = qk.dequantize_nf4(w, dtype, out=out)
    assert rel_err(W, qk.reference_dequantize_nf4(w)) < TOL[dtype] / 2


@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_dispatch_gpu(M, double_quant, dtype, gen) -> None:
    # Through NF4Linear.forward (x.is_cuda routes to qtool_kernels), with dX for QLoRA.
    N, K = 1536, 576
    layer = random_nf4(N, K, 64, double_quant, bias=True, device="cuda", gen=gen)
    W64 = qk.reference_dequantize_nf4(qk.NF4Weight.of(layer))
    x = _x(2 * M, K, dtype, gen, "cuda").reshape(2, M, K).requires_grad_(True)
    dy = _x(2 * M, N, dtype, gen, "cuda").reshape(2, M, N)
    y = layer(x)
    assert y.shape == (2, M, N) and y.dtype == dtype
    y.backward(dy)
    assert rel_err(y, x.detach().double() @ W64.T + layer.bias.double()) < TOL[dtype]
    assert rel_err(x.grad, dy.double() @ W64) < TOL[dtype]
    with torch.no_grad():
        y_kernel = layer(x)
        layer.use_kernels = False
        y_torch = layer(x)
    assert rel_err(y_kernel, y.detach()) < TOL[dtype]
    assert rel_err(y_torch, x.detach().double() @ W64.T + layer.bias.double()) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_kernels_env_off_gpu(monkeypatch, gen) -> None:
    layer = random_nf4(256, 128, device="cuda", gen=gen)

    def boom(*a, **k):
        raise AssertionError("QTOOL_KERNELS=0 must not reach qtool_kernels")

    monkeypatch.setattr(qk, "nf4_linear", boom)
    monkeypatch.setenv("QTOOL_KERNELS", "0")
    x = _x(3, 128, torch.float16, gen, "cuda")
    assert rel_err(layer(x), qk.nf4_linear_ref(x, qk.NF4Weight.of(layer))) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_autocast_gpu(gen) -> None:
    layer = random_nf4(512, 256, device="cuda", gen=gen)
    x = torch.randn(4, 256, generator=gen).cuda()  # fp32, as autocast regions receive them
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, qk.nf4_linear_ref(x.bfloat16(), qk.NF4Weight.of(layer))) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_backward_keeps_no_dense_weight_gpu(gen) -> None:
    # Between forward and backward only y is new: Ŵ (32 MB here) is not saved, and the
    # backward's transient Ŵ is freed once dX is formed.
    N, K, M = 4096, 4096, 300
    layer = random_nf4(N, K, 64, True, device="cuda", gen=gen)
    x = _x(M, K, torch.float16, gen, "cuda").requires_grad_(True)
    dy = _x(M, N, torch.float16, gen, "cuda")
    with torch.no_grad():
        layer(x)  # warm-up: cuBLAS allocates its workspace (tens of MB) on its first GEMM
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base < 2 * y.numel() * y.element_size() + 2**20
    y.backward(dy)
    del y
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base < 2 * x.numel() * x.element_size() + 2**20  # x.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_decode_cuda_graph_gpu(gen) -> None:
    # Decode is replayed from CUDA graphs: no allocation or host sync inside the call.
    layer = random_nf4(1536, 576, device="cuda", gen=gen)
    w = qk.NF4Weight.of(layer)
    x = _x(1, 576, torch.float16, gen, "cuda")
    qk.nf4_forward(x, w, None)  # warm-up: compile, tables
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = qk.nf4_forward(x, w, None)
    x.copy_(_x(1, 576, torch.float16, gen, "cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, qk.nf4_linear_ref(x, w)) < TOL[torch.float16]
