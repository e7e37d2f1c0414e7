"""Developer sweep of the skinny kernel's tiles on the decode shapes (one GPU run).

For each bit-width, times tile/warp/stage choices and a split-K target (programs per SM)
on 70B.down (8192×28672) at M = 1, against fp16 cuBLAS and the copy bandwidth measured in
the same run; with --write the winners go to kernels/tuned_skinny.json, which
skinny.default_config reads. Then the skinny vs dequant+cuBLAS crossover in M.
Run: python -m qtool.bench.sweep [--write]
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from qtool.bench.kernels import SHAPES, bench_fp16, bench_quant
from qtool.bench.timing import copy_bandwidth

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(64, 128, 4, 3), (128, 128, 8, 4), (64, 256, 8, 4), (32, 256, 4, 4)]
PROGRAMS_PER_SM = (2, 4, 8)


def sweep_bits(shape: str, bits: int, copy_bw: float, t16: float) -> list[dict]:
    import qtool_kernels.skinny as sk

    N, K = SHAPES[shape]
    rows = []
    for (bn, bk, nw, ns), pps in itertools.product(TILES, PROGRAMS_PER_SM):
        tuned = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns, "programs_per_sm": pps}
        sk._tuned.cache_clear()
        cfg = sk.default_config(1, N, K, bits, 128, torch.cuda.get_device_properties(0).multi_processor_count)
        cfg.update({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns})
        n_tiles = -(-N // bn)
        k_tiles = -(-K // bk)
        split = 1
        while n_tiles * split < pps * 132 and k_tiles // (2 * split) >= 4 and split < 16:
            split *= 2
        cfg["SPLIT_K"] = split
        try:
            t, nbytes, _ = bench_quant(N, K, 1, bits, 128, torch.float16, config=cfg)
        except Exception as e:  # a config the compiler rejects (registers, shared memory)
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        rows.append({"shape": shape, "bits": bits, "tuned": tuned, "cfg": cfg, "us": t * 1e6,
                     "fp16_us": t16 * 1e6, "speedup": t16 / t, "copy_frac": nbytes / t / copy_bw})
        frac = nbytes / t / copy_bw
        print(f"W{bits} {cfg} pps={pps}: {t * 1e6:.1f} us x{t16 / t:.2f} {100 * frac:.0f}% copy", flush=True)
    rows.sort(key=lambda r: r["us"])
    return rows


def main(argv: list[str]) -> None:
    import qtool_kernels.skinny as sk

    out_dir = os.environ.get("OUT", ".")
    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} copy={copy_bw / 1e9:.0f} GB/s",
          flush=True)
    N, K = SHAPES["70B.down"]
    t16 = bench_fp16(N, K, 1, torch.float16)
    results: dict = {"copy_gbps": copy_bw / 1e9, "fp16_us": t16 * 1e6, "sweep": [], "crossover": []}
    tuned = {}
    for bits in (4, 2):
        rows = sweep_bits("70B.down", bits, copy_bw, t16)
        results["sweep"] += rows
        tuned[str(bits)] = rows[0]["tuned"]
        best = rows[0]
        print(f"best W{bits}: {best['us']:.1f} us x{best['speedup']:.2f} {best['tuned']}", flush=True)
    tuned["3"] = tuned["8"] = tuned["4"]
    if "--write" in argv:
        for path in (sk.TUNED_PATH, os.path.join(out_dir, "tuned_skinny.json")):
            with open(path, "w") as f:
                json.dump(tuned, f, indent=1)
        sk._tuned.cache_clear()
    for M in (16, 64, 128, 256):
        t16m = bench_fp16(N, K, M, torch.float16)
        for max_m in (0, 256):
            if M <= 16 and max_m == 0:
                continue
            t, _, path = bench_quant(N, K, M, 4, 128, torch.float16, skinny_max_m=max_m)
            results["crossover"].append({"M": M, "path": path, "us": t * 1e6, "fp16_us": t16m * 1e6})
            print(f"crossover 70B.down W4g128 M={M} {path}: {t * 1e6:.1f} us (fp16 {t16m * 1e6:.1f})",
                  flush=True)
    # Crossover: the largest M measured where the skinny kernel still beats dequant + cuBLAS.
    best_m = 16
    for M in (64, 128, 256):
        by_path = {r["path"]: r["us"] for r in results["crossover"] if r["M"] == M}
        if by_path.get("skinny", 1e9) < by_path.get("dequant+cublas", 0):
            best_m = M
    tuned["skinny_max_m"] = best_m
    print(f"skinny_max_m = {best_m}", flush=True)
    if "--write" in argv:
        for path in (sk.TUNED_PATH, os.path.join(out_dir, "tuned_skinny.json")):
            with open(path, "w") as f:
                json.dump(tuned, f, indent=1)
        sk._tuned.cache_clear()
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
