"""GPU timing that does not flatter: medians of CUDA-event timings, weights rotated out of L2.

Every timed call works on its own copy of the weights (enough copies to exceed four times
the L2 cache), so nothing is served from cache, and the copies are replayed from one CUDA
graph so that launch gaps do not count for the small cases. The graph holds at least
MIN_CALLS calls (the copies repeated in turn): a replay's own launch is then shared by them.

Before each timed replay L2 is emptied by *reading* a 256 MB buffer. triton's do_bench
zeroes one instead, which leaves L2 full of dirty lines that the timed kernels then write
back to DRAM while they read: on 2026-11-24 that measured as 4.6 µs of a 53 µs GEMV on the
H100 (scripts/bench/timing_probe.py, docs/benchmarks.md §Where and how). A decode step has no such
flood of writes before its matmuls, and the copies already keep the weights out of cache.
"""

from __future__ import annotations

import statistics
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


FLUSH_BYTES = 256 * 2**20
MIN_CALLS = 16
_flush_buf: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def flush_l2() -> None:
    """Evict L2 by reading FLUSH_BYTES (clean lines: nothing to write back later)."""
    dev = torch.cuda.current_device()
    if dev not in _flush_buf:
        buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        _flush_buf[dev] = (buf, torch.empty((), dtype=torch.int32, device="cuda"))
    buf, sink = _flush_buf[dev]
    torch.amax(buf, dim=0, out=sink)


def median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds of fn over ~rep_ms of repetitions, L2 flushed (read) before each."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush_l2()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    events = []
    for _ in range(max(1, int(rep_ms / estimate))):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def capture_graph(calls: list[Callable[[], object]], rounds: int = 1, warmup: int = 1) -> torch.cuda.CUDAGraph:
    """One CUDA graph of `calls` in turn, `rounds` times, after `warmup` rounds on a side
    stream (capture needs the lazy allocations and autograd buffers to exist already)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for c in calls:
                c()
    torch.cuda.synchronize()
    return graph


def time_rotated(calls: list[Callable[[], object]], use_graph: bool = True, rep_ms: float = 200,
                 min_calls: int = MIN_CALLS) -> float:
    """Median seconds of one call, each of `calls` touching its own buffers.

    With use_graph, the calls are captured back to back in one CUDA graph, repeated in turn
    until it holds at least min_calls of them (warm-up run first, so compilation and lazy
    caches stay out of the capture), and the graph's replay time is divided by that count.
    """
    for c in calls:  # warm-up: compiles, autotunes, allocates
        c()
    torch.cuda.synchronize()
    if use_graph:
        rounds = max(1, -(-min_calls // len(calls)))
        graph = capture_graph(calls, rounds)
        ms = median_ms(graph.replay, rep_ms=rep_ms) / rounds
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
