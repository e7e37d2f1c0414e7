"""Registers, resident programs per SM and waves of the M = 1 GEMV's launches, compiled for
sm_90 on this machine (no GPU): one row per tuned class × layout × Llama shape.

  python scripts/bench/gemv_occupancy.py [--json PATH]

Each launch is captured from gemv_matmul itself (the config, strides and specialisation the
H100 would see; kernels/offline.py), so the row-major and tile-major paths and the [N, G]
tile-major scales that `tile_major_layout` makes are what is compiled. The register count decides how
many programs share an SM (kernels/occupancy.py); a grid slightly over the resident slots
runs a second, nearly empty wave. Run it under each Triton version that matters (the
H100's: PYTHONPATH=<triton 3.6 wheel dir>); TRITON_INTERPRET must be unset. Recorded in
docs/kernels.md §Re-tuning and §Findings v7.
"""

from __future__ import annotations

import json
import os
import sys

import torch

SHAPES = {"7B.qkvo": (4096, 4096), "7B.up": (11008, 4096), "7B.down": (4096, 11008),
          "70B.qo": (8192, 8192), "70B.up": (28672, 8192), "70B.down": (8192, 28672)}
CLASSES = [(4, 128), (4, 64), (4, None), (3, 128), (3, 64), (3, None), (2, 128), (2, 64), (2, None)]
N_SM = 132  # H100 SXM


def launches(bits: int, g: int | None, N: int, K: int, tiled: bool) -> list:
    """The GEMV launch(es) gemv_matmul makes for this layer on a 132-SM GPU."""
    import qtool_kernels.gemv as gemv
    from qtool_kernels import offline
    from qtool_kernels.tiles import groups_tile_major, tile_major

    G = 1 if g is None else -(-K // g)
    q = torch.zeros(N, K * bits // 32, dtype=torch.int32)
    s, z = torch.ones(N, G, dtype=torch.float16), torch.zeros(N, G, dtype=torch.uint8)
    x = torch.zeros(1, K, dtype=torch.float16)
    if tiled:
        tile = gemv.tile_major_tile(bits, g, N, K)
        if tile is None:
            return []
        q = tile_major(q, *tile, bits)
        s, z = groups_tile_major(s, tile[0]), groups_tile_major(z, tile[0])  # as tile_major_layout does
    gemv._num_sms = lambda device: N_SM  # what the H100 reports; the CPU's stand-in is 8
    # twice, as on the GPU: the first launch records how many programs fit on an SM (its
    # registers), the second sizes its grid with that: the steady state
    with offline.captured(gemv._gemv_kernel, gemv._gemv_groups_kernel, arch=90) as got:
        gemv.gemv_matmul(x, q, s, z, bits, g)
        gemv.gemv_matmul(x, q, s, z, bits, g)
    return got[-1:]


def main(argv: list[str]) -> None:
    import triton
    from qtool_kernels import offline
    from qtool_kernels.occupancy import resident_programs

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = []
    print(f"triton {triton.__version__}, sm_90, {N_SM} SMs")
    print(f"{'class':10} {'layout':6} {'shape':9} {'kernel':20} {'tile':>9} {'split':>5} {'regs':>4} {'spill':>5} "
          f"{'res/SM':>6} {'programs':>8} {'waves':>5} {'instr/code':>10}")
    for bits, g in CLASSES:
        for tiled in (False, True):
            for shape, (N, K) in SHAPES.items():
                for la in launches(bits, g, N, K, tiled):
                    c = offline.compile_launch(la)
                    kw = la.kwargs
                    res = resident_programs(c.regs, c.num_warps, c.shared)
                    programs = la.grid[0] * la.grid[1] * la.grid[2]
                    loop = offline.k_loop(c.sass)
                    codes = kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * c.num_warps)
                    row = dict(bits=bits, group=g, layout="tile" if tiled else "row", shape=shape, kernel=c.name,
                               BLOCK_N=kw["BLOCK_N"], BLOCK_K=kw["BLOCK_K"], SPLIT_K=kw["SPLIT_K"],
                               num_warps=c.num_warps, regs=c.regs, spill_bytes=c.spill_bytes, shared=c.shared,
                               resident_per_sm=res, programs=programs, waves=programs / (res * N_SM),
                               instr_per_code=sum(loop.values()) / codes)
                    rows.append(row)
                    print(f"W{bits} g{g or 'ch':<6} {row['layout']:6} {shape:9} {c.name:20} "
                          f"{kw['BLOCK_N']:>4}x{kw['BLOCK_K']:<4} {kw['SPLIT_K']:>5} {c.regs:>4} {c.spill_bytes:>5} "
                          f"{res:>6} {programs:>8} {row['waves']:>5.2f} {row['instr_per_code']:>10.2f}", flush=True)
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
