"""Decode attention of the 7B model (32 heads × 128, a 512-slot cache) per kernel setting:
kernels/decode_attention.py's split-KV kernels (chunk tile, chunks per SM, warps) against
SDPA over the whole cache under a mask (what the decoder ran before), in microseconds.

  python scripts/bench/attention_probe.py [--full]

Default: the shipped tiles and their neighbours, each with the merge in the chunk kernel
(ticket) and in a second kernel; --full: the tile sweep (block × chunks per SM × warps) that chose the shipped tiles.
Recorded in docs/benchmarks.md §Decode and docs/kernels.md §Findings v13.

32 caches (one per layer, 256 MB at batch 1: nothing stays in L2) are attended in turn
inside one CUDA graph, as in a decode step; the time is per call.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F


def _per_call(fn, n: int) -> float:
    from qtool.bench.timing import median_ms

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return median_ms(g.replay, rep_ms=100) * 1e3 / n


# the full sweep (two kernels, as before the ticketed merge)
FULL = [(bt, ps, nw) for bt, ps, nw in itertools.product((16, 32, 64), (2, 4, 8, 16), (2, 4, 8))
        if not (bt == 16 and nw == 8)]


def case(B: int, p: int, full: bool, H: int = 32, D: int = 128, T: int = 512, L: int = 32) -> None:
    from qtool_kernels.decode_attention import decode_attention

    caches = [(torch.randn(B, H, T, D, device="cuda", dtype=torch.float16),
               torch.randn(B, H, T, D, device="cuda", dtype=torch.float16)) for _ in range(L)]
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.float16)
    pos = torch.tensor([p], device="cuda")
    mask = torch.arange(T, device="cuda")[None, :] <= pos[:, None]
    valid = 2 * B * H * (p + 1) * D * 2

    def report(label: str, us: float) -> None:
        print(f"B={B} pos={p} {label:36s} {us:6.2f} us  {valid / us / 1e3:5.0f} GB/s of valid cache", flush=True)

    report("sdpa (masked, whole cache)", _per_call(
        lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in caches], L))
    us = _per_call(lambda: [decode_attention(q, k, v, pos) for k, v in caches], L)
    report("split-kv default", us)
    tiles = FULL if full else [(16, 8, 1), (16, 16, 2), (32, 8, 2), (64, 1, 4), (64, 2, 8), (128, 1, 4), (128, 1, 8)]
    for (bt, per_sm, nw), fused in itertools.product(tiles, (True, False)):
        us = _per_call(lambda bt=bt, ps=per_sm, nw=nw, f=fused: [
            decode_attention(q, k, v, pos, block_t=bt, per_sm=ps, num_warps=nw, fused=f) for k, v in caches], L)
        report(f"split-kv T{bt} x{per_sm}/SM w{nw}{' fused' if fused else ' 2 kernels'}", us)


def main() -> None:
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    for B, p in [(1, 255), (1, 511), (16, 255)]:
        case(B, p, "--full" in sys.argv)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
