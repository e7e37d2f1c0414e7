"""A/B of the M = 1 decode GEMV: fp16 cuBLAS vs the fp32 GEMV (gemv.py) vs the packed-half2
GEMV (gemv_h2.py), W4 g128 and W2 g64, fp16 activations.

Run (H100):  python scripts/bench/gemv_ab.py $OUT/gemv_ab.json --quick   (< 90 s: default configs)
             python scripts/bench/gemv_ab.py $OUT/gemv_ab.json           (+ h2 tile variants, ~3 min)
             python scripts/bench/gemv_ab.py $OUT/v5.json --v5           (fp32 GEMV: tiles over
                                                                    several groups, ~4 min;
                                                                    --classes=3:64,4:64 for others)
             python scripts/bench/gemv_ab.py --sass                      (no GPU: SASS instructions
                                                                    per code in the K loops)

Timing is qtool.bench's (medians of CUDA-event timings through triton's do_bench, every timed
call on its own weight copy so that one rotation exceeds 4× L2, calls replayed from a CUDA
graph, split-K reduction included), so the numbers compare with `qtool bench kernels`. Every
kernel/config is checked once against the dense product x·Ŵᵀ (Ŵ dequantized in fp16, fp32
matmul): relative error below 1e-2, else the row is marked BAD. The fp32 GEMV's own tile sweep
(which wrote tuned_skinny.json's "gemv" section) is this script at commit 5102d1f. Recorded in
docs/kernels.md §Tuning table, §Re-tuning (--sass) and §Findings v3–v5.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"70B.down": (8192, 28672), "70B.up": (28672, 8192), "7B.up": (11008, 4096), "7B.down": (4096, 11008)}
CLASSES = [(4, 128), (2, 64)]
# --v5: the fp32 GEMV with K tiles over several whole groups (_gemv_groups_kernel: long runs per
# row, few rows per program) against v3 as shipped (the first, empty variant)
V5_CLASSES = [(4, 128), (2, 64), (2, 128), (3, 128)]
V5_VARIANTS = [{}] + [
    {"SPAN_GROUPS": True, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "programs_per_sm": pps}
    for bn, bk, nw, pps in [(16, 1024, 4, 8), (16, 512, 2, 16), (8, 1024, 4, 8), (16, 2048, 4, 8),
                            (8, 2048, 4, 8), (16, 1024, 2, 16), (32, 1024, 4, 8), (16, 512, 4, 8),
                            (8, 512, 2, 16), (32, 2048, 8, 4)]
]
# h2 tile variants timed besides the default (full run only): default_h2_config overrides
H2_VARIANTS = [{"rows": 2}, {"programs_per_sm": 8}, {"programs_per_sm": 2}, {"rows": 2, "num_warps": 8}]
REP_MS = 40
TOL = 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b.double()).norm() / b.double().norm()).item()


def bench_class(shape: str, bits: int, g: int, t16: float, copy_bw: float, n_sm: int, variants: list,
                rows: list, v5: bool = False) -> None:
    import qtool_kernels as qk
    from qtool_kernels.gemv import default_gemv_config, default_h2_config, gemv_path

    from qtool.bench.kernels import _layer_bytes, random_packed_layer
    from qtool.bench.timing import copies_needed, time_rotated

    N, K = SHAPES[shape]
    layers = [random_packed_layer(N, K, bits, g)]
    nbytes = _layer_bytes(layers[0])
    layers += [random_packed_layer(N, K, bits, g) for _ in range(copies_needed(nbytes) - 1)]
    L0 = layers[0]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    x[0, ::997] = 1000.0  # a few outlier channels, as in down_proj inputs
    W = qk.dequantize_packed(L0.qweight, L0.scales, L0.zeros, bits, g, K, torch.float16).float()
    ref = F.linear(x.float(), W)
    del W
    if v5:
        configs = [(f"fp32 {v}" if v else "fp32", default_gemv_config(1, N, K, bits, g, n_sm, v)) for v in variants]
    else:
        configs = [("fp32", default_gemv_config(1, N, K, bits, g, n_sm)),
                   ("h2", default_h2_config(N, K, bits, g, n_sm))]
        configs += [(f"h2 {v}", default_h2_config(N, K, bits, g, n_sm, v)) for v in variants]
    seen: list = []
    for name, cfg in configs:
        if cfg in seen:
            continue
        seen.append(cfg)
        path = gemv_path(x, L0.qweight, bits, g, cfg)
        assert path == name.split()[0], (name, path)  # the A/B measures what it says

        def fn(L, cfg=cfg):
            return qk.gemv_matmul(x, L.qweight, L.scales, L.zeros, bits, g, config=cfg)

        try:
            err = rel(fn(L0), ref)
            t = time_rotated([lambda L=L: fn(L) for L in layers], rep_ms=REP_MS)
        except Exception as e:  # a config the compiler rejects (registers, shared memory)
            print(f"  skip {name} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        row = {"shape": shape, "N": N, "K": K, "bits": bits, "group": g, "kernel": name, "path": path,
               "config": cfg, "us": t * 1e6, "fp16_us": t16 * 1e6, "speedup": t16 / t,
               "copy_frac": nbytes / t / copy_bw, "weight_bytes": nbytes, "rel_err": err, "ok": err < TOL}
        rows.append(row)
        print(f"{shape:9s} W{bits} g{g:<3} {name:34s} {t * 1e6:7.1f} us  x{row['speedup']:.2f} fp16  "
              f"{100 * row['copy_frac']:3.0f}% copy  err={err:.1e}{'' if row['ok'] else ' BAD'}", flush=True)
    del layers
    torch.cuda.empty_cache()


def sass_counts() -> dict:
    """SASS instructions per code in the K loop of both kernels, compiled for sm_90 here (no
    GPU): W4 g128 and W2 g64 at their default tiles for 70B.down (loop = the longest
    backward-branch span; codes per trip = tile codes / threads). The
    launches are captured from gemv_matmul / gemv_h2_matmul themselves (kernels/offline.py)."""
    import qtool_kernels.gemv as gemv
    from qtool_kernels import offline
    from qtool_kernels.gemv_h2 import _gemv_h2_kernel, gemv_h2_matmul

    N, K = SHAPES["70B.down"]
    gemv._num_sms = lambda device: 132
    x = torch.zeros(1, K, dtype=torch.float16)
    out = {}
    for bits, g in CLASSES:
        q = torch.zeros(N, K * bits // 32, dtype=torch.int32)
        s, z = torch.ones(N, K // g, dtype=torch.float16), torch.zeros(N, K // g, dtype=torch.uint8)
        v3 = {"SPAN_GROUPS": False, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}  # v3: _gemv_kernel, 64 × 128
        c = gemv.default_gemv_config(1, N, K, bits, g, 132, v3)
        h = gemv.default_h2_config(N, K, bits, g, 132)
        with offline.captured(gemv._gemv_kernel, _gemv_h2_kernel) as got:
            gemv.gemv_matmul(x, q, s, z, bits, g, config=c)
            gemv_h2_matmul(x, q, s, z, bits, g, config=h)
        old, new = (offline.k_loop(offline.compile_launch(la).sass) for la in got)
        old_codes = c["BLOCK_N"] * c["BLOCK_K"] / (32 * c["num_warps"])
        new_codes = h["BLOCK_N"] * h["BLOCK_K"] / (32 * h["num_warps"])  # one tile per trip (since §v11)
        key = f"W{bits} g{g}"
        out[key] = {"fp32": {"per_code": sum(old.values()) / old_codes, "ops": dict(old.most_common())},
                    "h2": {"per_code": sum(new.values()) / new_codes, "ops": dict(new.most_common())}}
        print(f"{key}: fp32 GEMV {out[key]['fp32']['per_code']:.2f} instr/code  {old.most_common(8)}")
        print(f"{key}: h2 GEMV   {out[key]['h2']['per_code']:.2f} instr/code  {new.most_common(8)}")
    return out


def v5_summary(rows: list) -> None:
    """Per class: v3 (the first variant) and the best variant by the geometric mean over shapes."""
    import math

    for bits, g in V5_CLASSES:
        rs = [r for r in rows if r["bits"] == bits and r["group"] == g and r["ok"]]
        shapes = sorted({r["shape"] for r in rs})
        by_kernel: dict = {}
        for r in rs:
            by_kernel.setdefault(r["kernel"], {})[r["shape"]] = r["us"]
        gm = {k: math.exp(sum(math.log(v[s]) for s in shapes) / len(shapes))
              for k, v in by_kernel.items() if len(v) == len(shapes)}
        if "fp32" not in gm:
            print(f"W{bits} g{g}: v3 row missing")
            continue
        best = min(gm, key=gm.get)
        print(f"W{bits} g{g}: v3 {gm['fp32']:.1f} us, best {gm[best]:.1f} us ({gm['fp32'] / gm[best]:.2f}x) = {best}  "
              + "  ".join(f"{s}: {by_kernel[best][s]:.1f}/{by_kernel['fp32'][s]:.1f}" for s in shapes))


def main(argv: list[str]) -> None:
    from qtool.bench.kernels import bench_fp16
    from qtool.bench.timing import copy_bandwidth

    out_path = next((a for a in argv if not a.startswith("--")), "gemv_ab.json")
    variants = [] if "--quick" in argv else H2_VARIANTS
    t0 = time.time()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={__import__('triton').__version__} "
          f"copy={copy_bw / 1e9:.0f} GB/s", flush=True)
    rows: list = []
    if "--v5" in argv:
        global V5_CLASSES
        for a in argv:  # --classes 3:64,4:64 replaces V5_CLASSES
            if a.startswith("--classes="):
                V5_CLASSES = [tuple(int(v) for v in c.split(":")) for c in a.split("=", 1)[1].split(",")]
        for shape in ("70B.down", "7B.up"):
            t16 = bench_fp16(*SHAPES[shape], 1, torch.float16)
            for bits, g in V5_CLASSES:
                bench_class(shape, bits, g, t16, copy_bw, n_sm, V5_VARIANTS, rows, v5=True)
        v5_summary(rows)
        with open(out_path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "copy_gbps": copy_bw / 1e9,
                       "seconds": time.time() - t0, "rows": rows}, f, indent=1)
        print(f"wrote {out_path} in {time.time() - t0:.0f} s")
        return
    for shape, (N, K) in SHAPES.items():
        t16 = bench_fp16(N, K, 1, torch.float16)
        for bits, g in CLASSES:
            bench_class(shape, bits, g, t16, copy_bw, n_sm, variants, rows)
    print(f"\n{'shape':9s} {'class':7s} {'fp16':>7s} {'fp32 GEMV':>14s} {'h2 GEMV':>14s} {'h2 best':>14s}  h2/fp32")
    summary = []
    for shape in SHAPES:
        for bits, g in CLASSES:
            rs = [r for r in rows if r["shape"] == shape and r["bits"] == bits and r["ok"]]
            old = next((r for r in rs if r["kernel"] == "fp32"), None)
            new = next((r for r in rs if r["kernel"] == "h2"), None)
            best = min((r for r in rs if r["path"] == "h2"), key=lambda r: r["us"], default=None)
            if not (old and new and best):
                print(f"{shape:9s} W{bits} g{g}: missing rows (BAD or skipped)")
                continue
            summary.append({"shape": shape, "bits": bits, "group": g, "fp16_us": old["fp16_us"], "fp32_us": old["us"],
                            "h2_us": new["us"], "h2_best_us": best["us"], "h2_best": best["kernel"]})
            f = lambda r: f"{r['us']:6.1f} x{r['speedup']:.2f}"  # noqa: E731
            print(f"{shape:9s} W{bits} g{g:<3} {old['fp16_us']:7.1f} {f(old):>14s} {f(new):>14s} {f(best):>14s}  "
                  f"x{old['us'] / new['us']:.2f}  {best['kernel'] if best is not new else ''}")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "copy_gbps": copy_bw / 1e9, "seconds": time.time() - t0,
              "rows": rows, "summary": summary}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if "--sass" in sys.argv:
        counts = sass_counts()
        for path in [a for a in sys.argv[1:] if not a.startswith("--")]:
            with open(path, "w") as f:
                json.dump(counts, f, indent=1)
        sys.exit(0)
    if not torch.cuda.is_available():
        sys.exit("gemv_ab.py needs a CUDA GPU (--sass does not)")
    main(sys.argv[1:])
