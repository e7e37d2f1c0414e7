"""Two probes of what bounds the M = 1 GEMV on the H100 (session 5, docs/kernels.md §v5).

  python scripts/gemv_probe.py layout    the same kernel, bytes and codes on the 70B.down matrix
                                         [8192, 28672] as stored vs viewed as [8192·28672/Kp, Kp]
                                         (Kp = 4096, 1024, 128: each program's rows lie next to
                                         each other in memory): does contiguity of a program's
                                         reads set the speed?
  python scripts/gemv_probe.py tiled     session 6: row-major vs tile-major (kernels/tiles.py) weights,
                                         same kernel and tiles, on the target shapes; tile sweep.
  python scripts/gemv_probe.py refactor  session 6: the row-major GEMV of 6c29dc8 (before the block/tile
                                         strides) vs now vs tile-major, same configs, one run (W4/W2:
                                         the old file imports today's _unpack, whose 3-bit loader changed).
  python scripts/gemv_probe.py waves     session 7: grid size vs resident slots. Per class and shape, the same
                                         kernel with (a) session 6's doubling split-K and [N, G] scales,
                                         (b) doubling split, tile-major scales (session 6's probe), (c) the
                                         shipped default (one-wave split from the compiled kernel's registers,
                                         tile-major scales), (d/e) row-major codes, doubling vs shipped.
  python scripts/gemv_probe.py pc        per channel (no group scales, any BLOCK_K): long runs per
                                         row (BLOCK_K up to 1024 codes) and few rows per program
                                         in the stored layout (this sweep set the pc tiles).

  python scripts/gemv_probe.py rows      session 9: candidate "gemv_tiled" entries through the shipped
                                         tile-major path (tile_major_layout, default config, split sized by
                                         the compiled kernel's residency): rows per thread (fewer warps or
                                         more rows per program), then the pipelined K loop (STAGES);
                                         --only=3:128,...: those classes.
  python scripts/gemv_probe.py skinny16  session 10: candidate skinny tiles at M = 16 through the same path
                                         (mma.sync with ≤ 2 warps vs wgmma with 4/8, BLOCK_N, stages);
                                         --more: the other classes; --w4: more W4 g128 tiles.
  python scripts/gemv_probe.py pairs     session 10: x read in pairs (X_PAIRS) on and off, per shipped class.
  python scripts/gemv_probe.py pdl       session 13: programmatic dependent launch (QTOOL_PDL 0/1/2/3/5) on the
                                         7B layers (fused qkv and gate_up too) and 70B.down; --quick: W4 g128.
  python scripts/gemv_probe.py pairs4    session 14: the skinny kernel's W4 tile in register pairs (PAIRS,
                                         _unpack.pairs4_tile) on and off at M = 16 (and 4), shipped tile and
                                         larger candidates;
                                         --quick: W4 g128 only.
  python scripts/gemv_probe.py splits    session 15: time against SPLIT_K at M = 16 (skinny tiles) or, with
                                         --m1, at M = 1 (h2 GEMV), through the decode path; --tiles: W4 g128
                                         tiles at M = 16, default split; --g128: W4 g128 tiles × splits
                                         on the 70B layers; --entries: whole W4 g128 skinny entries
                                         (ENTRIES16) at M = 16 and 4; --g64: W4 g64 entries (ENTRIES64);
                                         --quick: 70B.down.
  python scripts/gemv_probe.py h2        session 11: the packed-half2 GEMV (gemv_h2.py) on tile-major codes,
                                         candidate tiles/warps/stages against the shipped fp32 kernel, through
                                         the decode path; --quick: 70B.down and 7B.down, W4 g128 only;
                                         --only=4:128,...: those classes.

Timing as in qtool bench kernels (rotated weights, CUDA graph, median), fp16 x, random codes.
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


def _time_row_major(layers: list, K: int, bits: int, g: int | None, overrides: dict) -> tuple[float, dict, object]:
    """(seconds, config, x) of the GEMV on the layers' stored codes with default_gemv_config + overrides."""
    import qtool_kernels as qk
    from qtool_kernels.gemv import default_gemv_config

    from qtool.bench.timing import time_rotated

    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    cfg = default_gemv_config(1, layers[0].out_features, K, bits, g, n_sm, overrides)
    t = time_rotated([lambda L=L: qk.gemv_matmul(x, L.qweight, L.scales, L.zeros, bits, g, config=cfg)
                      for L in layers], rep_ms=40)
    return t, cfg, x


def _time(N: int, K: int, bits: int, g: int | None, overrides: dict) -> tuple[float, float, dict]:
    layers, nb = _rotated_layers(N, K, bits, g)
    t, cfg, _ = _time_row_major(layers, K, bits, g, overrides)
    del layers
    torch.cuda.empty_cache()
    return t, nb, cfg


def _time_tiled(N: int, K: int, bits: int, g: int | None, ov: dict, tiled_scales: bool = True
                ) -> tuple[float, float, float, dict]:
    """(row-major s, tile-major s, bytes, config): the same config, weights as stored vs tile-major."""
    import qtool_kernels as qk
    from qtool_kernels.tiles import groups_tile_major, tile_major

    from qtool.bench.timing import time_rotated

    layers, nb = _rotated_layers(N, K, bits, g)
    t_row, cfg, x = _time_row_major(layers, K, bits, g, ov)
    BN, BK = cfg["BLOCK_N"], cfg["BLOCK_K"]
    tl_ = []
    for L in layers:
        q = tile_major(L.qweight, BN, BK, bits)
        s, z = L.scales, L.zeros
        if tiled_scales:
            s, z = groups_tile_major(s, BN), groups_tile_major(z, BN)
        tl_.append((q, s, z))
    del layers
    t_tile = time_rotated([lambda q=q, s=s, z=z: qk.gemv_matmul(x, q, s, z, bits, g, config=cfg)
                           for q, s, z in tl_], rep_ms=40)
    del tl_
    torch.cuda.empty_cache()
    return t_row, t_tile, nb, cfg


def tiled(quick: bool) -> None:
    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={__import__('triton').__version__} "
          f"copy={copy_bw / 1e9:.0f} GB/s", flush=True)
    shapes = {"70B.down": (8192, 28672), "7B.down": (4096, 11008), "70B.up": (28672, 8192), "7B.up": (11008, 4096)}
    if quick:
        shapes = {k: shapes[k] for k in ("70B.down", "7B.down")}
    t16 = {k: bench_fp16(N, K, 1, torch.float16) for k, (N, K) in shapes.items()}
    print("fp16 " + " ".join(f"{k}={v * 1e6:.1f}us" for k, v in t16.items()), flush=True)

    def c(bn, bk, nw, pps, span=False):
        return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "programs_per_sm": pps, "SPAN_GROUPS": span}

    classes = {
        (4, 128): [{}, c(64, 128, 4, 8), c(32, 128, 4, 8), c(32, 128, 2, 16), c(16, 128, 2, 16), c(128, 128, 8, 4),
                   c(32, 256, 4, 8, True), c(16, 512, 2, 16, True), c(64, 128, 4, 4), c(64, 128, 4, 16)],
        (4, None): [{}, c(64, 128, 4, 8), c(32, 256, 4, 8), c(16, 512, 2, 16), c(64, 256, 4, 8)],
        (2, 64): [{}, c(64, 64, 4, 8), c(64, 128, 4, 8, True), c(32, 256, 4, 8, True), c(128, 64, 4, 8)],
        (3, 128): [{}, c(64, 128, 4, 8), c(32, 128, 4, 8), c(32, 256, 4, 8, True), c(16, 128, 2, 16)],
        (2, 128): [{}, c(64, 128, 4, 8), c(128, 128, 4, 8), c(32, 256, 4, 8, True)],
        (3, 64): [{}, c(64, 64, 4, 8), c(32, 128, 4, 8, True), c(64, 128, 4, 8, True)],
        (4, 64): [{}, c(64, 64, 4, 8), c(64, 128, 4, 8, True), c(32, 128, 4, 8, True)],
    }
    for name, (N, K) in shapes.items():
        for (bits, g), cfgs in classes.items():
            for ov in cfgs:
                try:
                    tr, tt, nb, cfg = _time_tiled(N, K, bits, g, ov)
                except Exception as e:  # a tile that does not divide the shape
                    print(f"{name} W{bits} g{g or 'ch'} {ov}: skipped ({type(e).__name__}: {e})", flush=True)
                    continue
                print(f"{name} W{bits} g{g or 'ch'} BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{cfg['num_warps']} "
                      f"split{cfg['SPLIT_K']}{' default' if not ov else ''}: row {tr * 1e6:6.1f} us "
                      f"({t16[name] / tr:.2f}x, {nb / tr / copy_bw * 100:3.0f}%)  tile {tt * 1e6:6.1f} us "
                      f"({t16[name] / tt:.2f}x, {nb / tt / copy_bw * 100:3.0f}%)", flush=True)


def refactor() -> None:
    import importlib.util
    import pathlib
    import subprocess
    import tempfile

    import qtool_kernels as qk

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth, time_rotated

    src = subprocess.run(["git", "show", "6c29dc8:kernels/gemv.py"], capture_output=True, text=True, check=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "gemv_6c29dc8.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("gemv_6c29dc8", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={__import__('triton').__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    base = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    for N, K in [(8192, 28672), (4096, 11008)]:
        t16 = bench_fp16(N, K, 1, torch.float16)
        for bits, g, sk in [(4, 128, 8), (4, 128, 16), (4, None, 16), (2, 128, 16)]:
            cfg = dict(base, SPLIT_K=sk)
            Ls, nb = _rotated_layers(N, K, bits, g)
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            def timed(fn, qws, x=x, Ls=Ls, bits=bits, g=g, cfg=cfg) -> float:
                return time_rotated([lambda q=q, L=L: fn(x, q, L.scales, L.zeros, bits, g, config=cfg)
                                     for q, L in zip(qws, Ls, strict=True)], rep_ms=40)

            t_old = timed(old.gemv_matmul, [L.qweight for L in Ls])
            t_new = timed(qk.gemv_matmul, [L.qweight for L in Ls])
            qts = [qk.tile_major(L.qweight, 64, 128, bits) for L in Ls]
            t_tile = timed(qk.gemv_matmul, qts)
            print(f"{N}x{K} W{bits} g{g or 'ch'} split{sk}: fp16 {t16 * 1e6:.1f}  6c29dc8 {t_old * 1e6:.1f}  "
                  f"now {t_new * 1e6:.1f}  tile-major {t_tile * 1e6:.1f} us ({t16 / t_tile:.2f}x, "
                  f"{nb / t_tile / bw * 100:.0f}% copy)", flush=True)
            del Ls, qts
            torch.cuda.empty_cache()


def _doubling_split(n_tiles: int, k_tiles: int, target: int, cap: int = 16) -> int:
    """Session 6's split-K rule: double until n_tiles · split ≥ target (it overshoots up to 2×)."""
    split = 1
    while n_tiles * split < target and k_tiles // (2 * split) >= 4 and split < cap:
        split *= 2
    return split


def _launched_split(fn) -> int:
    """SPLIT_K of the GEMV launch that fn() makes (timing runs it; this reads its config)."""
    import qtool_kernels.gemv as gemv

    seen = []
    saved = {k: k.run for k in (gemv._gemv_kernel, gemv._gemv_groups_kernel)}

    def spy(kernel):
        def run(*args, **kwargs):
            seen.append(kwargs["SPLIT_K"])
            return saved[kernel](*args, **kwargs)
        return run

    for k in saved:
        k.run = spy(k)
    try:
        fn()
    finally:
        for k, run in saved.items():
            k.run = run
    return seen[-1]


def waves(quick: bool) -> None:
    import qtool_kernels as qk
    import qtool_kernels.gemv as gemv
    import triton
    from qtool_kernels.tiles import groups_tile_major, tile_major

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth, time_rotated

    bw = copy_bandwidth()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s sms={n_sm}", flush=True)
    shapes = {"70B.down": (8192, 28672), "7B.down": (4096, 11008), "70B.up": (28672, 8192), "7B.up": (11008, 4096)}
    classes = [(4, 128), (4, None), (3, 128), (2, 64), (2, 128), (4, 64)]
    if quick:
        shapes = {k: shapes[k] for k in ("70B.down", "7B.down")}
        classes = classes[:4]
    for name, (N, K) in shapes.items():
        t16 = bench_fp16(N, K, 1, torch.float16)
        for bits, g in classes:
            tile = qk.tile_major_tile(bits, g, N, K)
            if tile is None:
                continue
            Ls, nb = _rotated_layers(N, K, bits, g)
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            fixed = {"BLOCK_N": tile[0], "BLOCK_K": tile[1], "SPAN_GROUPS": g is not None and tile[1] > g}
            tile_cfg = gemv.default_gemv_config(1, N, K, bits, g, n_sm, fixed, tiled=True)
            row_cfg = gemv.default_gemv_config(1, N, K, bits, g, n_sm)
            # session 6's grids: the doubling rule at the then-tuned programs per SM (row W4 g128: 4)
            pps_row = 4 if (bits, g) == (4, 128) else gemv._tuned()["gemv"].get(f"{bits}:{g or 'pc'}:1", {}).get(
                "programs_per_sm", 8)
            old_tile = dict(tile_cfg, SPLIT_K=_doubling_split(N // tile[0], K // tile[1], 8 * n_sm))
            old_row = dict(row_cfg, SPLIT_K=_doubling_split(triton.cdiv(N, row_cfg["BLOCK_N"]),
                                                            triton.cdiv(K, row_cfg["BLOCK_K"]), pps_row * n_sm))
            qt = [tile_major(L.qweight, *tile, bits) for L in Ls]
            s3 = [(groups_tile_major(L.scales, tile[0]), groups_tile_major(L.zeros, tile[0])) for L in Ls]
            row_groups = [(L.scales, L.zeros) for L in Ls]
            runs = {
                "tile, [N,G] scales, doubling": ([(q, s, z) for q, (s, z) in zip(qt, row_groups, strict=True)],
                                                 old_tile),
                "tile, tile scales, doubling": ([(q, s, z) for q, (s, z) in zip(qt, s3, strict=True)], old_tile),
                "tile, tile scales, shipped": ([(q, s, z) for q, (s, z) in zip(qt, s3, strict=True)], None),
                "row, doubling": ([(L.qweight, L.scales, L.zeros) for L in Ls], old_row),
                "row, shipped": ([(L.qweight, L.scales, L.zeros) for L in Ls], None),
            }
            for label, (ws, cfg) in runs.items():
                calls = [lambda q=q, s=s, z=z, cfg=cfg, x=x, b=bits, g=g: qk.gemv_matmul(x, q, s, z, b, g, config=cfg)
                         for q, s, z in ws]
                t = time_rotated(calls, rep_ms=40)  # its warm-up records the kernel's residency
                split = _launched_split(calls[0])
                bn = tile[0] if ws[0][0].dim() == 4 else row_cfg["BLOCK_N"]
                print(f"{name} W{bits} g{g or 'ch'} {label:29}: {t * 1e6:6.1f} us ({t16 / t:.2f}x fp16 "
                      f"{t16 * 1e6:.1f} us, {nb / t / bw * 100:3.0f}% copy) split={split} "
                      f"programs={triton.cdiv(N, bn) * split}", flush=True)
            del Ls, qt, s3
            torch.cuda.empty_cache()


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


def split(quick: bool) -> None:
    """Session 8: the M = 1 tile-major GEMV's time against its split-K (programs in the grid),
    tile-major scales, fused split-K: is one wave of resident programs the right grid?"""
    import qtool_kernels as qk
    import qtool_kernels.gemv as gemv
    import triton
    from qtool_kernels import occupancy

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s sms={n_sm}", flush=True)
    for name, (N, K) in DECODE_SHAPES.items():
        t16 = bench_fp16(N, K, 1, torch.float16)
        for bits, g in [(4, 128), (3, 128), (2, 64), (4, None)]:
            tile = qk.tile_major_tile(bits, g, N, K)
            if tile is None:
                continue
            fixed = {"BLOCK_N": tile[0], "BLOCK_K": tile[1], "SPAN_GROUPS": g is not None and tile[1] > g}
            base = gemv.default_gemv_config(1, N, K, bits, g, n_sm, fixed, tiled=True)
            k_tiles = K // tile[1]
            cfgs = {"shipped": None}
            cfgs.update({f"split {s}": dict(base, SPLIT_K=s) for s in (1, 2, 4, 8, 16, 32, 64) if k_tiles // s >= 2})
            times, nb = _time_tile_layers(N, K, bits, g, cfgs)
            res = [v for k, v in occupancy._RESIDENT.items() if k[0] == "gemv" and k[2][0] == N // tile[0]]
            for label, t in times.items():
                print(f"{name} W{bits} g{g or 'ch'} {label:9s}: {t * 1e6:6.1f} us ({t16 / t:.2f}x fp16 "
                      f"{t16 * 1e6:.1f}, {nb / t / bw * 100:3.0f}% copy) n_blocks={N // tile[0]} "
                      f"resident/SM={res[-1] if res else '?'}", flush=True)


def skinny(quick: bool) -> None:
    """Session 8: M = 16 skinny kernel, row-major vs tile-major (scales tile-major or copied per
    call, as before this session), stages and split-K around the shipped default."""
    import qtool_kernels as qk
    import qtool_kernels.skinny as sk
    import triton
    from qtool_kernels import occupancy
    from qtool_kernels.tiles import groups_row_major

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth, time_rotated
    from qtool.nn.qlinear import tile_major_layout

    bw = copy_bandwidth()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s sms={n_sm}", flush=True)
    M = 16
    for name, (N, K) in DECODE_SHAPES.items():
        t16 = bench_fp16(N, K, M, torch.float16)
        for bits, g in [(4, 128)] if quick else [(4, 128), (3, 128), (2, 64)]:
            Ls, nb = _rotated_layers(N, K, bits, g)
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            row = time_rotated([lambda L=L, x=x, b=bits, g=g: qk.skinny_matmul(x, L.qweight, L.scales, L.zeros, b, g)
                                for L in Ls], rep_ms=40)
            sig = ("skinny", x.dtype, tuple(Ls[0].qweight.shape), bits, g, 2, False, M)
            shipped = sk.default_config(M, N, K, bits, g, n_sm, occupancy.recorded(sig))
            print(f"{name} M{M} W{bits} g{g or 'ch'} row shipped {shipped}: {row * 1e6:6.1f} us "
                  f"({t16 / row:.2f}x fp16 {t16 * 1e6:.1f}, {nb / row / bw * 100:3.0f}% copy)", flush=True)
            del Ls
            torch.cuda.empty_cache()
            tile = qk.tile_major_tile(bits, g, N, K)
            if tile is None:
                continue
            cfgs = {"tile shipped": None}
            base = dict(shipped, BLOCK_N=tile[0])
            for st in (2, 3, 4):
                for mul in (1, 2, 4):
                    if K // base["BLOCK_K"] // (base["SPLIT_K"] * mul) >= 2:
                        cfgs[f"tile st{st} split{base['SPLIT_K'] * mul}"] = dict(base, num_stages=st,
                                                                                SPLIT_K=base["SPLIT_K"] * mul)
            times, _ = _time_tile_layers(N, K, bits, g, cfgs, M=M)
            Ls, _ = _rotated_layers(N, K, bits, g)
            with tile_major_layout(torch.nn.ModuleList(Ls)):  # before this session: scales copied per call
                times["tile, scales copied per call"] = time_rotated(
                    [lambda L=L, x=x, b=bits, g=g: qk.skinny_matmul(
                        x, L.qweight, groups_row_major(L.scales), groups_row_major(L.zeros), b, g) for L in Ls],
                    rep_ms=40)
            del Ls
            torch.cuda.empty_cache()
            for label, t in times.items():
                print(f"{name} M{M} W{bits} g{g or 'ch'} {label:28s}: {t * 1e6:6.1f} us ({t16 / t:.2f}x, "
                      f"{nb / t / bw * 100:3.0f}% copy)", flush=True)


ROWS_SHAPES = {**DECODE_SHAPES, "70B.qo": (8192, 8192), "70B.up": (28672, 8192)}
ROWS_CANDIDATES = {  # (BLOCK_N, BLOCK_K, num_warps, programs_per_sm, SPAN_GROUPS, STAGES)
    # call A (docs/bench-logs/session9/A_rows.txt): more rows per thread, no pipelining
    (4, 128): [(64, 128, 2, 32, False, 1), (128, 128, 4, 16, False, 1), (128, 128, 2, 16, False, 1),
               (64, 128, 1, 32, False, 1), (256, 128, 4, 8, False, 1),
               # call B (B_rows_stages.txt): the pipelined K loop
               (64, 128, 4, 16, False, 2), (64, 128, 4, 16, False, 3), (64, 128, 4, 16, False, 4),
               (64, 128, 2, 32, False, 3), (32, 128, 4, 16, False, 3)],
    (4, None): [(64, 128, 2, 32, False, 1), (128, 128, 4, 16, False, 1), (128, 128, 2, 16, False, 1),
                (64, 128, 1, 32, False, 1),
                (64, 128, 4, 16, False, 2), (64, 128, 4, 16, False, 3), (64, 128, 2, 32, False, 3)],
    (4, 64): [(64, 128, 2, 32, True, 1), (128, 128, 4, 16, True, 1), (128, 128, 2, 16, True, 1),
              (64, 128, 2, 32, True, 3), (64, 128, 4, 16, True, 3)],
    (2, 64): [(64, 128, 2, 32, True, 1), (128, 128, 4, 16, True, 1), (64, 256, 2, 32, True, 1),
              (128, 128, 2, 16, True, 1), (64, 128, 2, 32, True, 3), (32, 256, 4, 16, True, 3)],
    (3, 128): [(64, 128, 2, 32, False, 1), (128, 128, 4, 16, False, 1),
               (64, 128, 4, 16, False, 2), (64, 128, 4, 16, False, 3),
               # session 10 (aligned fields, x pairs): 2 rows per thread shares x between them
               (128, 128, 2, 16, False, 1), (64, 256, 4, 16, False, 1)],
}


def rows(quick: bool, only: tuple[str, ...] = ()) -> None:
    """Session 9: candidate "gemv_tiled" entries against the shipped one, through the path decode
    runs (tile_major_layout + default config + residency-sized split)."""
    import copy

    import qtool_kernels.gemv as gemv
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = gemv._tuned
    shapes = {k: ROWS_SHAPES[k] for k in ("70B.down", "7B.qo")} if quick else ROWS_SHAPES
    try:
        for name, (N, K) in shapes.items():
            t16 = bench_fp16(N, K, 1, torch.float16)
            for (bits, g), cands in ROWS_CANDIDATES.items():
                if only and f"{bits}:{g or 'pc'}" not in only:
                    continue
                if (bits, g) != (4, 128) and name not in ("70B.down", "7B.down"):
                    continue  # W4 g128 (the targets' class) on every shape, the others on two
                key = f"{bits}:{g or 'pc'}:1"
                for cand in [None, *cands]:
                    tuned = copy.deepcopy(shipped())
                    if cand is not None:
                        bn, bk, nw, pps, span, st = cand
                        tuned["gemv_tiled"][key] = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": 2,
                                                    "programs_per_sm": pps, "SPAN_GROUPS": span, "min_k_tiles": 2,
                                                    "STAGES": st}
                    gemv._tuned = lambda t=tuned: t
                    if gemv.tile_major_tile(bits, g, N, K) is None:
                        continue
                    e = tuned["gemv_tiled"][key]
                    label = (f"{e['BLOCK_N']}x{e['BLOCK_K']} w{e['num_warps']} pps{e['programs_per_sm']} "
                             f"st{e.get('STAGES', 1)}")
                    t, nb, res = _steady(N, K, bits, g)
                    if t is not None:
                        print(f"{name} W{bits} g{g or 'ch'} {label:26s}{' shipped' if cand is None else '        '}: "
                              f"{_speed(t, t16, nb, bw)} resident/SM={res.get('gemv', '?')}", flush=True)
    finally:
        gemv._tuned = shipped


SKINNY16_CANDIDATES = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages, programs_per_sm); 2 warps or fewer:
    # Triton lowers tl.dot to mma.sync (MMAv2) with the unpacked tile fed from registers; 4 and 8 warps:
    # wgmma, the tile through shared memory (counted in the sm_90 SASS, docs/kernels.md §v10)
    (64, 128, 4, 3, 8), (64, 128, 4, 4, 8), (128, 128, 4, 3, 8), (128, 128, 8, 3, 8), (64, 64, 4, 3, 8),
    (64, 128, 2, 3, 16), (64, 128, 2, 4, 16), (32, 128, 2, 3, 16), (32, 128, 2, 4, 16), (64, 64, 2, 3, 16),
    (32, 128, 1, 3, 32), (16, 128, 1, 3, 32), (32, 64, 1, 3, 32),
]


def skinny16(quick: bool, more: bool = False, w4: bool = False) -> None:
    """Session 10: candidate skinny tiles (tuned_skinny.json's "skinny" class entries) at M = 16 through
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
    if more:  # the classes call B did not time, with its best candidates
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


def pairs(quick: bool) -> None:
    """Session 10: x read two elements per 32-bit load (X_PAIRS) against one per load, per class,
    through the shipped tile-major path (each tuned entry with X_PAIRS flipped, same run)."""
    import copy

    import qtool_kernels.gemv as gemv
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = gemv._tuned
    shapes = ("70B.down", "7B.qo") if quick else ("70B.down", "7B.down", "7B.up", "7B.qo")
    try:
        for name in shapes:
            N, K = DECODE_SHAPES[name]
            t16 = bench_fp16(N, K, 1, torch.float16)
            for bits, g in [(4, 128), (3, 128), (2, 64), (4, None), (3, 64), (4, 64)]:
                key = f"{bits}:{g or 'pc'}:1"
                if gemv.tile_major_tile(bits, g, N, K) is None:
                    continue
                for flip in (False, True):
                    tuned = copy.deepcopy(shipped())
                    e = tuned["gemv_tiled"][key]
                    large = e.get("large") if N * K >= e.get("large", {}).get("min_codes", 1 << 62) else None
                    stages = (large or {}).get("STAGES", e.get("STAGES", 1))
                    on = (large or {}).get("X_PAIRS", e.get("X_PAIRS", True)) != flip
                    e["X_PAIRS"] = on
                    if large:
                        large["X_PAIRS"] = on
                    gemv._tuned = lambda t=tuned: t
                    t, nb, _ = _steady(N, K, bits, g)
                    if t is not None:
                        print(f"{name} W{bits} g{g or 'ch'} STAGES {stages} X_PAIRS {on!s:5}"
                              f"{'        ' if flip else ' shipped'}: {_speed(t, t16, nb, bw)}", flush=True)
    finally:
        gemv._tuned = shipped


H2_CANDIDATES = {  # (BLOCK_N, BLOCK_K, num_warps, programs_per_sm, STAGES); the tile is the layout's too
    # call A/B (session 11: docs/bench-logs/session11/A_h2_w4g128.txt, B_h2_other.txt): rows-first tiles;
    # call D: quads-first tiles ([NQ, BLOCK_N, 4], a thread holds 64·BLOCK_N / (rows per warp · threads) rows)
    (4, 128): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (32, 128, 1, 32, 1)],
    (4, None): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1)],
    (2, 64): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 2, 16, 1)],
    (2, 128): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 2, 16, 1)],
    (2, None): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 128, 2, 16, 1)],  # call F
    (4, 64): [(64, 128, 4, 16, 1), (64, 128, 2, 32, 1)],
    # session 12: W3 (units of 12 words: a thread holds 2 rows with 128 × 128 / 2 warps and 64 × 128 / 1 warp)
    (3, 128): [(128, 128, 2, 16, 1), (128, 128, 4, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1),
               (128, 256, 4, 16, 1)],
    (3, 64): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1)],
    (3, None): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1), (64, 128, 2, 32, 1)],
}
_PF128 = {"PREFETCH": 1, "maxnreg": 128}
# `--set=NAME` times these instead; a 6th element holds more "H2" keys (maxnreg: ptxas's cap,
# for more programs per SM)
H2_SETS = {
    # session 12 call B: after call A (docs/bench-logs/session12/A_w3.txt) one row per thread won
    "B": {
        (3, 128): [(128, 128, 4, 16, 1), (128, 128, 4, 16, 1, {"maxnreg": 48}), (128, 128, 4, 16, 1, {"maxnreg": 40}),
                   (256, 128, 8, 8, 1), (128, 128, 4, 16, 2), (64, 128, 2, 32, 1, {"maxnreg": 48})],
        (3, 64): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1, {"maxnreg": 48})],
        (4, 128): [(64, 128, 8, 8, 1), (64, 128, 4, 16, 1, {"maxnreg": 40}), (128, 128, 8, 8, 1)],
    },
    # call C: tiles requested into L2 ahead by one thread (cp.async.bulk.prefetch of 1, 2, 4
    # tiles; removed after: docs/bench-logs/session12/C_prefetch.txt)
    # call F: cache hints on the weight loads, .cg and evict_first (removed after: F_cache_hints.txt)
    # call G: W2 with one row per thread or wider K tiles (W3's lesson); W3 g64 on the 128-row tile
    "G": {
        (2, 64): [(128, 128, 8, 8, 1), (256, 128, 8, 8, 1), (128, 256, 4, 16, 1), (128, 256, 8, 8, 1)],
        (2, 128): [(128, 128, 8, 8, 1), (128, 256, 8, 8, 1)],
        (3, 64): [(128, 128, 4, 16, 1), (256, 128, 8, 8, 1)],
    },
    # session 17 call C: the loop lost its per-code scale multiply (W2 g64 loop 668 -> 540
    # instructions per tile) and reads scales one tile ahead: tiles again
    "S17": {
        (2, 64): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1),
                  (64, 128, 1, 32, 1)],
        (2, 128): [(128, 128, 4, 16, 1), (64, 128, 2, 32, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1),
                   (64, 128, 1, 32, 1)],
        (3, 128): [(128, 128, 2, 16, 1), (128, 256, 4, 16, 1), (256, 128, 4, 8, 1), (64, 128, 1, 32, 1),
                   (64, 128, 2, 32, 1)],
        (4, 128): [(64, 128, 2, 32, 1), (128, 128, 4, 16, 1), (128, 128, 8, 8, 1)],
        (3, 64): [(128, 128, 2, 16, 1), (64, 128, 1, 32, 1)],
    },
    # call E: ptxas places loads by register pressure: at 80 registers W2 g128's fourth row
    # of words was read a third of the way into the trip (a second exposed latency). Register
    # caps (maxnreg raises ptxas's budget) and the next tile's words read during this one
    "S17B": {
        cls: [(*tile, more) for more in ({"maxnreg": 96}, {"maxnreg": 128}, {"PREFETCH": 1},
                                         {"PREFETCH": 1, "maxnreg": 128}, {"PREFETCH": 1, "maxnreg": 168})]
        for cls, tile in (((2, 64), (128, 128, 2, 16, 1)), ((2, 128), (128, 128, 2, 16, 1)),
                          ((2, None), (64, 128, 2, 32, 1)), ((3, 128), (128, 128, 4, 16, 1)),
                          ((4, 128), (64, 128, 4, 16, 1)))
    },
    # call F: around call E's best (maxnreg 128 + PREFETCH): tiles, caps between
    "S17C": {
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
    """Session 11: the packed-half2 kernel on tile-major codes (fused split-K, one-wave grid from
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


PDL_SHAPES = {"7B.qkv": (12288, 4096), "7B.qo": (4096, 4096), "7B.gate_up": (22016, 4096), "7B.down": (4096, 11008),
              "70B.down": (8192, 28672)}


# (BLOCK_N, BLOCK_K, num_warps, num_stages, programs_per_sm, extra keys): larger tiles per warp
# amortise the per-tile work (x operand, scales) that PAIRS leaves as a larger share of the loop;
# DEQUANT frees the registers of the scaled partial-sum tile (§v14)
PAIRS4_CANDIDATES = [(32, 128, 2, 3, 16, {}), (32, 128, 1, 3, 32, {}), (64, 128, 1, 3, 32, {}),
                     (64, 128, 2, 3, 16, {"maxnreg": 128}), (128, 128, 2, 3, 16, {"maxnreg": 168}),
                     (128, 128, 2, 3, 16, {"DEQUANT": True, "maxnreg": 128}),
                     (128, 128, 2, 3, 16, {"DEQUANT": True, "maxnreg": 160}),
                     (128, 128, 2, 4, 16, {"DEQUANT": True, "maxnreg": 128}),
                     (256, 128, 2, 3, 16, {"DEQUANT": True}), (256, 128, 2, 3, 16, {"DEQUANT": True, "maxnreg": 192})]


# with DISABLE_MMA_V3=1 (Triton's switch, process-wide) tl.dot on 4+ warps is mma.sync as on 2: larger
# row blocks (less x re-read per weight byte) without wgmma's trip through shared memory
PAIRS4_MMA2_CANDIDATES = [(128, 128, 4, 3, 8, {}), (128, 128, 4, 3, 8, {"DEQUANT": True}),
                          (256, 128, 4, 3, 8, {}), (256, 128, 4, 3, 8, {"DEQUANT": True}),
                          (256, 128, 8, 3, 4, {"DEQUANT": True}), (64, 128, 4, 3, 8, {})]


def pairs4(quick: bool, mma2: bool = False) -> None:
    """Session 14: the skinny kernel with W4 in register pairs (PAIRS on) vs unpack_tile (off, the
    shipped tile of session 13), then candidate tiles with PAIRS on, through the decode path
    (tile_major_layout, split sized by the compiled residency); each line also checks the product
    against float64. --quick: W4 g128 on 70B.down and 7B.down. --mma2: 4- and 8-warp tiles with
    DISABLE_MMA_V3=1 (set before the first compile), W4 g128 and g64 on 70B.down and 7B.down."""
    import os

    if mma2:
        os.environ["DISABLE_MMA_V3"] = "1"
    import copy

    import qtool_kernels.skinny as sk
    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    shipped = sk._tuned
    names = ("70B.down", "7B.down") if quick else ("70B.down", "7B.down", "7B.qo", "7B.up")
    runs = [(name, 16, (4, 128)) for name in names]
    if not quick:
        runs += [(name, 16, cls) for name in ("70B.down", "7B.down") for cls in ((4, 64), (4, None))]
        runs += [("70B.down", 4, (4, 128))]
    keys = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "programs_per_sm")
    cands = PAIRS4_CANDIDATES
    if mma2:
        runs = [(name, 16, cls) for name in ("70B.down", "7B.down") for cls in ((4, 128), (4, 64))]
        cands = PAIRS4_MMA2_CANDIDATES
    try:
        for name, M, (bits, g) in runs:
            N, K = DECODE_SHAPES[name]
            t16 = bench_fp16(N, K, M, torch.float16)
            key = f"{bits}:{g or 'pc'}"
            base = dict(shipped().get(str(bits), {}), **shipped().get("skinny", {}).get(key, {}))
            base.pop("large", None)  # session 13's tile for every layer
            for cand in [None, *cands]:
                tuned = copy.deepcopy(shipped())
                e = dict(base, PAIRS=False) if cand is None else dict(zip(keys, cand[:5], strict=True), **cand[5])
                tuned.setdefault("skinny", {})[key] = e
                sk._tuned = lambda t=tuned: t
                label = (f"{e.get('BLOCK_N', 64)}x{e.get('BLOCK_K', 128)} w{e.get('num_warps', 4)} "
                         f"st{e.get('num_stages', 3)} pps{e.get('programs_per_sm', 8)} pairs={int(e.get('PAIRS', 1))}"
                         f" dq={int(e.get('DEQUANT', 0))} r{e.get('maxnreg', '-')}")
                t, nb, res = _steady(N, K, bits, g, M)
                err = _skinny_error(N, K, bits, g, M)
                if t is not None:
                    print(f"{name} M{M} W{bits} g{g or 'ch'} {label:45s}{' before' if cand is None else ''}: "
                          f"{_speed(t, t16, nb, bw)} resident/SM={res.get('skinny', '?')} err={err:.1e}", flush=True)
    finally:
        sk._tuned = shipped


SPLIT_SHAPES = dict(DECODE_SHAPES, **{"70B.up": (28672, 8192)})

# (shape, M, class, [(BLOCK_N, DEQUANT, num_stages)]): session 15's M = 16 split sweep
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


# whole "skinny" 4:128 entries (session 15): shipped, 128-row DEQUANT tiles for every layer or the large ones,
# split capped at 8 (as before) or 16 (one wave decides)
_E = {"BLOCK_K": 128, "num_warps": 2, "num_stages": 3, "programs_per_sm": 16}
ENTRIES16 = {"128dq/16": dict(_E, BLOCK_N=128, DEQUANT=True, max_split=16),
             "128dq/8": dict(_E, BLOCK_N=128, DEQUANT=True),
             "64dq/16": dict(_E, BLOCK_N=64, DEQUANT=True, max_split=16),
             "session14": dict(_E, BLOCK_N=32, large={"min_codes": 1 << 27, "BLOCK_N": 256, "DEQUANT": True}),
             # call H: programs_per_sm caps the one-wave grid below the compiled residency (7)
             "128dq/pps6+large16": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=6,
                                        large={"min_codes": 1 << 27, "max_split": 16}),
             "128dq/pps6+large256/pps4": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=6,
                                              large={"min_codes": 1 << 27, "BLOCK_N": 256, "programs_per_sm": 4}),
             "128dq/pps5+large16": dict(_E, BLOCK_N=128, DEQUANT=True, programs_per_sm=5,
                                        large={"min_codes": 1 << 27, "max_split": 16})}


# W4 g64 (128 x 128, 2 warps) after the integer-built constants took its registers from 128 to 148 (call I)
ENTRIES64 = {"st3": dict(_E, BLOCK_N=128), "st2": dict(_E, BLOCK_N=128, num_stages=2),
             "st3/r136": dict(_E, BLOCK_N=128, maxnreg=136), "st3/r128": dict(_E, BLOCK_N=128, maxnreg=128)}


def splits(quick: bool, m1: bool = False, tiles: bool = False, g128: bool = False, entries: bool = False,
           g64: bool = False) -> None:
    """Session 15: time against split-K, the shipped path otherwise (tile-major layers, rotated).
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
        classes = ((4, 128), (3, 128), (2, 64)) + (((2, 128), (2, None)) if "--s17" in sys.argv else ())
        runs = [(name, 1, cls, [None]) for name in ("70B.down", "70B.up") for cls in classes]
        sks = ([None, 8, 10, 12, 14, 16, 19, 20, 23, 24, 28, 32] if "--s17" in sys.argv  # session 17, call D
               else [None, 8, 12, 16, 24, 32, 48])
    elif g64:
        runs = [(name, M, (4, 64), list(ENTRIES64)) for M in (16, 4) for name in ("70B.down", "70B.up", "7B.down")]
        sks = [None]
    elif entries:
        runs = [(name, M, (4, 128), ["session14", *list(ENTRIES16)[4:]]) for M in (16, 4)
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


def pdl(quick: bool) -> None:
    """Session 13: programmatic dependent launch (kernels/pdl.py) on the shipped decode path, per
    QTOOL_PDL (0 off, 1 wait first, n > 1 prefetch n − 1 tiles into L2, then wait). The GEMVs
    of a rotation follow one another in the graph, as a decode step's do (with glue between)."""
    import os

    import triton

    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"copy={bw / 1e9:.0f} GB/s", flush=True)
    classes = [(4, 128)] if quick else [(4, 128), (3, 128), (2, 64)]
    before = os.environ.get("QTOOL_PDL")
    try:
        for name, (N, K) in PDL_SHAPES.items():
            t16 = bench_fp16(N, K, 1, torch.float16)
            for bits, g in classes:
                for mode in ("0", "1", "2", "3", "5"):
                    os.environ["QTOOL_PDL"] = mode
                    t, nb, res = _steady(N, K, bits, g)
                    if t is not None:
                        print(f"{name} W{bits} g{g or 'ch'} PDL={mode}: {_speed(t, t16, nb, bw)} resident/SM={res}",
                              flush=True)
    finally:
        os.environ.pop("QTOOL_PDL", None) if before is None else os.environ.__setitem__("QTOOL_PDL", before)


def main(mode: str) -> None:
    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={__import__('triton').__version__} "
          f"copy={copy_bw / 1e9:.0f} GB/s", flush=True)
    if mode == "layout":
        t16 = bench_fp16(8192, 28672, 1, torch.float16)
        cases = [(bits, g, N, K, {}) for bits, g in [(4, 128), (2, 64), (2, 128), (3, 128), (4, None)]
                 for N, K in [(8192, 28672), (8192 * 7, 4096), (8192 * 28, 1024), (8192 * 224, 128)]]
        refs = {(8192, 28672): t16}
    else:
        cases = [(bits, None, N, K, {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "programs_per_sm": pps})
                 for N, K in [(8192, 28672), (11008, 4096)] for bits in (4, 2, 3)
                 for bn, bk, nw, pps in [(64, 128, 4, 8), (32, 256, 4, 8), (16, 512, 4, 8), (16, 1024, 4, 8),
                                         (8, 1024, 4, 8), (16, 512, 2, 16), (32, 512, 4, 8), (16, 1024, 8, 4)]]
        refs = {(N, K): bench_fp16(N, K, 1, torch.float16) for N, K in [(8192, 28672), (11008, 4096)]}
    for bits, g, N, K, ov in cases:
        t, nb, cfg = _time(N, K, bits, g, ov)
        t16 = refs.get((N, K), refs.get((8192, 28672)))
        print(f"W{bits} g{g or 'ch'} {N}x{K} BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{cfg['num_warps']} "
              f"split{cfg['SPLIT_K']}: {t * 1e6:7.1f} us  {nb / t / copy_bw * 100:3.0f}% copy  "
              f"x{t16 / t:.2f} vs fp16 70B.down-sized", flush=True)


if __name__ == "__main__":
    modes = ("layout", "pc", "tiled", "refactor", "waves", "split", "skinny", "rows", "skinny16", "pairs", "h2", "pdl",
             "pairs4", "splits")
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: gemv_probe.py {'|'.join(modes)} [--quick]")
    if not torch.cuda.is_available():
        sys.exit("gemv_probe.py needs a CUDA GPU")
    if sys.argv[1] == "tiled":
        tiled("--quick" in sys.argv)
    elif sys.argv[1] == "refactor":
        refactor()
    elif sys.argv[1] == "waves":
        waves("--quick" in sys.argv)
    elif sys.argv[1] == "skinny16":
        skinny16("--quick" in sys.argv, "--more" in sys.argv, "--w4" in sys.argv)
    elif sys.argv[1] in ("rows", "h2"):  # --only=3:128,4:pc: those classes
        only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")]
        sets = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--set=")]
        args = ("--quick" in sys.argv, tuple(only[0].split(",")) if only else ())
        globals()[sys.argv[1]](*args, *([sets[0]] if sets and sys.argv[1] == "h2" else []))
    elif sys.argv[1] == "splits":
        splits(*(f"--{a}" in sys.argv for a in ("quick", "m1", "tiles", "g128", "entries", "g64")))
    elif sys.argv[1] == "pairs4":
        pairs4("--quick" in sys.argv, "--mma2" in sys.argv)
    elif sys.argv[1] in ("split", "skinny", "pairs", "pdl"):
        globals()[sys.argv[1]]("--quick" in sys.argv)
    else:
        main(sys.argv[1])
