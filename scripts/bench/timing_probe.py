"""How much of a timed decode call is the harness's? (docs/benchmarks.md §Where and how; measured
2026-11-24: docs/bench-logs/2026-11-24-h100-timing-harness-share.txt)

`time_rotated` replays a CUDA graph of the rotated weight copies (2 for a 70B layer) under
triton's do_bench, which zeroes a 256 MB buffer before every replay: each replay then starts
with a launch and with L2 full of dirty lines that are written back while the kernels read.
This times the same calls four ways, each for the quantized kernel and for cuBLAS fp16:

  graph1/zero   the shipped timing: one graph of the copies, do_bench (zero flush)
  graphR/zero   the copies repeated R times in one graph (>= MIN_CALLS calls), do_bench
  graph1/read   one graph of the copies, flushed by reading 256 MB (clean lines) instead
  graphR/none   the R-round graph replayed back to back, no flush (copies still rotate)

  python scripts/bench/timing_probe.py [--calls 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch

CASES = [  # (shape, M, bits, group)
    ("70B.down", 1, 4, 128), ("70B.down", 1, 3, 128), ("70B.down", 1, 2, 64),
    ("7B.down", 1, 4, 128), ("7B.qo", 1, 4, 128), ("70B.down", 16, 4, 128),
]


def _back_to_back(fn, reps: int = 50) -> float:
    """ms of fn replayed back to back with no flush between (total / reps)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def time_ways(calls, min_calls: int) -> dict[str, float]:
    import triton.testing

    from qtool.bench.timing import capture_graph, median_ms

    def zero_flushed(fn) -> float:  # the timing used until 2026-11-24: do_bench zeroes 256 MB before each rep
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))

    for c in calls:
        c()
    torch.cuda.synchronize()
    rounds = max(1, -(-min_calls // len(calls)))
    g1, gr = capture_graph(calls, 1), capture_graph(calls, rounds)
    n1, nr = len(calls), len(calls) * rounds
    out = {
        "graph1/zero": zero_flushed(g1.replay) * 1e3 / n1,
        "graphR/zero": zero_flushed(gr.replay) * 1e3 / nr,
        "graph1/read": median_ms(g1.replay) * 1e3 / n1,  # qtool.bench.timing's read-flush
        "graphR/none": _back_to_back(gr.replay) * 1e3 / nr,
        "calls": nr,
    }
    del g1, gr
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    import qtool_kernels as qk

    from qtool.bench.kernels import SHAPES, _layer_bytes, random_packed_layer
    from qtool.bench.timing import copies_needed
    from qtool.nn.qlinear import tile_major_layout

    res, mm = [], qk.skinny_max_m()
    for name, M, bits, g in CASES:
        N, K = SHAPES[name]
        n16 = copies_needed(N * K * 2)
        Ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(n16)]
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in Ws]
        fp16 = time_ways([lambda W=W, o=o, x=x: torch.matmul(x, W.t(), out=o) for W, o in zip(Ws, outs, strict=True)],
                         a.calls)
        del Ws, outs
        layers = [random_packed_layer(N, K, bits, g)]
        nbytes = _layer_bytes(layers[0])
        layers += [random_packed_layer(N, K, bits, g) for _ in range(copies_needed(nbytes) - 1)]
        calls = [lambda L=L, x=x, b=bits, g=g: qk.forward_packed(x, L.qweight, L.scales, L.zeros, b, g, None, mm)
                 for L in layers]
        with tile_major_layout(torch.nn.ModuleList(layers)):
            q = time_ways(calls, a.calls)
        del layers
        row = {"shape": name, "M": M, "bits": bits, "group": g, "bytes": nbytes, "quant_us": q, "fp16_us": fp16}
        res.append(row)
        print(f"{name} M={M} W{bits} g{g} ({nbytes / 1e6:.1f} MB, {q['calls']} calls per R graph)")
        for k in ("graph1/zero", "graphR/zero", "graph1/read", "graphR/none"):
            print(f"  {k:12s} quant {q[k]:7.2f} us  fp16 {fp16[k]:7.2f} us  ratio {fp16[k] / q[k]:.3f}"
                  f"  quant {nbytes / q[k] / 1e3:.0f} GB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
