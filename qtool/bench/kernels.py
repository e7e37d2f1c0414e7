"""`qtool bench kernels`: packed-weight matmul vs fp16 cuBLAS, both measured in the same run.

`bits_list` may hold "nf4": NF4Linear's kernels (block 64, double-quantized constants).

Convention: a shape N×K is a Linear with N outputs and K inputs (W is [N, K], y = x Wᵀ),
the way Llama's weights are stored (SHAPES names each one). The weight bandwidth counts
the bytes a kernel must read at least once (packed codes + scales + zeros, or NF4 codes +
8-bit absmax + their scales; the fp16 weight for the baseline) over the median time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from qtool_kernels.gemv import gemv_path

from qtool.bench.timing import capture_graph, copies_needed, copy_bandwidth, time_rotated
from qtool.nn.qlinear import tile_major_layout

# (N out, K in). Llama-2-7B: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008;
# Llama-3-70B: q/o 8192×8192, gate/up 28672×8192, down 8192×28672.
SHAPES: dict[str, tuple[int, int]] = {
    "7B.qo": (4096, 4096),
    "7B.up": (11008, 4096),
    "7B.down": (4096, 11008),
    "70B.qo": (8192, 8192),
    "70B.up": (28672, 8192),
    "70B.down": (8192, 28672),
}
DEFAULT_MS = (1, 4, 16, 64, 256, 2048)
DEFAULT_BITS = (2, 3, 4)
DEFAULT_GROUPS: tuple[int | None, ...] = (64, 128, None)
NF4 = "nf4"  # in bits_list: NF4Linear's kernels (QLoRA's block 64, double-quantized constants)
NF4_BLOCK = 64


@dataclass
class KernelRow:
    shape: str
    N: int
    K: int
    M: int
    bits: int | str  # or "nf4"
    group_size: int | None  # the absmax block size for nf4
    dtype: str
    path: str  # "gemv", "gemv_h2" (packed half2), "skinny" or "dequant+cublas"; "/tile": tile-major codes
    quant_us: float
    fp16_us: float
    speedup: float  # fp16 time / quantized time
    weight_bytes: int
    weight_gbps: float
    copy_frac: float  # weight_gbps / device-to-device copy bandwidth
    fwd_bwd_ratio: float | None = None  # (quant fwd + dX) / (fp16 fwd + dX), large M only, eager
    fwd_bwd_graph_ratio: float | None = None  # the same, each replayed from a CUDA graph (GPU time)


@dataclass
class KernelReport:
    gpu: str
    torch: str
    triton: str
    copy_gbps: float
    rows: list[KernelRow]

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "torch": self.torch, "triton": self.triton,
                "copy_gbps": self.copy_gbps, "rows": [asdict(r) for r in self.rows]}


def random_packed_layer(N: int, K: int, bits: int, group_size: int | None, device: str = "cuda"):
    """A QuantLinear with random codes, scales and zeros (never zeros: they time too well)."""
    from qtool.nn.qlinear import QuantLinear

    layer = QuantLinear(K, N, bits, group_size, device=device)
    layer.qweight.random_(-(2**31), 2**31 - 1)
    layer.scales.uniform_(0.5e-2, 2e-2)
    layer.zeros.random_(0, 2**bits)
    return layer


def random_nf4_layer(N: int, K: int, block_size: int = NF4_BLOCK, device: str = "cuda"):
    """An NF4Linear with random codes and double-quantized constants (absmax ≈ 0.02 ± 0.01)."""
    from qtool.nn.nf4linear import NF4Linear

    layer = NF4Linear(K, N, block_size, double_quant=True, device=device)
    layer.nf4_codes.random_(0, 256)
    layer.absmax_q.random_(0, 256)
    layer.absmax_scale.fill_(0.01)
    layer.absmax_mean.fill_(0.02)
    return layer


def _layer_bytes(layer) -> int:
    """Weight bytes a kernel must read: every stored tensor but the bias."""
    return sum(t.numel() * t.element_size() for name, t in layer.named_buffers() if name not in ("bias", "perm"))


def bench_fp16(N: int, K: int, M: int, dtype: torch.dtype) -> float:
    """Seconds of x · Wᵀ through torch (cuBLAS), weights rotated out of L2."""
    n = copies_needed(N * K * 2)
    Ws = [torch.randn(N, K, device="cuda", dtype=dtype) for _ in range(n)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    outs = [torch.empty(M, N, device="cuda", dtype=dtype) for _ in range(n)]
    calls = [lambda W=W, o=o: torch.matmul(x, W.t(), out=o) for W, o in zip(Ws, outs, strict=True)]
    t = time_rotated(calls, use_graph=M <= 256)
    del Ws, outs
    return t


def bench_quant(N: int, K: int, M: int, bits: int, group_size: int | None, dtype: torch.dtype,
                skinny_max_m: int | None = None, config: dict | None = None,
                tile_major: bool = False) -> tuple[float, int, str]:
    """(seconds, weight bytes, path) of the kernel path, weights rotated out of L2.

    tile_major: the codes stored as decode stores them (qtool.nn.qlinear.tile_major_layout)
    when the class has a measured tile-major tile; the path then ends in "/tile"."""
    import qtool_kernels as qk

    if bits == NF4:
        return bench_nf4(N, K, M, group_size or NF4_BLOCK, dtype, skinny_max_m)
    layers = [random_packed_layer(N, K, bits, group_size)]
    nbytes = _layer_bytes(layers[0])
    layers += [random_packed_layer(N, K, bits, group_size) for _ in range(copies_needed(nbytes) - 1)]
    tile = qk.tile_major_tile(bits, group_size, N, K) if tile_major and config is None else None
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    max_m = qk.skinny_max_m() if skinny_max_m is None else skinny_max_m
    path = "skinny" if M <= max_m else "dequant+cublas"
    if path == "skinny" and config is None and M <= qk.gemv_max_m():
        path = "gemv"
    if config is not None and path == "skinny":
        calls = [lambda L=L: qk.skinny_matmul(x, L.qweight, L.scales, L.zeros, bits, group_size,
                                              config=config) for L in layers]
    else:
        calls = [lambda L=L: qk.forward_packed(x, L.qweight, L.scales, L.zeros, bits, group_size, None, max_m)
                 for L in layers]
    # the layers' buffers are swapped in place; the calls read them when they run
    with tile_major_layout(torch.nn.ModuleList(layers)) if tile is not None else contextlib.nullcontext():
        t = time_rotated(calls, use_graph=M <= 256)
        if path == "gemv" and gemv_path(x, layers[0].qweight, bits, group_size) == "h2":
            path = "gemv_h2"
    del layers
    return t, nbytes, path + ("/tile" if tile is not None else "")


def bench_nf4(N: int, K: int, M: int, block_size: int, dtype: torch.dtype,
              skinny_max_m: int | None = None) -> tuple[float, int, str]:
    """(seconds, weight bytes, path) of NF4Linear's kernel path, weights rotated out of L2."""
    import qtool_kernels as qk

    layers = [random_nf4_layer(N, K, block_size)]
    nbytes = _layer_bytes(layers[0])
    layers += [random_nf4_layer(N, K, block_size) for _ in range(copies_needed(nbytes) - 1)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    max_m = qk.NF4_SKINNY_MAX_M if skinny_max_m is None else skinny_max_m
    path = "skinny" if M <= max_m else "dequant+cublas"
    ws = [qk.NF4Weight.of(L) for L in layers]
    calls = [lambda w=w: qk.nf4_forward(x, w, None, max_m) for w in ws]
    t = time_rotated(calls, use_graph=M <= 256)
    del layers, ws
    return t, nbytes, path


def bench_fwd_bwd(N: int, K: int, M: int, bits: int | str, group_size: int | None,
                  dtype: torch.dtype) -> tuple[float, float]:
    """(quantized fwd + dX) / (fp16 fwd + dX) time, frozen weights (the LoRA-on-int-base case):
    (eager, graph). Eager counts what an eager training loop waits for, the host's Python and
    launches included (they bound small layers); graph replays each from a CUDA graph, which
    leaves the GPU's time."""
    import qtool_kernels as qk

    if bits == NF4:
        layer, fwd = random_nf4_layer(N, K, group_size or NF4_BLOCK), qk.nf4_linear
    else:
        layer, fwd = random_packed_layer(N, K, bits, group_size), qk.quant_linear
    W = torch.randn(N, K, device="cuda", dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)

    def quant() -> None:
        fwd(layer, x).backward(dy)

    def dense() -> None:
        F.linear(x, W).backward(dy)

    tq = time_rotated([quant], use_graph=False)
    td = time_rotated([dense], use_graph=False)
    gq = time_rotated([capture_graph([quant], warmup=3).replay], use_graph=False)
    gd = time_rotated([capture_graph([dense], warmup=3).replay], use_graph=False)
    return tq / td, gq / gd


def run(
    shapes: list[str] | None = None,
    Ms: tuple[int, ...] = DEFAULT_MS,
    bits_list: tuple[int | str, ...] = DEFAULT_BITS,
    groups: tuple[int | None, ...] = DEFAULT_GROUPS,
    dtype: torch.dtype = torch.float16,
    fwd_bwd_min_m: int = 2048,
    progress=None,
    tile_major: bool = True,
) -> KernelReport:
    import triton

    if not torch.cuda.is_available():
        from qtool.errors import QtoolError

        raise QtoolError("`qtool bench kernels` needs a CUDA GPU")
    copy_bw = copy_bandwidth()
    rows: list[KernelRow] = []
    for name in shapes or list(SHAPES):
        N, K = SHAPES[name]
        for M in Ms:
            t16 = bench_fp16(N, K, M, dtype)
            for bits in bits_list:
                for g in ((NF4_BLOCK,) if bits == NF4 else groups):
                    tq, nbytes, path = bench_quant(N, K, M, bits, g, dtype, tile_major=tile_major)
                    ratio = graph_ratio = None
                    if M >= fwd_bwd_min_m:
                        ratio, graph_ratio = bench_fwd_bwd(N, K, M, bits, g, dtype)
                    gbps = nbytes / tq / 1e9
                    row = KernelRow(name, N, K, M, bits, g, str(dtype).removeprefix("torch."), path,
                                    tq * 1e6, t16 * 1e6, t16 / tq, nbytes, gbps, gbps * 1e9 / copy_bw, ratio,
                                    graph_ratio)
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return KernelReport(torch.cuda.get_device_name(), torch.__version__, triton.__version__,
                        copy_bw / 1e9, rows)


def fmt_group(g: int | None) -> str:
    return "ch" if g is None else str(g)


def fmt_opt(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.3f}"
