"""A/B of the decode kernels on one GPU: fp16 cuBLAS vs skinny_matmul (tensor cores) vs
gemv_matmul (CUDA cores) with a small config sweep.

Run (H100, ~4 min; --quick: 2 shapes):  python scripts/gemv_ab.py gemv_ab.json [--quick]

Timing is qtool.bench's (CUDA events through triton's do_bench, medians, every timed call
on its own weight copy so that one rotation exceeds 4× L2, calls replayed from a CUDA
graph), so the numbers compare with `qtool bench kernels`. Every kernel/config is checked
once against the dense product x·Ŵᵀ (Ŵ dequantized, fp32 matmul): relative error below
1e-2 (fp16) / 3e-2 (bf16), else the row is marked bad and never chosen as best.

W4 g128 fp16 (the decode default) gets the whole sweep (10 configs) on every shape and
M; the other classes (W2/W3 g128, W2/W3/W4 g64 and per channel, W4 g128 bf16) time the
default config and the W4 g128 winner of the same shape and M. The JSON holds every row,
the best config per class (geometric mean over shapes) and a suggested "gemv" section +
"gemv_max_m" for kernels/tuned_skinny.json (not written: copy it by hand after review).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"7B.qo": (4096, 4096), "7B.up": (11008, 4096), "7B.down": (4096, 11008),
          "70B.up": (28672, 8192), "70B.down": (8192, 28672), "70B.qo": (8192, 8192)}
QUICK = ("7B.up", "70B.down")
MS = (1, 4)
# (BLOCK_N, BLOCK_K, num_warps, num_stages, programs_per_sm); BLOCK_K is cut to the group.
SWEEP = [
    (64, 128, 4, 2, 8),  # the default
    (64, 128, 4, 2, 4),
    (64, 128, 4, 2, 16),
    (64, 128, 4, 1, 8),
    (128, 128, 4, 2, 8),  # 4 rows per thread, scale/zero through shared memory
    (128, 128, 8, 2, 8),
    (256, 128, 8, 2, 8),
    (32, 128, 4, 2, 8),
    (32, 128, 2, 2, 16),
    (64, 64, 4, 2, 8),
]
OTHER_CLASSES = [(2, 128, torch.float16), (3, 128, torch.float16),
                 (2, 64, torch.float16), (3, 64, torch.float16), (4, 64, torch.float16),
                 (2, None, torch.float16), (3, None, torch.float16), (4, None, torch.float16),
                 (4, 128, torch.bfloat16)]
REP_MS = 40
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def class_key(bits: int, g: int | None, M: int, dtype: torch.dtype) -> str:
    return f"{bits}:{g or 'pc'}:{M}" + ("" if dtype == torch.float16 else ":bf16")


def split_for(N: int, K: int, M: int, bn: int, bk: int, pps: int, n_sm: int) -> int:
    """default_gemv_config's split-K rule for a given programs-per-SM target."""
    n_tiles = -(-N // bn) * -(-M // 4)
    k_tiles = -(-K // bk)
    split = 1
    while n_tiles * split < pps * n_sm and k_tiles // (2 * split) >= 4 and split < 16:
        split *= 2
    return split


def make_config(sweep_row: tuple, N: int, K: int, M: int, g: int | None, n_sm: int) -> dict:
    from qtool_kernels.gemv import _block_k

    bn, bk, nw, ns, pps = sweep_row
    bk = _block_k(0, g, bk)
    return {"BLOCK_M": min(M, 4), "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns,
            "SPLIT_K": split_for(N, K, M, bn, bk, pps, n_sm)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b.double()).norm() / b.double().norm()).item()


def bench_class(shape: str, bits: int, g: int | None, dtype: torch.dtype, sweep: list, t16: dict,
                copy_bw: float, n_sm: int, rows: list, best_w4: dict | None = None) -> None:
    import qtool_kernels as qk

    from qtool.bench.kernels import _layer_bytes, random_packed_layer
    from qtool.bench.timing import copies_needed, time_rotated

    N, K = SHAPES[shape]
    layers = [random_packed_layer(N, K, bits, g)]
    nbytes = _layer_bytes(layers[0])
    layers += [random_packed_layer(N, K, bits, g) for _ in range(copies_needed(nbytes) - 1)]
    L0 = layers[0]
    W = qk.dequantize_packed(L0.qweight, L0.scales, L0.zeros, bits, g, K, dtype).float()  # one rounding
    for M in MS:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), W)
        base = {"shape": shape, "N": N, "K": K, "M": M, "bits": bits, "group": g,
                "dtype": str(dtype).removeprefix("torch."), "fp16_us": t16[(shape, M, dtype)] * 1e6,
                "weight_bytes": nbytes}

        def record(kernel: str, cfg: dict | None, fn, M=M, x=x, ref=ref, base=base) -> None:
            try:
                err = rel(fn(L0), ref)
                t = time_rotated([lambda L=L: fn(L) for L in layers], rep_ms=REP_MS)
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"  skip {kernel} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                return
            ok = err < TOL[dtype]
            row = dict(base, kernel=kernel, config=cfg, us=t * 1e6, speedup=base["fp16_us"] / (t * 1e6),
                       copy_frac=nbytes / t / copy_bw, rel_err=err, ok=ok)
            rows.append(row)
            print(f"{shape:9s} M={M} W{bits} g{g or 'pc':>3} {base['dtype']:8s} {kernel:7s} {t * 1e6:8.1f} us "
                  f"x{row['speedup']:.2f} {100 * row['copy_frac']:3.0f}% copy err={err:.1e}"
                  f"{'' if ok else ' BAD'} {cfg or ''}", flush=True)

        record("skinny", None, lambda L, x=x: qk.skinny_matmul(x, L.qweight, L.scales, L.zeros, bits, g))
        configs = [make_config(s, N, K, M, g, n_sm) for s in sweep]
        if best_w4 is not None and (shape, M) in best_w4:
            configs.append(make_config(best_w4[(shape, M)], N, K, M, g, n_sm))
        seen = []
        for cfg in configs:
            if cfg in seen:
                continue
            seen.append(cfg)
            record("gemv", cfg, lambda L, x=x, cfg=cfg: qk.gemv_matmul(x, L.qweight, L.scales, L.zeros, bits, g,
                                                                        config=cfg))


def sweep_row_of(cfg: dict, shape: str, M: int, sweep: list, g: int | None, n_sm: int) -> tuple | None:
    N, K = SHAPES[shape]
    for s in sweep:
        if make_config(s, N, K, M, g, n_sm) == cfg:
            return s
    return None


def summarize(rows: list, shapes: list, n_sm: int) -> dict:
    """Best gemv sweep row per class by geometric-mean time over shapes, vs skinny and fp16."""
    out: dict = {}
    classes = sorted({(r["bits"], r["group"], r["M"], r["dtype"]) for r in rows}, key=str)
    for bits, g, M, dt in classes:
        rs = [r for r in rows if (r["bits"], r["group"], r["M"], r["dtype"]) == (bits, g, M, dt)]
        by_row: dict = {}
        for s in SWEEP:  # a sweep row's time on a shape: the row timed with its config there
            for r in rs:
                if r["kernel"] == "gemv" and r["ok"] and r["config"] == make_config(
                        s, r["N"], r["K"], M, g, n_sm):
                    by_row.setdefault(s, {})[r["shape"]] = r["us"]
        full = {s: v for s, v in by_row.items() if len(v) == len(shapes)}
        if not full:
            continue
        gm = {s: math.exp(sum(math.log(t) for t in v.values()) / len(v)) for s, v in full.items()}
        best = min(gm, key=gm.get)
        sk = [r["us"] for r in rs if r["kernel"] == "skinny" and r["ok"]]
        f16 = {r["shape"]: r["fp16_us"] for r in rs}
        dtype = torch.float16 if dt == "float16" else torch.bfloat16
        out[class_key(bits, g, M, dtype)] = {
            "sweep_row": dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "programs_per_sm"), best,
                                  strict=True)),
            "gemv_geomean_us": gm[best],
            "skinny_geomean_us": math.exp(sum(map(math.log, sk)) / len(sk)) if len(sk) == len(shapes) else None,
            "fp16_geomean_us": math.exp(sum(math.log(t) for t in f16.values()) / len(f16)),
            "per_shape_us": full[best],
        }
    return out


def suggest_tuned(best: dict) -> dict:
    """The tuned_skinny.json additions: per-class gemv tiles, and gemv_max_m = the largest
    timed M at which the GEMV beat the skinny kernel for W4 g128 fp16."""
    gemv = {k: v["sweep_row"] for k, v in best.items() if not k.endswith(":bf16")}
    max_m = 0
    for M in MS:
        b = best.get(f"4:128:{M}")
        if b and b["skinny_geomean_us"] and b["gemv_geomean_us"] < b["skinny_geomean_us"]:
            max_m = M
    return {"gemv": gemv, "gemv_max_m": max_m}


def main(argv: list[str]) -> None:
    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    out_path = next((a for a in argv if not a.startswith("--")), "gemv_ab.json")
    shapes = list(QUICK if "--quick" in argv else SHAPES)
    t0 = time.time()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} copy={copy_bw / 1e9:.0f} GB/s "
          f"shapes={shapes}", flush=True)
    t16 = {(s, M, dt): bench_fp16(*SHAPES[s], M, dt) for s in shapes for M in MS
           for dt in (torch.float16, torch.bfloat16)}
    rows: list = []
    for s in shapes:
        bench_class(s, 4, 128, torch.float16, SWEEP, t16, copy_bw, n_sm, rows)
    # the W4 g128 winner per (shape, M), tried on the other classes beside their default
    best_w4 = {}
    for s in shapes:
        for M in MS:
            rs = [r for r in rows if r["shape"] == s and r["M"] == M and r["kernel"] == "gemv" and r["ok"]]
            if rs:
                best_w4[(s, M)] = sweep_row_of(min(rs, key=lambda r: r["us"])["config"], s, M, SWEEP, 128, n_sm)
    best_w4 = {k: v for k, v in best_w4.items() if v is not None}
    for bits, g, dt in OTHER_CLASSES:
        for s in shapes:
            bench_class(s, bits, g, dt, SWEEP[:1], t16, copy_bw, n_sm, rows, best_w4)
    best = summarize(rows, shapes, n_sm)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "copy_gbps": copy_bw / 1e9, "shapes": shapes,
              "seconds": time.time() - t0, "rows": rows, "best": best, "tuned_suggestion": suggest_tuned(best)}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print("\nclass            gemv best (geo-mean us)  skinny  fp16   gemv/fp16  config")
    for k, v in best.items():
        sk = v["skinny_geomean_us"]
        print(f"{k:16s} {v['gemv_geomean_us']:10.1f} {sk if sk is None else round(sk, 1)!s:>10} "
              f"{v['fp16_geomean_us']:7.1f} x{v['fp16_geomean_us'] / v['gemv_geomean_us']:.2f}  {v['sweep_row']}")
    print(f"\nsuggested tuned_skinny.json additions: {json.dumps(result['tuned_suggestion'])}")
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gemv_ab.py needs a CUDA GPU")
    main(sys.argv[1:])
