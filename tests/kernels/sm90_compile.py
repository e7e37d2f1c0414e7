"""Compile kernels for sm_90 on a machine without a GPU (Triton's bundled ptxas/nvdisasm)
and print, per case, the global-load instructions of the SASS as JSON.

Run as a subprocess by test_compile_sm90.py: the interpreter tests set TRITON_INTERPRET=1,
under which @triton.jit yields functions that cannot be compiled. The interpreter does not
fold constants the way the compiler does, so a kernel can pass every interpreter test and
still fail to compile (a tile-major helper once divided by a compile-time zero in a branch
the interpreter never took)."""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTRS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "out_ptr": "*fp16",
        "y_ptr": "*fp16", "cnt_ptr": "*i32"}
PARTIALS = {"out_ptr": "*fp32"}  # what a split-K GEMV writes
# the SASS ops that order a split-K launch's partials, tickets and final reads (tickets.py)
ORDERING_OPS = r"\bBAR\.SYNC|\bMEMBAR\.\w+\.GPU|\bATOMG\.E\.(ADD|EXCH)|\bCCTL\.IVALL|\bLDG\.E(\.\w+)?\.STRONG\.GPU"
# arguments that are multiples of 16 at run time on real shapes (Triton specialises those)
DIV16 = {"N", "K", "Wn", "G", "stride_xm", "stride_qn", "stride_os", "stride_om", "stride_qb", "stride_qt",
         "stride_sb", "stride_zb", "stride_on"}


def compile_sass(fn, const: dict, opts: dict) -> str:
    # constexpr parameters left out take their defaults, as a launch that omits them would
    const = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.name not in const
                and p.default is not inspect.Parameter.empty}, **const}
    ptrs = dict(PTRS, **PARTIALS) if const.get("SPLIT_K", 1) > 1 and "FUSED" in const else PTRS
    sig = {a: "constexpr" if a in const else ptrs.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (a, t) in enumerate(sig.items())
             if t.startswith("*") or a in DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["sass"]


def cases(bits: int) -> list[tuple[str, object, dict, dict]]:
    from qtool_kernels.dequant import _dequant_kernel
    from qtool_kernels.gemv import _gemv_groups_kernel, _gemv_kernel
    from qtool_kernels.skinny import _skinny_kernel

    tw = 128 * bits // 32  # words of a 128-code tile-major tile
    out = []
    for tn in (0, 64):
        out.append((f"skinny/tile{tn}", _skinny_kernel,
                    dict(BITS=bits, GROUP=128, GPB=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, HAS_BIAS=False,
                         IS_BF16=False, EVEN=True, TILE_N=tn, TILE_W=tw if tn else 0, FUSED=True,
                         SCALE_BLOCK=tn or 1, PAIRS=int(bits == 4)),
                    {"num_warps": 4, "num_stages": 3}))
        out.append((f"dequant/tile{tn}", _dequant_kernel,
                    dict(BITS=bits, GROUP=128, GPB=1, BLOCK_N=32, BLOCK_K=128, IS_BF16=True, TILE_N=tn,
                         TILE_W=tw if tn else 0), {"num_warps": 4}))
    out.append(("gemv", _gemv_kernel, dict(BITS=bits, GROUP=128, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8,
                                            HAS_BIAS=False, EVEN_N=True, EVEN_K=True, FUSED=True, STAGES=1),
                {"num_warps": 4, "num_stages": 2}))
    out.append(("gemv_groups", _gemv_groups_kernel, dict(BITS=bits, GROUP=64, BLOCK_M=1, BLOCK_N=32, BLOCK_K=256,
                                                          SPLIT_K=8, HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
                                                          FUSED=True, STAGES=1),
                {"num_warps": 4, "num_stages": 2}))
    # the pipelined K loop (tuned for W2/W4 g64 and large W4 g128 layers): cp.async copies
    out.append(("gemv_groups/st3", _gemv_groups_kernel, dict(BITS=bits, GROUP=64, BLOCK_M=1, BLOCK_N=64,
                                                              BLOCK_K=128, SPLIT_K=8, HAS_BIAS=False, EVEN_N=True,
                                                              EVEN_K=True, FUSED=True, STAGES=3),
                {"num_warps": 2, "num_stages": 2}))
    return out


def occupancy() -> None:
    """The decode kernels' grids on a 132-SM sm_90 in steady state: each wrapper called twice
    per layer (the first launch records how many programs its compiled kernel fits per SM,
    the second sizes the grid by it). GEMV (M = 1) on row-major and tile-major layers
    (tile-major scales, as tile_major_layout stores them), skinny kernel at M = 16."""
    import torch
    from qtool_kernels import gemv, gemv_h2, offline, skinny
    from qtool_kernels.occupancy import resident_programs
    from qtool_kernels.tiles import groups_tile_major, tile_major

    gemv._num_sms = skinny._num_sms = gemv_h2._num_sms = lambda device: 132
    res = {}
    for bits, g in [(4, 128), (3, 128), (2, 64)]:
        for N, K in [(4096, 11008), (8192, 8192)]:
            for layout in ("row", "tile", "skinny", "h2"):
                if layout == "h2" and bits == 3:
                    continue
                q = torch.zeros(N, K * bits // 32, dtype=torch.int32)
                s, z = torch.ones(N, K // g, dtype=torch.float16), torch.zeros(N, K // g, dtype=torch.uint8)
                if layout in ("tile", "h2"):
                    bn, bk = gemv.tile_major_tile(bits, g, N, K)
                    q, s, z = tile_major(q, bn, bk, bits), groups_tile_major(s, bn), groups_tile_major(z, bn)
                x = torch.zeros(16 if layout == "skinny" else 1, K, dtype=torch.float16)
                fn = {"skinny": skinny.skinny_matmul, "h2": gemv_h2.gemv_h2_matmul}.get(layout, gemv.gemv_matmul)
                with offline.captured(gemv._gemv_kernel, gemv._gemv_groups_kernel, skinny._skinny_kernel,
                                      gemv_h2._gemv_h2_kernel, arch=90) as got:
                    fn(x, q, s, z, bits, g)
                    fn(x, q, s, z, bits, g)
                c = offline.compile_launch(got[-1])
                res[f"W{bits} g{g} {N}x{K} {layout}"] = {
                    "regs": c.regs, "spill": c.spill_bytes,
                    "resident": resident_programs(c.regs, c.num_warps, c.shared),
                    "programs": got[-1].grid[0] * got[-1].grid[1] * got[-1].grid[2],
                    "splits": [la.kwargs["SPLIT_K"] for la in got]}
                if layout == "skinny":  # the tuned cap on programs per SM (the class's entry, else the bits')
                    t = skinny._tuned()
                    entry = t.get("skinny", {}).get(f"{bits}:{g}") or t.get(str(bits), {})
                    res[f"W{bits} g{g} {N}x{K} {layout}"]["cap"] = entry.get("programs_per_sm", 8)
                if layout == "h2":  # the packed-half2 GEMV (on the GPU, what M = 1 fp16 takes): its entry's cap
                    cfg = gemv.default_h2_config(N, K, bits, g, 132, {"BLOCK_N": q.shape[2], "BLOCK_K": bk},
                                                 tiled=True)
                    assert got[-1].kwargs["BLOCK_N"] == q.shape[2] and cfg["H2"]
                    res[f"W{bits} g{g} {N}x{K} {layout}"].update(
                        cap=gemv._tiled_entry(bits, g, N, K)["H2"]["programs_per_sm"],
                        ordering=" ".join(m.group(0) for m in re.finditer(ORDERING_OPS, c.sass)),
                        fused=got[-1].kwargs["FUSED"])
    # NF4 skinny (M = 16): its split-K is finished by the last program as well
    import qtool_kernels as qk
    from qtool_kernels import nf4

    from qtool.bench.kernels import random_nf4_layer

    nf4._num_sms = lambda device: 132
    w = qk.NF4Weight.of(random_nf4_layer(8192, 8192, 64, device="cpu"))
    x = torch.zeros(16, 8192, dtype=torch.float16)
    with offline.captured(nf4._nf4_skinny_kernel, arch=90) as got:
        qk.nf4_skinny_matmul(x, w)
        qk.nf4_skinny_matmul(x, w)
    c = offline.compile_launch(got[-1])
    res["nf4 8192x8192 skinny"] = {
        "regs": c.regs, "spill": c.spill_bytes, "resident": resident_programs(c.regs, c.num_warps, c.shared),
        "programs": got[-1].grid[0] * got[-1].grid[1] * got[-1].grid[2],
        "splits": [la.kwargs["SPLIT_K"] for la in got], "fused": got[-1].kwargs["FUSED"],
        "ordering": " ".join(m.group(0) for m in re.finditer(ORDERING_OPS, c.sass))}
    print(json.dumps(res))


# programmatic dependent launch (pdl.py): bulk L2 prefetch, griddepcontrol.wait, launch_dependents
PDL_OPS = r"\bUBLKPF\.L2|\bACQBULK|\bPREEXIT|\bLDG\.E(\.\w+)*"


def pdl() -> None:
    """Per kernel and PDL setting, the PDL ops and global loads of its SASS in program order
    (loads collapsed to LDG): the h2 GEMV (PDL 0, 1, 2), the fp32 GEMV and the skinny kernel
    (0, 1) and the decode attention's two kernels."""
    from qtool_kernels.decode_attention import _chunk_kernel, _merge_kernel
    from qtool_kernels.gemv_h2 import _gemv_h2_kernel

    def ops(sass: str) -> str:
        seq = [m.group(0) if not m.group(0).startswith("LDG") else "LDG" for m in re.finditer(PDL_OPS, sass)]
        return " ".join(op for i, op in enumerate(seq) if not (op == "LDG" and i and seq[i - 1] == "LDG"))

    res = {}
    for mode in (0, 1, 2):
        const = dict(BITS=4, GROUP=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, HAS_BIAS=False, EVEN_N=True,
                     EVEN_K=True, PER_CHANNEL=False, FUSED=True, STAGES=1, EMULATE=False, PDL=mode)
        res[f"h2/{mode}"] = ops(compile_sass(_gemv_h2_kernel, const, {"num_warps": 2, "num_stages": 1,
                                                                        "launch_pdl": mode > 0}))
    from qtool_kernels.gemv import _gemv_kernel
    from qtool_kernels.skinny import _skinny_kernel

    for mode in (0, 1):  # the fp32 GEMV and the skinny kernel: wait first
        res[f"gemv/{mode}"] = ops(compile_sass(_gemv_kernel, dict(
            BITS=4, GROUP=128, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, HAS_BIAS=False, EVEN_N=True,
            EVEN_K=True, FUSED=True, STAGES=1, PDL=mode), {"num_warps": 4, "num_stages": 2, "launch_pdl": mode > 0}))
        res[f"skinny/{mode}"] = ops(compile_sass(_skinny_kernel, dict(
            BITS=4, GROUP=128, GPB=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, HAS_BIAS=False, IS_BF16=False,
            EVEN=True, TILE_N=0, TILE_W=0, FUSED=True, SCALE_BLOCK=1, PDL=mode),
            {"num_warps": 2, "num_stages": 3, "launch_pdl": mode > 0}))
    f32 = {"qk_scale": "fp32"}
    for name, fn, const in [("chunk", _chunk_kernel, {"D": 128, "BLOCK_T": 16, "S_P2": 32, "FUSED": True}),
                            ("merge", _merge_kernel, {"D": 128, "S_P2": 16})]:
        for mode in (0, 1):
            sig = {a: "constexpr" if a in const or a == "PDL" else
                   ("*fp16" if a in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else "*i64" if a == "pos_ptr" else
                    "*i32" if a == "cnt_ptr" else
                    "*fp32" if a.endswith("_ptr") else f32.get(a, "i32")) for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs={**const, "PDL": mode})
            sass = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "launch_pdl": mode > 0}).asm["sass"]
            res[f"{name}/{mode}"] = ops(sass)
    print(json.dumps(res))


def main(bits: int) -> None:
    res = {}
    for name, fn, const, opts in cases(bits):
        try:
            sass = compile_sass(fn, const, opts)
            res[name] = dict(Counter(m.group(0) for m in re.finditer(r"\bLDG(STS)?\.E(\.\w+)*", sass)))
            if name.startswith(("gemv", "skinny")):  # the split-K tickets: the ops that order partials and ticket
                res[name]["ordering"] = " ".join(m.group(0) for m in re.finditer(ORDERING_OPS, sass))
        except Exception as e:  # reported per case, so one failure does not hide the others
            cause = e
            while cause.__cause__ or cause.__context__:
                cause = cause.__cause__ or cause.__context__
            res[name] = {"error": f"{type(cause).__name__}: {cause}"[:300]}
    print(json.dumps(res))


if __name__ == "__main__":
    {"occupancy": occupancy, "pdl": pdl}.get(sys.argv[1], lambda: main(int(sys.argv[1])))()
