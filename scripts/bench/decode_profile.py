"""Where a compiled, graph-replayed decode step of `qtool bench decode` spends its GPU time:
kernel time per step by kind (our GEMV, cuBLAS, inductor's fused glue, attention, the rest)
and the step's wall time, fp16 vs quantized, from torch.profiler over graph replays.

  python scripts/bench/decode_profile.py [--bits 4] [--group-size 128] [--batch 1] [--no-fuse] [--attention sdpa]

The step's wall time minus its kernel time is what the GPU spends between kernels (graph
node launch and dependency gaps); the kernel table of `qtool bench kernels` cannot show it.
Recorded in docs/benchmarks.md §Decode.
"""

from __future__ import annotations

import argparse
import collections

import torch


def kind(name: str) -> str:
    n = name.lower()
    if "gemv_kernel" in n or "gemv_h2" in n or "gemv_groups" in n or "skinny" in n:
        return "qtool GEMV/skinny"
    if "split_k" in n:
        return "qtool split-K sum"
    if any(s in n for s in ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet")):  # nvjet: cuBLAS on sm_90
        return "cuBLAS"
    # _chunk_kernel, _merge_kernel: kernels/decode_attention.py
    if any(s in n for s in ("flash", "attention", "fmha", "sdpa", "_chunk_kernel", "_merge_kernel")):
        return "attention"
    if n.startswith("triton"):
        return "inductor glue"
    return "other"


def profile(model, batch: int, max_len: int = 512, steps: int = 20) -> tuple[float, dict, dict]:
    """(wall seconds per step, {kind: seconds per step}, {kernel name: seconds per step})."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from qtool.bench.decode import captured_step

    graph, pos, caches = captured_step(model, batch, max_len)
    pos.fill_(max_len // 2 - steps)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    pos.fill_(max_len // 2 - steps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) * 1e-3 / steps
    by_name: dict = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            by_name[e.name] += e.device_time * 1e-6 / steps  # µs -> s
    by_kind: dict = collections.Counter()
    for n, t in by_name.items():
        by_kind[kind(n)] += t
    del graph, caches
    return wall, dict(by_kind), dict(by_name)


def report(label: str, wall: float, by_kind: dict, by_name: dict) -> None:
    busy = sum(by_kind.values())
    print(f"{label}: step {wall * 1e3:.3f} ms, kernels {busy * 1e3:.3f} ms, between kernels "
          f"{(wall - busy) * 1e3:.3f} ms", flush=True)
    for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {t * 1e3:7.3f} ms", flush=True)
    for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {t * 1e6:8.1f} us  {n[:110]}", flush=True)


def main() -> None:
    from qtool.bench.decode import _quantize_blocks, compile_blocks, synthetic_model
    from qtool.nn.qlinear import tile_major_layout

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--attention", default="split-kv", choices=("split-kv", "sdpa"))
    a = ap.parse_args()
    g = None if a.group_size == "ch" else int(a.group_size)
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} W{a.bits} g{a.group_size} "
          f"batch={a.batch} fused={not a.no_fuse} attention={a.attention}", flush=True)
    model = synthetic_model("synthetic-7b", a.layers, not a.no_fuse, a.attention)
    compile_blocks(model)
    report("fp16", *profile(model, a.batch))
    _quantize_blocks(model, a.bits, g)
    compile_blocks(model)
    with tile_major_layout(model):
        report(f"W{a.bits}", *profile(model, a.batch))


if __name__ == "__main__":
    main()
