"""A few launches of one decode kernel, to profile under Nsight Compute (docs/kernels.md §Re-tuning;
its 2026-11-23 profiles: §Findings v15, docs/bench-logs/2026-11-23-h100-ncu-*.txt).

  ncu --kernel-name regex:"_skinny_kernel|_gemv_h2_kernel" --launch-skip 3 --launch-count 1 \
      python scripts/bench/kernel_profile.py 70B.down 16 4 128 BLOCK_N=128 DEQUANT=1 SPLIT_K=12

Arguments: shape name, M, bits, group ("ch" = per channel), then tuned-entry keys that override
the shipped one for this class (the skinny entry at M > 1, the h2 "H2" dict at M = 1). One
tile-major layer with random codes, fp16 x; four calls (the first compiles).
"""
from __future__ import annotations

import copy
import sys

import qtool_kernels as qk
import qtool_kernels.gemv as gv
import qtool_kernels.skinny as sk
import torch

from qtool.bench.kernels import random_packed_layer
from qtool.nn.qlinear import tile_major_layout

SHAPES = {"70B.down": (8192, 28672), "70B.up": (28672, 8192), "7B.down": (4096, 11008)}


def main(argv: list[str]) -> None:
    name, M, bits, g = argv[1], int(argv[2]), int(argv[3]), (None if argv[4] == "ch" else int(argv[4]))
    kv = dict(a.split("=") for a in argv[5:])
    kv = {k: (v == "1" if k in ("DEQUANT", "PAIRS") else int(v)) for k, v in kv.items()}
    N, K = SHAPES[name]
    t = copy.deepcopy(sk._tuned())
    key = f"{bits}:{g or 'pc'}"
    if M > 1 and kv:
        e = dict(t.get(str(bits), {}), **t.get("skinny", {}).get(key, {}))
        e.pop("large", None)
        e.update(kv)
        t["skinny"][key] = e
    elif kv:
        e = t["gemv_tiled"][key + ":1"]
        large = e.get("large")
        h2 = (large if large and N * K >= large["min_codes"] and "H2" in large else e)["H2"]
        h2.update(kv)
    sk._tuned = gv._tuned = lambda: t
    L = random_packed_layer(N, K, bits, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    fn = qk.gemv_matmul if M == 1 else qk.skinny_matmul
    with tile_major_layout(torch.nn.ModuleList([L])):
        for _ in range(4):
            fn(x, L.qweight, L.scales, L.zeros, bits, g)
        torch.cuda.synchronize()
    print("done", name, M, bits, g, kv)


if __name__ == "__main__":
    main(sys.argv)
