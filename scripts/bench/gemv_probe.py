"""Candidate tuned entries for the decode kernels, timed through the path decode runs.

What it measures: µs of the M = 1 half2 GEMV or the M ≤ 16 skinny kernel on rotated,
tile-major random layers (`tile_major_layout`, the default config with one candidate entry
swapped into kernels/tuned_skinny.json, the split sized by the compiled kernel's residency),
next to fp16 cuBLAS and the copy rate from the same run; skinny candidates are checked
against float64 first. Timing as in `qtool bench kernels`. Recorded in docs/kernels.md
§Re-tuning (how to use it) and §Findings (what it found); raw outputs in docs/bench-logs/.

  python scripts/bench/gemv_probe.py h2        M = 1: H2_CANDIDATES per class against the shipped entry;
                                               --only=3:128,2:64: those classes; --quick: W4 g128 on
                                               70B.down and 7B.down; --set=NAME: one of H2_SETS
  python scripts/bench/gemv_probe.py splits    M = 16: skinny tiles × SPLIT_K (SPLITS16); --m1: the M = 1
                                               half2 GEMV × SPLIT_K (--more: more classes and splits);
                                               --tiles: TILES16 at the default split; --g128: W4 g128
                                               tiles × splits on the 70B layers; --entries: whole W4
                                               g128 skinny entries (ENTRIES16) at M = 16 and 4; --g64:
                                               ENTRIES64; --quick: 70B.down only
  python scripts/bench/gemv_probe.py skinny16  M = 16: SKINNY16_CANDIDATES per class; --more: other
                                               classes; --w4: more W4 g128 tiles

Needs a CUDA GPU. fp16 x, random codes.
"""

from __future__ import annotations

import sys

import torch


def _rotated_layers(N: int, K: int, bits: int, g: int | None) -> tuple[list, int]:
    """Enough random packed layers to rotate out of L2, and one layer's weight bytes."""
    from qtool.bench.kernels import _layer_bytes, random_packed_layer
    from qtool.bench.timing import copies_needed

    L0 = random_packed_layer(N, K, bits, g)
    nb = _layer_bytes(L0)
    return [L0] + [random_packed_layer(N, K, bits, g) for _ in range(copies_needed(nb) - 1)], nb


def _time_tile_layers(N: int, K: int, bits: int, g: int | None, configs: dict, M: int = 1) -> tuple[dict, float]:
    """{label: seconds} of forward_packed (M rows) on rotated layers inside tile_major_layout
    (what decode runs), one config per label (None: the shipped default); and the weight bytes."""
    import qtool_kernels as qk

    from qtool.bench.timing import time_rotated
    from qtool.nn.qlinear import tile_major_layout

    Ls, nb = _rotated_layers(N, K, bits, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    out = {}
    with tile_major_layout(torch.nn.ModuleList(Ls)):
        fn = qk.gemv_matmul if M == 1 else qk.skinny_matmul
        for label, cfg in configs.items():
            calls = [lambda L=L, cfg=cfg: fn(x, L.qweight, L.scales, L.zeros, bits, g, config=cfg) for L in Ls]
            try:
                out[label] = time_rotated(calls, rep_ms=40)
            except Exception as e:  # a config the compiler rejects
                print(f"  {label}: skipped ({type(e).__name__}: {str(e)[:80]})", flush=True)
    del Ls
    torch.cuda.empty_cache()
    return out, nb


def _steady(N: int, K: int, bits: int, g: int | None, M: int = 1) -> tuple[float | None, float, dict]:
    """Time of the decode path on rotated tile-major layers under the tuned table installed now:
    a first timing's launches record each kernel's residency, the second (returned, None if
    the compiler rejected the config) has its grids sized by it; the weight bytes; {kernel:
    resident programs per SM}."""
    from qtool_kernels import occupancy

    occupancy._RESIDENT.clear()
    times, nb = _time_tile_layers(N, K, bits, g, {"warm": None, "t": None}, M=M)
    return times.get("t"), nb, {k[0]: v for k, v in occupancy._RESIDENT.items()}


def _speed(t: float, t16: float, nb: float, bw: float) -> str:
    return f"{t * 1e6:6.1f} us ({t16 / t:.2f}x fp16 {t16 * 1e6:.1f}, {nb / t / bw * 100:3.0f}% copy)"


DECODE_SHAPES = {"70B.down": (8192, 28672), "7B.down": (4096, 11008), "7B.up": (11008, 4096), "7B.qo": (4096, 4096)}


ROWS_SHAPES = {**DECODE_SHAPES, "70B.qo": (8192, 8192), "70B.up": (28672, 8192)}


SKINNY16_CANDIDATES = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages, programs_per_sm); 2 warps or fewer:
    # Triton lowers tl.dot to mma.sync (MMAv2) with the unpacked tile fed from registers; 4 and 8 warps:
    # wgmma, the tile through shared memory (counted in the sm_90 SASS, docs/kernels.md §v10)
    (64, 128, 4, 3, 8), (64, 128, 4, 4, 8), (128, 128, 4, 3, 8), (128, 128, 8, 3, 8), (64, 64, 4, 3, 8),
    (64, 128, 2, 3, 16), (64, 128, 2, 4, 16), (32, 128, 2, 3, 16), (32, 128, 2, 4, 16), (64, 64, 2, 3, 16),
    (32, 128, 1, 3, 32), (16, 128, 1, 3, 32), (32, 64, 1, 3, 32),
]


def skinny16(quick: bool, more: bool = False, w4: bool = False) -> None:
    """Candidate skinny tiles (tuned_skinny.json's "skinny" class entries) at M = 16 through
    the path decode runs (tile_major_layout, default config, split sized by the compiled residency).
    --more: the other classes, with the candidates that led on W4 g128; --w4: more W4 g128 tiles."""
    import copy

    import qtool_kernels.skinny as sk
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = sk._tuned
    M = 16
    shapes = ("70B.down", "7B.qo") if quick else ("70B.down", "7B.down", "7B.qo")
    classes = [(4, 128), (2, 64)]
    cands = SKINNY16_CANDIDATES
    if more:  # the other classes, with the candidates that led on W4 g128
        shapes, classes = ("70B.down", "7B.down"), [(3, 128), (4, None), (4, 64), (3, 64), (2, 128)]
        cands = [(64, 128, 4, 3, 8), (32, 128, 2, 3, 16), (16, 128, 1, 3, 32), (64, 128, 2, 3, 16)]
    if w4:  # around the shipped W4 g128 tile: mma.sync with 4 warps (BLOCK_N 32 < wgmma's 64), K, stages
        shapes, classes = ("70B.down", "7B.down", "7B.qo"), [(4, 128)]
        cands = [(32, 128, 4, 3, 8), (32, 256, 2, 3, 16), (32, 128, 2, 2, 16), (16, 256, 1, 3, 32),
                 (32, 128, 1, 3, 32), (16, 128, 2, 3, 16), (32, 64, 2, 4, 16), (32, 256, 4, 3, 8)]
    try:
        for name in shapes:
            N, K = DECODE_SHAPES[name]
            t16 = bench_fp16(N, K, M, torch.float16)
            for bits, g in classes:
                key = f"{bits}:{g or 'pc'}"
                for cand in [None, *cands]:
                    tuned = copy.deepcopy(shipped())
                    if cand is not None:
                        bn, bk, nw, ns, pps = cand
                        tuned.setdefault("skinny", {})[key] = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw,
                                                               "num_stages": ns, "programs_per_sm": pps}
                    sk._tuned = lambda t=tuned: t
                    e = dict(tuned.get(str(bits), {}), **tuned.get("skinny", {}).get(key, {}))
                    label = (f"{e.get('BLOCK_N', 64)}x{e.get('BLOCK_K', 128)} w{e.get('num_warps', 4)} "
                             f"st{e.get('num_stages', 3)} pps{e.get('programs_per_sm', 8)}")
                    t, nb, res = _steady(N, K, bits, g, M)
                    err = _skinny_error(N, K, bits, g, M)
                    if t is not None:
                        print(f"{name} M{M} W{bits} g{g} {label:24s}{' shipped' if cand is None else '        '}: "
                              f"{_speed(t, t16, nb, bw)} resident/SM={res.get('skinny', '?')} err={err:.1e}",
                              flush=True)
    finally:
        sk._tuned = shipped


def _skinny_error(N: int, K: int, bits: int, g: int | None, M: int) -> float:
    """‖y − ref‖/‖ref‖ of the skinny kernel (current tuned entry) on one tile-major layer against
    the float64 reference: a candidate tile must compute the same product before its time counts."""
    import qtool_kernels as qk
    from qtool_kernels.skinny import reference_skinny

    from qtool.bench.kernels import random_packed_layer
    from qtool.nn.qlinear import tile_major_layout

    L = random_packed_layer(N, K, bits, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    with tile_major_layout(torch.nn.ModuleList([L])):
        y = qk.skinny_matmul(x, L.qweight, L.scales, L.zeros, bits, g).double()
    ref = reference_skinny(x, L.qweight, L.scales, L.zeros, bits, g)  # row-major again
    return float((y - ref).norm() / ref.norm())


H2_CANDIDATES = {  # (BLOCK_N, BLOCK_K, num_warps, programs_per_sm, STAGES); the tile is the layout's too
    # quads-first tiles ([NQ, BLOCK_N, 4]: a thread holds 64·BLOCK_N / (rows per warp · threads) rows);
    # first timed 2026-11-23 (docs/bench-logs/2026-11-23-h100-h2-quads-first-6be287d.txt)
    (4, 128): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (32, 128, 1, 32, 1)],
    (4, None): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1)],
    (2, 64): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 2, 16, 1)],
    (2, 128): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 2, 16, 1)],
    (2, None): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 2, 16, 1)],
    (4, 64): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1)],
    # W3 (units of 12 words: a thread holds 2 rows with 128 × 128 / 2 warps and 64 × 128 / 1 warp)
    (3, 128): [(128, 128, 2, 16, 1), (128, 128, 4, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1),
               (128, 256, 4, 16, 1)],
    (3, 64): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1)],
    (3, None): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1)],
}
_PF128 = {"PREFETCH": 1, "maxnreg": 128}
# `--set=NAME` times these instead; a 6th element holds more "H2" keys (maxnreg: ptxas's cap,
# for more programs per SM)
H2_SETS = {
    # register caps, 8 warps, STAGES 2 for W3 (one row per thread won first:
    # docs/bench-logs/2026-11-23-h100-h2-w3-tiles-d9144d9.txt); refuted, see docs/kernels.md §Findings v12
    "caps": {
        (3, 128): [(128, 128, 4, 16, 1), (128, 128, 4, 16, 1, {"maxnreg": 48}), (128, 128, 4, 16, 1, {"maxnreg": 40}),
                   (256, 128, 8, 8, 1), (128, 128, 4, 16, 2), (64, 128, 2, 32, 1, {"maxnreg": 48})],
        (3, 64): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1, {"maxnreg": 48})],
        (4, 128): [(64, 128, 8, 8, 1), (64, 128, 4, 16, 1, {"maxnreg": 40}), (128, 128, 8, 8, 1)],
    },
    # (the L2 bulk prefetch and cache-hint sets measured on 2026-11-23 were removed with their
    # code: docs/kernels.md §Findings v12)
    # W2 with one row per thread or wider K tiles (W3's lesson); W3 g64 on the 128-row tile
    "w2-rows": {
        (2, 64): [(128, 128, 8, 8, 1), (256, 128, 8, 8, 1), (128, 256, 4, 16, 1), (128, 256, 8, 8, 1)],
        (2, 128): [(128, 128, 8, 8, 1), (128, 256, 8, 8, 1)],
        (3, 64): [(128, 128, 4, 16, 1), (256, 128, 8, 8, 1)],
    },
    # after the scale left the K loop (W2 g64 loop 668 -> 540 instructions per tile) and scales
    # were read one tile ahead: tiles again
    "tiles": {
        (2, 64): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1),
                  (64, 128, 1, 32, 1)],
        (2, 128): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1),
                   (64, 128, 1, 32, 1)],
        (3, 128): [(128, 128, 2, 16, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1), (64, 128, 1, 32, 1),
                   (64, 128, 2, 32, 1)],
        (4, 128): [(64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 8, 8, 1)],
        (3, 64): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1)],
    },
    # ptxas places loads by register pressure: at 80 registers W2 g128's fourth row
    # of words was read a third of the way into the trip (a second exposed latency). Register
    # caps (maxnreg raises ptxas's budget) and the next tile's words read during this one
    "maxnreg": {
        cls: [(*tile, more) for more in ({"maxnreg": 96}, {"maxnreg": 128}, {"PREFETCH": 1},
                                         {"PREFETCH": 1, "maxnreg": 128}, {"PREFETCH": 1, "maxnreg": 168})]
        for cls, tile in (((2, 64), (128, 128, 2, 16, 1)), ((2, 128), (128, 128, 2, 16, 1)),
                          ((2, None), (64, 128, 2, 32, 1)), ((3, 128), (128, 128, 4, 16, 1)),
                          ((4, 128), (64, 128, 4, 16, 1)))
    },
    # around the "maxnreg" set's best (maxnreg 128 + PREFETCH): tiles, caps between (what ships)
    "maxnreg-tiles": {
        (3, 128): [(128, 256, 4, 16, 1), (128, 256, 4, 16, 1, {"PREFETCH": 1}), (128, 256, 4, 16, 1, _PF128),
                   (128, 128, 4, 16, 1, dict(_PF128, maxnreg=112)), (128, 128, 4, 16, 1, dict(_PF128, maxnreg=144)),
                   (256, 128, 8, 8, 1, _PF128), (128, 128, 2, 16, 1, _PF128), (64, 128, 2, 32, 1, _PF128)],
        (2, 64): [(128, 256, 4, 16, 1, _PF128), (128, 128, 2, 16, 1, dict(_PF128, maxnreg=112)),
                  (128, 128, 2, 16, 1, {"maxnreg": 112}), (64, 128, 2, 32, 1, _PF128)],
        (2, 128): [(128, 256, 4, 16, 1, _PF128), (128, 128, 2, 16, 1, dict(_PF128, maxnreg=112)),
                   (64, 128, 2, 32, 1, _PF128)],
        (3, 64): [(128, 128, 4, 16, 1, _PF128), (128, 128, 4, 16, 1, {"PREFETCH": 1})],
    },
}


def h2(quick: bool, only: tuple[str, ...] = (), cand_set: str | None = None) -> None:
    """The packed-half2 kernel on tile-major codes (fused split-K, one-wave grid from
    its residency) against the shipped fp32 entry, each candidate as the class's "gemv_tiled"
    entry with "H2": true, through tile_major_layout + forward_packed's route (what decode runs)."""
    import copy

    import qtool_kernels.gemv as gemv
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = gemv._tuned
    shapes = ("70B.down", "7B.down") if quick else ("70B.down", "70B.up", "7B.down", "7B.up", "7B.qo")
    try:
        for name in shapes:
            N, K = ROWS_SHAPES[name]
            t16 = bench_fp16(N, K, 1, torch.float16)
            for (bits, g), cands in (H2_SETS[cand_set] if cand_set else H2_CANDIDATES).items():
                key = f"{bits}:{g or 'pc'}"
                if (only and key not in only) or (quick and (bits, g) != (4, 128)):
                    continue
                if (bits, g) != (4, 128) and name not in ("70B.down", "7B.down", *(("70B.up",) if cand_set else ())):
                    continue
                for cand in [None, *cands]:
                    tuned = copy.deepcopy(shipped())
                    if cand is not None:
                        bn, bk, nw, pps, st, *more = cand
                        tuned["gemv_tiled"][key + ":1"] = {
                            "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": 2, "programs_per_sm": pps,
                            "SPAN_GROUPS": g is not None and bk > g, "min_k_tiles": 2, "STAGES": st,
                            "H2": dict(more[0]) if more else True}
                    gemv._tuned = lambda t=tuned: t
                    if gemv.tile_major_tile(bits, g, N, K) is None:
                        continue
                    e = gemv._tiled_entry(bits, g, N, K)
                    if isinstance(e.get("H2"), dict):  # the settings the half2 kernel runs with
                        e.update(e["H2"])
                    label = (f"{'h2 ' if e.get('H2') else 'fp32'} {e['BLOCK_N']}x{e['BLOCK_K']} w{e['num_warps']} "
                             f"pps{e['programs_per_sm']} st{e.get('STAGES', 1)}"
                             + (f" r{e['maxnreg']}" if e.get("maxnreg") else "")
                             + (" pf" if e.get("PREFETCH") else ""))
                    t, nb, res = _steady(N, K, bits, g)
                    if t is not None:
                        print(f"{name} W{bits} g{g or 'ch'} {label:30s}{' shipped' if cand is None else '        '}: "
                              f"{_speed(t, t16, nb, bw)} resident/SM={res}", flush=True)
    finally:
        gemv._tuned = shipped


SPLIT_SHAPES = dict(DECODE_SHAPES, **{"70B.up": (28672, 8192)})

# (shape, M, class, [(BLOCK_N, DEQUANT, num_stages)]): the M = 16 split sweep
SPLITS16 = [(name, 16, (4, 128), [(256, True, 3), (128, True, 3), (32, False, 3)]) for name in ("70B.down", "70B.up")]
SPLITS16 += [(name, 16, (4, 64), [(128, True, 3), (256, True, 3), (256, True, 2)]) for name in ("70B.down", "70B.up")]
SPLITS16 += [(name, 16, (4, None), [(64, False, 3), (128, False, 3), (256, True, 3)])
             for name in ("70B.down", "70B.up")]
SPLITS16 += [(name, 16, (4, 128), [(32, False, 3), (64, False, 3)]) for name in ("7B.down", "7B.up")]
# (BLOCK_N, DEQUANT, num_stages, more keys): W4 g128 tiles after the scale loads of one group per tile took
# the per-word shape of two (§v15: 192 -> 146 registers at 128 x 128)
TILES16 = [(128, True, 3, {}), (128, True, 3, {"maxnreg": 128}), (256, True, 3, {}), (256, True, 2, {}),
           (64, True, 3, {}), (32, False, 3, {})]


# W4 g128 after the two-group-shaped scale loads: tiles × splits on the 70B layers
SPLITS16_G128 = [(name, 16, (4, 128), [(128, True, 3), (256, True, 3), (64, True, 3)])
                 for name in ("70B.down", "70B.up")]


# whole "skinny" 4:128 entries: the one shipped before 68a0da2 (32x128+large256), 128-row DEQUANT
# tiles for every layer or the large ones, split capped at 8 (as before) or 16 (one wave decides)
_E = {"BLOCK_K": 128, "num_warps": 2, "num_stages": 3, "programs_per_sm": 16}
ENTRIES16 = {"128dq/16": dict(_E, BLOCK_N=128, DEQUANT=True, max_split=16),
             "128dq/8": dict(_E, BLOCK_N=128, DEQUANT=True),
             "64dq/16": dict(_E, BLOCK_N=64, DEQUANT=True, max_split=16),
             "32x128+large256": dict(_E, BLOCK_N=32, large={"min_codes": 1 << 27, "BLOCK_N": 256, "DEQUANT": True}),
             # programs_per_sm caps the one-wave grid below the compiled residency (7)
             "128dq/pps6+large16": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=6,
                                        large={"min_codes": 1 << 27, "max_split": 16}),
             "128dq/pps6+large256/pps4": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=6,
                                              large={"min_codes": 1 << 27, "BLOCK_N": 256, "programs_per_sm": 4}),
             "128dq/pps5+large16": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=5,
                                        large={"min_codes": 1 << 27, "max_split": 16})}


# W4 g64 (128 x 128, 2 warps) after the integer-built constants took its registers from 128 to 148
ENTRIES64 = {"st3": dict(_E, BLOCK_N=128), "st2": dict(_E, BLOCK_N=128, num_stages=2),
             "st3/r136": dict(_E, BLOCK_N=128, maxnreg=136), "st3/r128": dict(_E, BLOCK_N=128, maxnreg=128)}


def splits(quick: bool, m1: bool = False, tiles: bool = False, g128: bool = False, entries: bool = False,
           g64: bool = False) -> None:
    """Time against split-K, the shipped path otherwise (tile-major layers, rotated).
    M = 16 (skinny): candidate tiles × SPLIT_K; the shipped rule caps the split at 8, which left
    70B.down's 256-row tile 256 programs for 528 slots (2 of 4 per SM). --m1: the M = 1 h2 GEMV
    of W4 g128, W3 g128 and W2 g64 on 70B.down and 70B.up × SPLIT_K. --tiles: W4 g128 at M = 16,
    TILES16 on 70B.down, 70B.up and 7B.down, default split only. Each line checks the product
    against float64 (skinny) first. --quick: 70B.down W4 g128 only."""
    import copy

    import qtool_kernels.gemv as gv
    import qtool_kernels.skinny as sk
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = sk._tuned
    if m1:
        classes = ((4, 128), (3, 128), (2, 64)) + (((2, 128), (2, None)) if "--more" in sys.argv else ())
        runs = [(name, 1, cls, [None]) for name in ("70B.down", "70B.up") for cls in classes]
        sks = ([None, 8, 10, 12, 14, 16, 19, 20, 23, 24, 28, 32] if "--more" in sys.argv
               else [None, 8, 12, 16, 24, 32, 48])
    elif g64:
        runs = [(name, M, (4, 64), list(ENTRIES64)) for M in (16, 4) for name in ("70B.down", "70B.up", "7B.down")]
        sks = [None]
    elif entries:
        runs = [(name, M, (4, 128), ["32x128+large256", *list(ENTRIES16)[4:]]) for M in (16, 4)
                for name in ("70B.down", "70B.up", "7B.down", "7B.up", "7B.qo")[:1 if quick else 5]]
        sks = [None]
    elif g128:
        runs = SPLITS16_G128
        sks = [None, 2, 4, 6, 10, 12, 16]
    elif tiles:
        runs = [(name, 16, (4, 128), TILES16) for name in ("70B.down", "70B.up", "7B.down")[:1 if quick else 3]]
        sks = [None]
    else:
        runs = SPLITS16[:1] if quick else SPLITS16
        sks = [None, 8, 12, 16, 24, 32]
    try:
        for name, M, (bits, g), tiles in runs:
            N, K = SPLIT_SHAPES[name]
            t16 = bench_fp16(N, K, M, torch.float16)
            key = f"{bits}:{g or 'pc'}"
            configs = {}
            for tile in tiles:
                for split in sks:
                    tuned = copy.deepcopy(shipped())
                    if isinstance(tile, str):  # a whole entry by name
                        if tile != "shipped":
                            tuned["skinny"][key] = copy.deepcopy({**ENTRIES16, **ENTRIES64}[tile])
                        label = tile
                    elif M == 1:
                        e = tuned["gemv_tiled"][key + ":1"]
                        large = e.get("large")
                        h2 = (large if large and N * K >= large["min_codes"] and "H2" in large else e)["H2"]
                        if split:
                            h2["SPLIT_K"] = split
                        label = f"h2 split={split or 'default'}"
                    else:
                        bn, dq, st, *more = tile
                        more = more[0] if more else {}
                        e = dict(tuned.get(str(bits), {}), **tuned.get("skinny", {}).get(key, {}))
                        e.pop("large", None)
                        e.update(BLOCK_N=bn, DEQUANT=dq, num_stages=st, **more)
                        if split:
                            e["SPLIT_K"] = split
                        tuned.setdefault("skinny", {})[key] = e
                        label = f"{bn}x128 dq={int(dq)} st{st} split={split or 'default'} {more or ''}"
                    configs[label] = tuned
            _time_splits(name, M, bits, g, configs, t16, bw)
    finally:
        sk._tuned = gv._tuned = shipped


def _time_splits(name: str, M: int, bits: int, g: int | None, configs: dict, t16: float, bw: float) -> None:
    """Print the time of each {label: tuned table} on one set of rotated tile-major layers."""
    import qtool_kernels as qk
    import qtool_kernels.gemv as gv
    import qtool_kernels.skinny as sk
    from qtool_kernels import occupancy

    from qtool.bench.timing import time_rotated
    from qtool.nn.qlinear import tile_major_layout

    N, K = SPLIT_SHAPES[name]
    Ls, nb = _rotated_layers(N, K, bits, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    fn = qk.gemv_matmul if M == 1 else qk.skinny_matmul
    L = Ls[0]
    ref = sk.reference_skinny(x, L.qweight, L.scales, L.zeros, bits, g) if M > 1 else None  # row-major
    with tile_major_layout(torch.nn.ModuleList(Ls)):
        for label, tuned in configs.items():
            sk._tuned = gv._tuned = lambda t=tuned: t
            occupancy._RESIDENT.clear()  # keyed by shape, not config: each candidate records its own
            err = float("nan")
            if ref is not None:
                err = float((fn(x, L.qweight, L.scales, L.zeros, bits, g).double() - ref).norm() / ref.norm())
            try:
                t = time_rotated([lambda L=L: fn(x, L.qweight, L.scales, L.zeros, bits, g) for L in Ls], rep_ms=40)
            except Exception as exc:  # a config the compiler rejects
                print(f"  {label}: skipped ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
                continue
            res = {k[0]: v for k, v in occupancy._RESIDENT.items()}
            n_sm = torch.cuda.get_device_properties(0).multi_processor_count
            split = sk.default_config(M, N, K, bits, g, n_sm, res.get("skinny"))["SPLIT_K"] if M > 1 else "?"
            print(f"{name} M{M} W{bits} g{g or 'ch'} {label:32s}: {_speed(t, t16, nb, bw)} resident/SM={res} "
                  f"split={split} err={err:.1e}", flush=True)
    del Ls
    torch.cuda.empty_cache()


if __name__ == "__main__":
    modes = ("h2", "splits", "skinny16")
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: python scripts/bench/gemv_probe.py {{{'|'.join(modes)}}} [options] (see the docstring)")
    flag = lambda name: f"--{name}" in sys.argv  # noqa: E731
    if sys.argv[1] == "h2":
        only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")]
        sets = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--set=")]
        h2(flag("quick"), tuple(only[0].split(",")) if only else (), sets[0] if sets else None)
    elif sys.argv[1] == "splits":
        splits(*(flag(a) for a in ("quick", "m1", "tiles", "g128", "entries", "g64")))
    else:
        skinny16(flag("quick"), flag("more"), flag("w4"))
