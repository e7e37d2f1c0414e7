"""Where the eager fwd + dX time of one quantized layer goes: GPU kernels vs the host.

  python scripts/bench/fwd_dx_profile.py [N K M]        (default 4096 4096 2048: 7B.qo)

`qtool bench kernels` reports (quantized fwd + dX) / (fp16 fwd + dX) in wall time, eager.
At small layers both paths can be bound by the time the host takes to issue the call, and
then the ratio measures Python, not the kernels. This prints, for W4 g128 and fp16, the host
issue time, the wall time and the GPU kernels' time per call (torch.profiler), and each
path's top kernels. Recorded in docs/benchmarks.md §M = 2048.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def main(N: int, K: int, M: int) -> None:
    import qtool_kernels as qk

    from qtool.bench.kernels import random_packed_layer

    layer = random_packed_layer(N, K, 4, 128)
    W = torch.randn(N, K, device="cuda", dtype=torch.float16)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.float16)

    def quant() -> None:
        qk.quant_linear(layer, x).backward(dy)

    def dense() -> None:
        F.linear(x, W).backward(dy)

    print(f"{torch.cuda.get_device_name()} torch={torch.__version__} N={N} K={K} M={M}")
    for name, fn in (("W4 g128", quant), ("fp16", dense)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        issue = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 50
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        gpu = sum(e.device_time_total for e in p.key_averages()) / 10
        print(f"{name}: host issue {issue * 1e6:.0f} us/call, wall {wall * 1e6:.0f} us/call, "
              f"GPU kernels {gpu:.0f} us/call")
        print(p.key_averages().table(sort_by="device_time_total", row_limit=6, max_name_column_width=60))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("fwd_dx_profile.py needs a CUDA GPU")
    main(*(int(a) for a in sys.argv[1:4])) if len(sys.argv) >= 4 else main(4096, 4096, 2048)
