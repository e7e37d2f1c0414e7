"""Decode path: y = x · Ŵᵀ for few rows of x (M ≤ 64), dequantizing packed codes on the fly.

Shapes: x [M, K] fp16/bf16, qweight int32 [N, ceil(K/32)·b], scales [N, G] (any float
dtype), zeros uint8 [N, G], bias [N] or None -> y [M, N] in x's dtype.

Each program owns BLOCK_N output channels and a slice of K (split-K). Per K tile it
unpacks the codes once, turns them into exact fp16/bf16 integers and runs a tensor-core
product against xᵀ padded to BLOCK_M columns (the padding costs nothing: a GEMV is bound
by the weight bytes, and the tensor cores take the multiply-adds off the ALUs, which are
busy unpacking). When a K tile lies inside one group, the zero-point is subtracted
per element in fp16/bf16 (exact: integers) and the fp32 scale multiplies the tile's
partial sums, Σ_k s (q − z) x = s · Σ_k (q − z) x, so no per-element multiply by s.
When a tile spans several groups (g < BLOCK_K) each element is dequantized,
s·(q − z) rounded once to fp16/bf16, and the product accumulates in the MMA itself.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl
from qtool_kernels import occupancy
from qtool_kernels._unpack import code_offset, pairs4_consts, pairs4_tile, pairs4_x, unpack_tile, word_ptrs
from qtool_kernels.occupancy import slots, split_k_one_wave
from qtool_kernels.pdl import pdl_mode, pdl_wait
from qtool_kernels.tickets import fused_split_k, store_nm_tile, tickets
from torch import Tensor

PER_CHANNEL = 1 << 30  # GROUP constexpr meaning "one group spans all of K"


@triton.jit
def _per_word(t, BLOCK_N: tl.constexpr, BW: tl.constexpr):
    """[BLOCK_N, GPB] per-group values -> [BLOCK_N, BW] per word (a broadcast: no arithmetic)."""
    GPB: tl.constexpr = t.shape[1]
    return tl.reshape(tl.broadcast_to(t[:, :, None], [BLOCK_N, GPB, BW // GPB]), [BLOCK_N, BW])


@triton.jit
def _pairs_step(acc, qw_ptr, offs_n, n_mask, k0, Wn, stride_qn, xt, s_row, z_row, stride_sg, stride_zg, G,
                GROUP: tl.constexpr, GPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, IS_BF16: tl.constexpr, EVEN: tl.constexpr, TILE_N: tl.constexpr,
                TILE_W: tl.constexpr, DEQUANT: tl.constexpr, EMULATE: tl.constexpr):
    """One W4 K tile through _unpack.pairs4_tile: the codes and x in the same permuted K order.

    A tile inside one group has its partial sums scaled in fp32 unless DEQUANT: then, as when
    it spans groups, each element is dequantized (s·(q − z), one rounding) and the MMA
    accumulates into acc directly, which frees the registers of a second [BN, BM] fp32 tile
    (more programs per SM with large tiles: §v14)."""
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    BW: tl.constexpr = BLOCK_K // 8
    wl = tl.arange(0, BW)
    ptrs = word_ptrs(qw_ptr, offs_n, k0 // 8, wl, stride_qn, Wn, TILE_N, TILE_W)
    if EVEN:
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=n_mask[:, None] & ((k0 // 8 + wl)[None, :] < Wn), other=0)
    xp = tl.trans(pairs4_x(xt, BLOCK_M, BLOCK_K))
    if GPB == 1 and not DEQUANT:
        g = k0 // GROUP
        s = tl.load(s_row + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        zq = tl.load(z_row + g * stride_zg, mask=n_mask, other=0)
        add_a, add_b, s2 = pairs4_consts(zq, s.to(DT), IS_BF16)
        z = zq.to(tl.float32)  # read by the emulation only
        v = pairs4_tile(w, _per_word(z[:, None], BLOCK_N, BW), w, _per_word(add_a[:, None], BLOCK_N, BW),
                        _per_word(add_b[:, None], BLOCK_N, BW), w, BLOCK_N, BLOCK_K, IS_BF16, False, EMULATE)
        acc += s[:, None] * tl.dot(v, xp)  # Σ (q − z) x, exact products, scaled in fp32
    else:
        # each word lies in one group (a group is ≥ 32 codes): its scale and zero, per word
        # a tile inside one group loads its scale and zero as two equal groups ([BN, 2], g64's
        # shape): ptxas then gives the 128 × 128 tile 146 registers instead of 192 (§v15)
        GPL: tl.constexpr = 2 if GPB == 1 else GPB
        gi = k0 // GROUP + tl.arange(0, GPL) * GPB // GPL
        sz_mask = n_mask[:, None] & (gi[None, :] < G)
        sd = tl.load(s_row[:, None] + gi[None, :] * stride_sg, mask=sz_mask, other=0.0).to(DT)
        zq = tl.load(z_row[:, None] + gi[None, :] * stride_zg, mask=sz_mask, other=0)
        add_a, add_b, s2 = pairs4_consts(zq, sd, IS_BF16)
        s, z = sd.to(tl.float32), zq.to(tl.float32)  # read by the emulation only
        v = pairs4_tile(w, _per_word(z, BLOCK_N, BW), _per_word(s, BLOCK_N, BW), _per_word(add_a, BLOCK_N, BW),
                        _per_word(add_b, BLOCK_N, BW), _per_word(s2, BLOCK_N, BW), BLOCK_N, BLOCK_K, IS_BF16, True,
                        EMULATE)  # (q − z)·s, one rounding
        acc = tl.dot(v, xp, acc)
    return acc


@triton.jit
def _skinny_kernel(
    # pointers
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    # sizes
    M, N, K, Wn, G,
    # strides (elements)
    stride_xm, stride_qn, stride_sb, stride_sg, stride_sn, stride_zb, stride_zg, stride_zn,
    stride_os, stride_om, stride_ym,
    # meta
    BITS: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, EVEN: tl.constexpr,
    TILE_N: tl.constexpr = 0, TILE_W: tl.constexpr = 0, FUSED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 1,
    PDL: tl.constexpr = 0, PAIRS: tl.constexpr = 0, DEQUANT: tl.constexpr = False,
):
    # PAIRS (W4): 0 unpack_tile; 1 the tile in register pairs (_unpack.pairs4_tile, PTX);
    # 2 the same in Triton ops (the interpreter); DEQUANT: see _pairs_step
    if PDL > 0:  # launched early (pdl.py): wait for the kernel before, then let the next launch
        pdl_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    GS: tl.constexpr = BLOCK_K // GPB  # codes of one group inside a tile
    OFF: tl.constexpr = code_offset(IS_BF16, BITS)  # unpack_tile returns o + q
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    # scales/zeros (n, g) at (n // SCALE_BLOCK)·stride_b + g·stride_g + (n % SCALE_BLOCK)·stride_n:
    # row-major [N, G] (SCALE_BLOCK = 1) or tile-major [N / SCALE_BLOCK, G, SCALE_BLOCK]
    s_row = s_ptr + (offs_n // SCALE_BLOCK) * stride_sb + (offs_n % SCALE_BLOCK) * stride_sn
    z_row = z_ptr + (offs_n // SCALE_BLOCK) * stride_zb + (offs_n % SCALE_BLOCK) * stride_zn

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
        if PAIRS > 0:
            acc = _pairs_step(acc, qw_ptr, offs_n, n_mask, k0, Wn, stride_qn, xt, s_row, z_row, stride_sg,
                              stride_zg, G, GROUP, GPB, BLOCK_M, BLOCK_N, BLOCK_K, IS_BF16, EVEN, TILE_N, TILE_W,
                              DEQUANT, PAIRS == 2)
        else:
            v = unpack_tile(qw_ptr, offs_n, n_mask, k0, Wn, stride_qn, BITS, BLOCK_N, BLOCK_K, IS_BF16,
                            not EVEN, TILE_N, TILE_W)  # [BN, BK] o + q, exact
            if GPB == 1:
                # One group per tile: subtract o + z exactly in fp16/bf16 (integers), apply the
                # fp32 scale to the tile's partial sums.
                g = k0 // GROUP
                s = tl.load(s_row + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
                zo = (tl.load(z_row + g * stride_zg, mask=n_mask, other=0).to(tl.float32) + OFF).to(DT)
                p = tl.dot(v - zo[:, None], tl.trans(xt))  # [BN, BM] Σ (q − z) x
                acc += s[:, None] * p
            else:
                # Several groups per tile: dequantize per element (one rounding to fp16/bf16).
                gi = k0 // GROUP + tl.arange(0, GPB)
                sz_mask = n_mask[:, None] & (gi[None, :] < G)
                s = tl.load(s_row[:, None] + gi[None, :] * stride_sg, mask=sz_mask, other=0.0).to(DT)
                z = tl.load(z_row[:, None] + gi[None, :] * stride_zg, mask=sz_mask, other=0)
                zo = (z.to(tl.float32) + OFF).to(DT)
                v3 = tl.reshape(v, [BLOCK_N, GPB, GS])
                w = tl.reshape((v3 - zo[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K])
                acc = tl.dot(w, tl.trans(xt), acc)

    store_nm_tile(out_ptr, y_ptr, cnt_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, pid_n, pid_k, pid_m,
                  stride_os, stride_om, stride_ym, SPLIT_K, HAS_BIAS, FUSED)


def group_constexpr(group_size: int | None) -> int:
    return PER_CHANNEL if group_size is None else group_size


TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned_skinny.json")


@functools.lru_cache(maxsize=1)
def _tuned() -> dict:
    """Per-bit-width tile choices written by `python -m qtool.bench.sweep --write` (H100)."""
    try:
        with open(TUNED_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def default_config(M: int, N: int, K: int, bits: int, group_size: int | None, n_sm: int,
                   resident: int | None = None) -> dict:
    """Tile sizes for the skinny kernel.

    Defaults: 64 rows × 128 codes per tile, 4 warps, 3 pipeline stages (the v1 sweep's
    winner at every decode shape); tuned_skinny.json overrides them per bit-width ("4") and
    then per class ("skinny" → "bits:group", "pc" = per channel). With ≤ 2 warps Triton
    lowers tl.dot to mma.sync fed from registers instead of wgmma through shared memory:
    measured faster where a tile lies inside one group (W4 g128 at M = 16, 70B.down: 103.9 →
    78.4 µs), slower where each element is dequantized (W2 g64: 80.9 → 114 µs; §v10).
    K is split into as many slices as fit in one wave of `programs_per_sm` (8) programs per
    SM, or of `resident` (how many the compiled kernel fits: 4 for the 64 × 128 W4 tile of 4
    warps for sm_90, 114 registers) when fewer, keeping at least 4 K tiles per program, so
    every SM has several tiles of loads in flight and no second, partial wave
    (occupancy.split_k_one_wave). A class entry may hold a "large" entry for layers of at
    least "min_codes" codes (70B.down W4 g128 takes 256 × 128 with DEQUANT: §v14), and
    "PAIRS" / "DEQUANT" / "maxnreg" keys, passed through.
    """
    t = dict(_tuned().get(str(bits), {}))
    e = dict(_tuned().get("skinny", {}).get(f"{bits}:{group_size or 'pc'}", {}))
    large = e.pop("large", None)
    t.update(e)
    if large and N * K >= large["min_codes"]:  # a layer this large has its own entry
        t.update({k: v for k, v in large.items() if k != "min_codes"})
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n, block_k = t.get("BLOCK_N", 64), t.get("BLOCK_K", 128)
    if group_size is not None and group_size < block_k and block_m > 16:
        block_k = 128  # per-element dequantization with a wide x tile: keep shared memory small
    n_tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, block_k)
    wave = slots(n_sm, t.get("programs_per_sm", 8), resident)
    split_k = t.get("SPLIT_K") or split_k_one_wave(n_tiles, k_tiles, wave, t.get("max_split", 8))
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
           "num_warps": t.get("num_warps", 4), "num_stages": t.get("num_stages", 3), "PAIRS": t.get("PAIRS", True),
           "DEQUANT": t.get("DEQUANT", False)}
    if t.get("maxnreg"):  # ptxas's register cap: more programs per SM
        cfg["maxnreg"] = t["maxnreg"]
    return cfg


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def skinny_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
    config: dict | None = None,
    out: Tensor | None = None,
    workspace: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] · Ŵᵀ with Ŵ = s·(q − z) from the packed layout.

    scales, zeros: [N, G], or tile-major [N / B, G, B] (tiles.groups_tile_major, any B that
    is a power of two). `out` [M, N] (x's dtype) receives y; `workspace` [SPLIT_K, M, N] fp32 holds the split-K
    partials, added up by the kernel's last program per block (split_k_buffers; with
    QTOOL_FUSED_SPLIT_K=0 by two more kernels, and `out` is used only when K is not split).
    Both are allocated when not given. qweight may be tile-major (tiles.py).
    """
    from qtool_kernels.tiles import fit_block_k, packed_geometry

    M, K = x.shape
    N, Wn, TN, TW = packed_geometry(qweight)
    G = scales.shape[1]
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert x.stride(1) == 1 and qweight.stride(-1) == 1 and (TN == 0 or qweight.is_contiguous())
    if scales.dim() == 3:  # tile-major [N / B, G, B]
        assert zeros.shape == scales.shape and scales.shape[2] & (scales.shape[2] - 1) == 0
        SB = scales.shape[2]
        s_strides, z_strides = scales.stride(), zeros.stride()
    else:
        assert scales.stride(1) == 1 and zeros.stride(1) == 1
        SB, s_strides, z_strides = 1, (scales.stride(0), 1, 0), (zeros.stride(0), 1, 0)
    sig = ("skinny", x.dtype, tuple(qweight.shape), bits, group_size, scales.dim(), bias is not None, M)
    resident = occupancy.recorded(sig)
    cfg = dict(config or default_config(M, N, K, bits, group_size, _num_sms(x.device), resident))
    BM, BN, BK, SK = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("SPLIT_K")
    BK = fit_block_k(BK, bits, TW)
    # W4 in register pairs (pairs4_tile): PTX on the GPU, the same arithmetic in Triton ops
    # under the interpreter; config "PAIRS": False restores unpack_tile (A/B runs)
    pairs = 0 if not cfg.pop("PAIRS", True) or bits != 4 else (2 if interpreting() else 1)
    dequant = bool(cfg.pop("DEQUANT", False))
    GROUP = group_constexpr(group_size)
    if GROUP < BK:
        gpb = BK // GROUP
    else:
        assert GROUP % BK == 0, "a tile must not straddle two groups"
        gpb = 1
    grid = (triton.cdiv(N, BN), SK, triton.cdiv(M, BM))
    out, stride_os, y, counters, fused = split_k_buffers(x, M, N, SK, grid[0] * grid[2], out, workspace)
    pdl = min(pdl_mode(x.device), 1)
    compiled = _skinny_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, y, counters,
        M, N, K, Wn, G,
        x.stride(0), qweight.stride(0), *s_strides, *z_strides, stride_os, out.stride(-2), y.stride(0),
        BITS=bits, GROUP=GROUP, GPB=gpb, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        SPLIT_K=SK, HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16,
        EVEN=(N % BN == 0) and (K % BK == 0), TILE_N=TN, TILE_W=TW, FUSED=fused, SCALE_BLOCK=SB,
        PDL=pdl, PAIRS=pairs, DEQUANT=dequant, launch_pdl=pdl > 0, **cfg,
    )
    if config is None and resident is None:
        occupancy.record(sig, compiled)
    return y if fused else split_k_result(out, SK, bias, x.dtype)


def split_k_output(x: Tensor, M: int, N: int, SK: int, out: Tensor | None, workspace: Tensor | None
                   ) -> tuple[Tensor, int]:
    """The buffer a skinny kernel writes: Y itself (SK = 1), or fp32 partial sums [SK, M, N]
    reduced afterwards by `split_k_result` (no atomics, so the sum order is fixed)."""
    if SK == 1:
        if out is None:
            out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(1) == 1
        return out, 0
    out = workspace
    if out is None:
        out = torch.empty(SK, M, N, dtype=torch.float32, device=x.device)
    assert out.shape == (SK, M, N) and out.dtype == torch.float32 and out.is_contiguous()
    return out, out.stride(0)


def split_k_buffers(x: Tensor, M: int, N: int, SK: int, n_blocks: int, out: Tensor | None,
                    workspace: Tensor | None) -> tuple[Tensor, int, Tensor, Tensor, bool]:
    """(buffer the kernel stores to, its split stride, y, ticket counters, fused). With K split
    and fused_split_k(), the kernel's last program per output block (n_blocks of them) adds
    the partials into y (`out`, or a new [M, N] in x's dtype) using zeroed counters from
    tickets.py; otherwise y and the counters are the store buffer itself (unused by the
    kernel) and `split_k_result` finishes."""
    fused = SK > 1 and fused_split_k()
    y = out
    if fused:
        if y is None:
            y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        assert y.shape == (M, N) and y.dtype == x.dtype and y.stride(1) == 1
        counters = tickets(x.device, n_blocks)
        out = None
    buf, stride_os = split_k_output(x, M, N, SK, out, workspace)
    if not fused:
        y = counters = buf
    return buf, stride_os, y, counters, fused


def split_k_result(out: Tensor, SK: int, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Y from `split_k_output`'s buffer: the partial sums added in fp32, then the bias, one rounding."""
    if SK == 1:
        return out
    y = out.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(dtype)


def reference_skinny(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
) -> Tensor:
    """float64 x · Ŵᵀ (+ bias): what `skinny_matmul` computes, without rounding."""
    from qtool.quant.grid import dequantize
    from qtool.quant.pack import unpack

    K = x.shape[1]
    from qtool_kernels.tiles import as_row_major

    W = dequantize(unpack(as_row_major(qweight), bits, K), scales.double(), zeros, group_size)
    y = x.double() @ W.T
    if bias is not None:
        y = y + bias.double()
    return y
