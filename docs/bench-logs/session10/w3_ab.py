"""Session 10, call A: the W3 GEMV before (a shift per code, one x load per code) and after
(aligned fields, x pairs), same run, same layers, tile-major, fp16 x, M = 1.

  git show 448aba8:kernels/gemv.py > .device/gemv_old.py
  python docs/bench-logs/session10/w3_ab.py          (on the GPU; output: A_w3_before_after.txt)
"""

import importlib.util
import sys

import torch
import triton

sys.path.insert(0, "scripts")
import qtool_kernels.gemv as new  # noqa: E402
from gemv_probe import DECODE_SHAPES, _rotated_layers  # noqa: E402
from qtool_kernels import occupancy  # noqa: E402

from qtool.bench.kernels import bench_fp16  # noqa: E402
from qtool.bench.timing import copy_bandwidth, time_rotated  # noqa: E402
from qtool.nn.qlinear import tile_major_layout  # noqa: E402

spec = importlib.util.spec_from_file_location("qtool_kernels.gemv_old", ".device/gemv_old.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
bw = copy_bandwidth()
print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
      f"copy={bw / 1e9:.0f} GB/s")
for name in ("70B.down", "7B.down", "7B.qo"):
    N, K = DECODE_SHAPES[name]
    t16 = bench_fp16(N, K, 1, torch.float16)
    for bits, g in [(3, 128), (3, 64)]:
        Ls, nb = _rotated_layers(N, K, bits, g)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        with tile_major_layout(torch.nn.ModuleList(Ls)):
            ys = {}
            for label, mod in (("before", old), ("after", new), ("before ", old), ("after ", new)):
                occupancy._RESIDENT.clear()
                calls = [lambda L=L, m=mod, x=x, b=bits, g=g: m.gemv_matmul(x, L.qweight, L.scales, L.zeros, b, g)
                         for L in Ls]
                time_rotated(calls, rep_ms=20)  # the first launches record the residency
                t = time_rotated(calls, rep_ms=40)
                ys[label.strip()] = mod.gemv_matmul(x, Ls[0].qweight, Ls[0].scales, Ls[0].zeros, bits, g).float()
                print(f"{name} W{bits} g{g} {label:7s}: {t * 1e6:6.1f} us ({t16 / t:.2f}x fp16 {t16 * 1e6:.1f}, "
                      f"{nb / t / bw * 100:3.0f}% copy)", flush=True)
            d = float((ys["after"] - ys["before"]).abs().max() / ys["before"].abs().max())
            print(f"   max |after - before| / max|before| = {d:.2e}")
        del Ls
        torch.cuda.empty_cache()
