"""GPU timing that does not flatter: medians of CUDA-event timings, weights rotated out of L2.

Every timed call works on its own copy of the weights (enough copies to exceed twice the
L2 cache), so nothing is served from cache, and the copies are replayed from one CUDA
graph so that launch gaps do not count for the small cases.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

L2_BYTES = 50 * 2**20  # H100; read from the device when available


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", L2_BYTES) or L2_BYTES)


def copies_needed(nbytes: int, min_total: int | None = None, cap: int = 64) -> int:
    """How many weight copies make one rotation larger than 4× L2 (at least 2)."""
    total = min_total if min_total is not None else 4 * l2_bytes()
    return max(2, min(cap, -(-total // max(nbytes, 1))))


def median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_rotated(calls: list[Callable[[], object]], use_graph: bool = True, rep_ms: float = 200) -> float:
    """Median seconds of one call, each of `calls` touching its own buffers.

    With use_graph, the calls are captured back to back in one CUDA graph (warm-up run
    first, so compilation and lazy caches stay out of the capture) and the graph's
    replay time is divided by len(calls).
    """
    for c in calls:  # warm-up: compiles, autotunes, allocates
        c()
    torch.cuda.synchronize()
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        torch.cuda.synchronize()
        ms = median_ms(graph.replay, rep_ms=rep_ms)
        del graph
    else:
        state = {"i": 0}

        def step() -> None:
            calls[state["i"] % len(calls)]()
            state["i"] += 1

        ms = median_ms(step, rep_ms=rep_ms) * 1.0
        return ms * 1e-3
    return ms * 1e-3 / len(calls)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy, bytes read + bytes written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    s = median_ms(lambda: dst.copy_(src)) * 1e-3
    return 2 * nbytes / s
