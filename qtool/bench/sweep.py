"""Developer sweep of the skinny kernel's tile sizes on the decode shapes (one device call).

Prints, per (shape, M, bits, group), the best config's time against fp16 cuBLAS and the
copy bandwidth measured in the same run; the winners feed skinny.default_config. Then
the skinny/dequant crossover in M and the large-M forward+backward ratio.
Run: python -m qtool.bench.sweep
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from qtool.bench.kernels import SHAPES, bench_fp16, bench_fwd_bwd, bench_quant
from qtool.bench.timing import copy_bandwidth

CASES = [("70B.down", 1, 4, 128), ("70B.up", 1, 4, 128), ("7B.down", 1, 4, 128), ("7B.up", 1, 4, 128),
         ("70B.down", 16, 4, 128), ("70B.down", 1, 3, 128), ("70B.down", 1, 2, 128)]


# (BLOCK_N, BLOCK_K, num_warps): about 8–16 K codes per program (64–128 per thread at
# 4 warps) keeps the unpacked tile in registers; BLOCK_N × BLOCK_K·b/8 bytes per tile.
TILES = [(32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (128, 256, 8)]


def configs(M: int, bits: int) -> list[dict]:
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    out = []
    for (bn, bk, nw), sk in itertools.product(TILES, (1, 2, 4)):
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw})
    return out


def sweep_case(shape: str, M: int, bits: int, g: int | None, copy_bw: float) -> list[dict]:
    N, K = SHAPES[shape]
    t16 = bench_fp16(N, K, M, torch.float16)
    rows = []
    for cfg in configs(M, bits):
        try:
            t, nbytes, _ = bench_quant(N, K, M, bits, g, torch.float16, skinny_max_m=64, config=cfg)
        except Exception as e:  # a config the compiler rejects (registers, shared memory)
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"shape": shape, "M": M, "bits": bits, "g": g, "cfg": cfg, "us": t * 1e6,
                     "fp16_us": t16 * 1e6, "speedup": t16 / t, "copy_frac": nbytes / t / copy_bw})
    rows.sort(key=lambda r: r["us"])
    for stages in (3, 4, 5):  # software pipelining depth, on the winner only
        cfg = dict(rows[0]["cfg"], num_stages=stages)
        try:
            t, nbytes, _ = bench_quant(N, K, M, bits, g, torch.float16, skinny_max_m=64, config=cfg)
        except Exception as e:
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"shape": shape, "M": M, "bits": bits, "g": g, "cfg": cfg, "us": t * 1e6,
                     "fp16_us": t16 * 1e6, "speedup": t16 / t, "copy_frac": nbytes / t / copy_bw})
    rows.sort(key=lambda r: r["us"])
    for r in rows[:3]:
        print(f"{shape} M={M} W{bits} g{g}: fp16 {r['fp16_us']:.1f} us; {r['us']:.1f} us "
              f"x{r['speedup']:.2f} {100 * r['copy_frac']:.0f}% copy {r['cfg']}", flush=True)
    return rows


def main(argv: list[str]) -> None:
    out_dir = os.environ.get("OUT", ".")
    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} copy={copy_bw / 1e9:.0f} GB/s",
          flush=True)
    results: dict = {"copy_gbps": copy_bw / 1e9, "sweep": [], "crossover": [], "fwd_bwd": []}
    for case in CASES:
        results["sweep"] += sweep_case(*case, copy_bw)
    for M in (16, 32, 64, 128, 256):
        N, K = SHAPES["7B.up"]
        t16 = bench_fp16(N, K, M, torch.float16)
        for max_m in (0, 64):
            t, _, path = bench_quant(N, K, M, 4, 128, torch.float16, skinny_max_m=max_m)
            results["crossover"].append({"M": M, "path": path, "us": t * 1e6, "fp16_us": t16 * 1e6})
            print(f"crossover 7B.up W4g128 M={M} {path}: {t * 1e6:.1f} us (fp16 {t16 * 1e6:.1f})", flush=True)
    for shape in ("7B.up", "70B.up"):
        N, K = SHAPES[shape]
        r = bench_fwd_bwd(N, K, 2048, 4, 128, torch.float16)
        results["fwd_bwd"].append({"shape": shape, "M": 2048, "ratio": r})
        print(f"fwd+dX {shape} M=2048 W4g128: quant/fp16 = {r:.3f}", flush=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
