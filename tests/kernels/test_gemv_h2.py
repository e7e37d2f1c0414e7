"""Packed-half2 GEMV (kernels/gemv_h2.py): M = 1, fp16, W4/W3/W2.

CPU CI cannot run PTX, so it checks the two halves separately: every PTX block is emulated
line by line against the arithmetic it must perform (bit-exact), and the whole kernel runs
under the interpreter with each PTX block replaced by its Triton twin (EMULATE=True), which
checks the indexing, pairing, masks, split-K and prefetch against the float64 reference.
The GPU tests run the real thing and check that the dispatcher takes it.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, fresh_generator, random_packed, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(N: int, K: int, bits: int, group_size: int | None, device: str = "cpu"):
    gen, seed = fresh_generator()
    print(f"seed={seed}")
    qweight, scales, zeros = random_packed(N, K, bits, group_size, gen=gen)
    x = torch.randn(1, K, generator=gen).half()
    return qweight.to(device), scales.to(device), zeros.to(device), x.to(device)


# ------------------------------------------------------------------ PTX emulation (CPU)

def _f16(bits: np.ndarray) -> np.ndarray:
    return (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)


def _bits(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint16).astype(np.int64)


def _h2(fn, *regs):
    lo = fn(*[_f16(r) for r in regs])
    hi = fn(*[_f16(r >> 16) for r in regs])
    return _bits(lo) | (_bits(hi) << 16)


def _prmt(a, b, sel):
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(pool[(sel >> (4 * i)) & 0x7] << (8 * i) for i in range(4))


def run_ptx(asm: str, n_out: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Execute the PTX subset of gemv_h2's blocks on int64 arrays holding 32-bit values."""
    env: dict[str, np.ndarray] = {f"${n_out + i}": np.asarray(v, dtype=np.int64) & 0xFFFFFFFF
                                  for i, v in enumerate(inputs)}

    def val(tok: str):
        tok = tok.strip()
        return env[tok] if tok in env else np.int64(int(tok, 0))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo, hi, src = re.match(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            env[lo], env[hi] = val(src) & 0xFFFF, (val(src) >> 16) & 0xFFFF
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "shr.u32":
            r = val(a[0]) >> val(a[1])
        elif op == "lop3.b32":
            assert int(a[3], 0) == 0xEA  # (a & b) | c
            r = (val(a[0]) & val(a[1])) | val(a[2])
        elif op == "prmt.b32":
            r = _prmt(val(a[0]), val(a[1]), int(a[2], 0))
        elif op == "sub.rn.f16x2":
            r = _h2(lambda p, q: p - q, val(a[0]), val(a[1]))
        elif op == "mul.rn.f16x2":
            r = _h2(lambda p, q: p * q, val(a[0]), val(a[1]))
        elif op == "fma.rn.f16x2":
            r = _h2(lambda p, q, c: p * q + c, val(a[0]), val(a[1]), val(a[2]))
        elif op == "cvt.f32.f16":
            r = _f16(val(a[0])).astype(np.float32).view(np.int32).astype(np.int64)
        elif op == "mov.b32":
            r = val(a[0])
        else:
            raise AssertionError(f"unknown PTX op {op}")
        env[d] = np.asarray(r, dtype=np.int64) & 0xFFFFFFFF
    return [env[f"${i}"] for i in range(n_out)]


def _pair16(b):
    return b | (b << 16)


def _pow2(n):
    return (15 - n) << 10  # fp16 bits of 2^-n


def _field_consts(z, E, fields):
    """(fma addends, multipliers) of fields at bits p (1024 + 2^p q): −(1024·2^-p + z)·2^-E and
    2^-(p+E) as f16x2 patterns, computed here in float64 and converted (the kernel builds them
    with integer ops)."""
    adds = [_pair16(_bits(-(1024.0 * 2.0**-p + z) * 2.0**-E)) for p in fields]
    muls = [np.full(len(z), _pair16(_bits(np.array(2.0 ** -(p + E))))) for p in fields]
    return adds, muls


@pytest.mark.parametrize("bits", [4, 2])
def test_word_ptx_matches_fp16_arithmetic(bits: int) -> None:
    """One word per row through XPAIRS + WORD: bit-exact against t = (q − z)·2^-E (exact),
    acc = fp16(t·x + acc) over the pairs in order, lo and hi halves independent; x up to fp16's
    largest values never overflows a chain of its kernel's length."""
    from qtool_kernels import gemv_h2 as h2

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n, cpw, E = 4096, 32 // bits, h2.PRESCALE_LOG2[bits]
    w = rng.integers(0, 2**32, n, dtype=np.int64)
    z = rng.integers(0, 2**bits, n)
    x = rng.standard_normal((n, cpw)).astype(np.float16) * np.float16(rng.choice([1, 100, 3000], (n, 1)))
    acc0 = rng.standard_normal((n, 2)).astype(np.float16)
    xb = x.view(np.uint16).astype(np.int64)
    r = [xb[:, 2 * m] | (xb[:, 2 * m + 1] << 16) for m in range(cpw // 2)]  # int32 words of x
    pairs = run_ptx(h2.XPAIRS4_ASM if bits == 4 else h2.XPAIRS2_ASM, cpw // 2, r)
    adds, muls = _field_consts(z, E, (0, 4) if bits == 4 else (0, 2, 4, 6))
    (got,) = run_ptx(h2.WORD4_ASM if bits == 4 else h2.WORD2_ASM, 1,
                     [w, _bits(acc0[:, 0].astype(np.float64)) | (_bits(acc0[:, 1].astype(np.float64)) << 16),
                      0x64006400, *adds, *muls, *pairs])

    codes = np.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(cpw)], 1)
    half = cpw // 2
    for h in range(2):  # lo half: codes 0..half-1, hi half: codes half..cpw-1
        a = acc0[:, h].astype(np.float64)
        for i in range(half):
            k = h * half + i
            t = (codes[:, k] - z) * 2.0**-E
            a = (t * x[:, k].astype(np.float64) + a).astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(_f16(got >> (16 * h)), a)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_prescale_keeps_longest_chain_finite(bits: int) -> None:
    """The worst chain the kernel runs (W4 16, W3 and W2 32 products per half, every |q − z| and
    x at their largest, same sign) stays below fp16's 65,504, and 2^-E is the largest power
    of two that does: PRESCALE_LOG2 is neither too small (needless subnormals) nor too large."""
    from qtool_kernels import gemv_h2 as h2

    E, chain = h2.PRESCALE_LOG2[bits], 16 if bits == 4 else 32
    worst = chain * (2**bits - 1) * 65504.0
    assert worst * 2.0**-E <= 65504.0 < worst * 2.0 ** -(E - 1)


def test_block3_ptx_matches_fp16_arithmetic() -> None:
    """One W3 block (32 codes in 3 words) per row through 2 × XPAIRS2 + BLOCK3: bit-exact
    against the fp16 chain over the pairs {c_j, c_j+8} in W3_PAIR_ORDER (lo half: c_j · x_j,
    hi half: c_j+8 · x_j+8), so every code meets its own x exactly once."""
    from qtool_kernels import gemv_h2 as h2

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n, E = 4096, h2.PRESCALE_LOG2[3]
    w = [rng.integers(0, 2**32, n, dtype=np.int64) for _ in range(3)]
    z = rng.integers(0, 8, n)
    x = rng.standard_normal((n, 32)).astype(np.float16) * np.float16(rng.choice([1, 100, 3000], (n, 1)))
    acc0 = rng.standard_normal((n, 2)).astype(np.float16)
    xb = x.view(np.uint16).astype(np.int64)
    r = [xb[:, 2 * m] | (xb[:, 2 * m + 1] << 16) for m in range(16)]
    pairs = run_ptx(h2.XPAIRS2_ASM, 8, r[:8]) + run_ptx(h2.XPAIRS2_ASM, 8, r[8:])
    adds, muls = _field_consts(z, E, (0, 3, 6))
    acc_in = _bits(acc0[:, 0].astype(np.float64)) | (_bits(acc0[:, 1].astype(np.float64)) << 16)
    (got,) = run_ptx(h2.BLOCK3_ASM, 1, [*w, acc_in, 0x64006400, *adds, *muls, *pairs])

    stream = [int(a) | (int(b) << 32) | (int(c) << 64) for a, b, c in zip(*w, strict=True)]
    codes = np.array([[(v >> (3 * j)) & 7 for j in range(32)] for v in stream])
    assert sorted(h2.W3_PAIR_ORDER + tuple(j + 8 for j in h2.W3_PAIR_ORDER)) == list(range(32))
    for h in range(2):
        a = acc0[:, h].astype(np.float64)
        for j in h2.W3_PAIR_ORDER:
            k = j + 8 * h
            t = (codes[:, k] - z) * 2.0**-E
            a = (t * x[:, k].astype(np.float64) + a).astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(_f16(got >> (16 * h)), a)


@pytest.mark.parametrize("E", [7, 8])
def test_constant_encodings(E: int) -> None:
    # bit patterns _consts and the kernel build with integer ops = the fp16 numbers they stand for
    z = np.arange(16)
    f = lambda v: np.asarray(v, dtype=np.float64).astype(np.float16).view(np.uint16).astype(np.int64)  # noqa: E731
    D, s = E * 0x400, 2.0**-E
    assert (f(-(1024 + z) * s) == 0xE400 - D + z).all()
    assert (f(-(256 + z[:4]) * s) == 0xDC00 - D + 4 * z[:4]).all()
    assert (f(-(64 + z) * s) == 0xD400 - D + 16 * z).all()
    assert (f(-(128 + z[:8]) * s) == 0xD800 - D + 8 * z[:8]).all()
    assert (f(-(16 + z[:8]) * s) == 0xCC00 - D + 64 * z[:8]).all()
    assert all(f(2.0**-n) == _pow2(n) for n in range(15))
    from qtool_kernels.gemv_h2 import pow2_f16

    assert all(pow2_f16(n) == _pow2(n) for n in range(15))


def test_unpack_ptx() -> None:
    from qtool_kernels import gemv_h2 as h2

    v = np.array([1.5, -2.25, 65504.0, 3e-5], dtype=np.float16)
    reg = _bits(v[:2]) | (_bits(v[2:]) << 16)
    lo, hi = run_ptx(h2.UNPACK_ASM, 2, [reg])
    assert (lo.astype(np.uint32).view(np.float32) == v[:2].astype(np.float32)).all()
    assert (hi.astype(np.uint32).view(np.float32) == v[2:].astype(np.float32)).all()


# ------------------------------------------------------------------ interpreter (CPU)

INTERP = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU CI)")

# (bits, group, N, K, config): partial N tiles, K tails (K % BLOCK_K), empty splits; PREFETCH:
# the next tile's words and zeros read a trip ahead (gated off past the program's last tile).
CASES = [
    (4, 128, 80, 576, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "PREFETCH": 1}),  # last group 64 codes
    (4, 128, 64, 1024, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1}),  # even: unmasked loads
    (4, 64, 48, 1088, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 8, "PREFETCH": 1}),  # 17 tiles / 8 splits: 2 empty
    (4, 32, 40, 576, {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 4}),
    (4, None, 80, 576, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1}),
    (2, 64, 80, 576, {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}),
    (2, 128, 48, 1088, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4}),  # last group 64 codes
    (2, None, 40, 1024, {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 3, "PREFETCH": 1}),  # 4 tiles: one split empty
    # tiles over several groups (one scale per quad); K = 576: the last tile's quads past K
    # would index group 18 and 19 of 18
    (4, 32, 40, 576, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2}),
    (2, 64, 48, 1088, {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 3, "PREFETCH": 1}),
    # W3: units of 128 codes (12 words); rows of whole quads need K % 128 = 0, so the K tails
    # are tiles of 2 or 4 units with the last one(s) past K
    (3, 128, 80, 640, {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2, "PREFETCH": 1}),  # 2 groups per tile, tail
    (3, 64, 48, 1152, {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 3}),  # 2 groups per unit
    (3, 32, 40, 640, {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "PREFETCH": 1}),  # 4 groups per unit, tail
    (3, None, 64, 1152, {"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 2}),
]

# (bits, group, N, K, BLOCK_N, BLOCK_K, SPLIT_K, tile-major scales): tile-major codes (tiles.py)
TILED_CASES = [
    (4, 128, 128, 1024, 64, 128, 2, True),
    (4, 128, 64, 512, 32, 128, 1, False),
    (4, None, 64, 512, 32, 128, 3, True),
    (4, 64, 64, 512, 64, 128, 2, True),  # 2 groups per tile
    (4, 32, 32, 256, 32, 128, 1, False),  # 4 groups per tile
    (2, 64, 64, 1024, 64, 128, 4, True),  # 2 groups per tile
    (2, 128, 64, 512, 32, 128, 2, False),
    (2, None, 32, 1024, 32, 256, 1, True),
    (3, 128, 128, 1024, 64, 128, 2, True),
    (3, 64, 64, 1024, 64, 128, 1, False),
    (3, None, 64, 512, 32, 128, 3, True),
    (3, 32, 32, 768, 32, 256, 2, True),
]


@INTERP
@pytest.mark.parametrize(("bits", "group_size", "N", "K", "cfg"), CASES)
def test_h2_emulated_interpreter(bits: int, group_size: int | None, N: int, K: int, cfg: dict) -> None:
    from qtool_kernels.gemv_h2 import gemv_h2_matmul

    qweight, scales, zeros, x = _inputs(N, K, bits, group_size)
    bias = torch.randn(N).half() if cfg["SPLIT_K"] == 1 else None
    out = torch.full((1, N), float("nan"), dtype=torch.float16)
    ws = torch.full((cfg["SPLIT_K"], 1, N), float("nan"))
    y = gemv_h2_matmul(x, qweight, scales, zeros, bits, group_size, bias, config=dict(cfg, H2=True, num_warps=4),
                       out=out, workspace=ws, emulate=True)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    assert rel_err(y, ref) < TOL[torch.float16]


@INTERP
@pytest.mark.parametrize(("bits", "group_size", "N", "K", "BN", "BK", "SK", "tiled_scales"), TILED_CASES)
def test_h2_emulated_tile_major(bits, group_size, N, K, BN, BK, SK, tiled_scales) -> None:
    """Tile-major codes (and scales) through the block/tile strides, fused split-K included."""
    from qtool_kernels.gemv_h2 import gemv_h2_matmul
    from qtool_kernels.tiles import groups_tile_major, tile_major

    qweight, scales, zeros, x = _inputs(N, K, bits, group_size)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size)
    q = tile_major(qweight, BN, BK, bits)
    s, z = (groups_tile_major(scales, BN), groups_tile_major(zeros, BN)) if tiled_scales else (scales, zeros)
    cfg = {"H2": True, "BLOCK_N": BN, "BLOCK_K": BK, "SPLIT_K": SK, "num_warps": 4, "STAGES": 2,
           "PREFETCH": int(tiled_scales)}
    y = gemv_h2_matmul(x, q, s, z, bits, group_size, config=cfg, emulate=True)
    assert y.shape == (1, N) and rel_err(y, ref) < TOL[torch.float16]
    with pytest.raises(AssertionError, match="tile-major"):  # a config whose tile is not the layout's
        gemv_h2_matmul(x, q, s, z, bits, group_size, config=dict(cfg, BLOCK_N=BN // 2), emulate=True)


@INTERP
def test_h2_emulated_large_activations() -> None:
    # a few channels of x in the thousands (down_proj inputs): t = (q − z)·2^-E keeps the
    # fp16 chains inside the fp16 range
    from qtool_kernels.gemv_h2 import gemv_h2_matmul

    qweight, scales, zeros, x = _inputs(32, 512, 4, 128)
    x[0, ::61] = 3000.0
    cfg = {"H2": True, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}
    y = gemv_h2_matmul(x, qweight, scales, zeros, 4, 128, config=cfg, emulate=True)
    assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, 4, 128)) < TOL[torch.float16]


def test_cpu_dispatch_never_takes_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU/interpreter the fp32 kernel runs and the PTX module is never imported by it."""
    from qtool_kernels.gemv import gemv_path

    qweight, scales, zeros, x = _inputs(32, 256, 4, 128)
    monkeypatch.setenv("QTOOL_GEMV_H2", "1")  # even when asked for
    assert gemv_path(x, qweight, 4, 128) == "fp32"
    if os.environ.get("TRITON_INTERPRET") == "1":
        had = "qtool_kernels.gemv_h2" in sys.modules
        sys.modules.pop("qtool_kernels.gemv_h2", None)
        y = qk.gemv_matmul(x, qweight, scales, zeros, 4, 128)
        assert "qtool_kernels.gemv_h2" not in sys.modules
        assert rel_err(y, qk.reference_gemv(x, qweight, scales, zeros, 4, 128)) < TOL[torch.float16]
        if had:
            import qtool_kernels.gemv_h2  # noqa: F401  (restore for later tests)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, 64), (4, 32), (4, None), (2, 64), (2, 128), (2, None),
                                                 (3, 128), (3, 64), (3, None)])
def test_default_h2_config(bits: int, group_size: int | None) -> None:
    from qtool_kernels.gemv import default_h2_config, h2_unit_codes

    for N, K in [(8192, 28672), (28672, 8192), (1536, 576), (11008, 4096)]:
        cfg = default_h2_config(N, K, bits, group_size, 132)
        bk, cpq = cfg["BLOCK_K"], h2_unit_codes(bits)
        assert cfg["H2"] and bk % cpq == 0 and (bk // cpq) & (bk // cpq - 1) == 0
        # a tile within one group, but W3's 128-code unit, whose blocks of 32 take their own
        assert group_size is None or group_size % bk == 0 or (bits == 3 and bk == cpq)
        assert cfg["BLOCK_N"] % (32 // (bk // cpq) * cfg["num_warps"]) == 0  # whole rows per thread
        assert 1 <= cfg["SPLIT_K"] <= 32


def test_shipped_h2_classes() -> None:
    """The classes measured faster with the half2 kernel (§v11, W3 §v12) route to it; W3 with
    one row per thread (4 warps on its 128-row tile for large layers, 2 on 64 rows)."""
    from qtool_kernels.gemv import _tiled_entry

    for bits, g in [(4, 128), (4, None), (4, 64), (2, 64), (2, 128), (2, None), (3, 128), (3, 64), (3, None)]:
        for N, K in [(8192, 28672), (4096, 11008), (4096, 4096)]:
            assert isinstance(_tiled_entry(bits, g, N, K).get("H2"), dict), (bits, g, N, K)
    for g in (128, 64):
        for N, K in [(8192, 28672), (28672, 8192), (4096, 11008)]:
            e = _tiled_entry(3, g, N, K)
            assert e["BLOCK_N"] // (32 * e["H2"]["num_warps"]) == 1, (g, N, K)


def test_h2_tiled_entry_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tile-major weights follow their gemv_tiled entry's "H2" (its large part for large
    layers); the tile comes from the layout and the entry's warps, stages and cap apply."""
    import qtool_kernels.gemv as gemv

    tuned = {"gemv_tiled": {"4:128:1": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "programs_per_sm": 16,
                                        "min_k_tiles": 2,
                                        "large": {"min_codes": 1 << 27, "num_warps": 4, "STAGES": 3,
                                                  "H2": {"num_warps": 2, "STAGES": 2}}}}}
    monkeypatch.setattr(gemv, "_tuned", lambda: tuned)
    assert not gemv._tiled_entry(4, 128, 4096, 4096).get("H2")
    assert gemv._tiled_entry(4, 128, 8192, 28672)["H2"]
    cfg = gemv.default_h2_config(8192, 28672, 4, 128, 132, {"BLOCK_N": 64, "BLOCK_K": 128}, tiled=True, resident=12)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["STAGES"]) == (64, 128, 2, 2)
    assert 128 * cfg["SPLIT_K"] <= 12 * 132  # one wave of the resident programs
    tuned["gemv_tiled"]["4:128:1"]["large"]["H2"]["maxnreg"] = 64  # passed on to the launch
    tile = {"BLOCK_N": 64, "BLOCK_K": 128}
    assert gemv.default_h2_config(8192, 28672, 4, 128, 132, tile, tiled=True)["maxnreg"] == 64
    # on the CPU the fp32 kernel runs whatever the entry says
    qweight, scales, zeros, x = _inputs(64, 256, 4, 128)
    assert gemv.gemv_path(x, qweight.reshape(1, 2, 64, 16), 4, 128) == "fp32"


# ------------------------------------------------------------------ GPU

# Outlier activations for the decode-route tests. With unit-variance weights, 44 channels of
# 2000 put the largest of 4096 outputs at ~57,000–62,000, and now and then past fp16's
# 65,504: the reference itself was then not representable (two GPU runs on 2026-11-23).
# 1000 keeps the outputs ~2× inside the range; _check_range says so for every draw.
OUTLIER = 1000.0


def _check_range(ref: torch.Tensor) -> None:
    assert ref.abs().max() < 6e4, "test data: the exact output does not fit fp16"


GPU_CASES = [  # (bits, group, N, K, split): split None = default config
    (4, 128, 8192, 4160, None), (4, 128, 1536, 576, 1), (4, 64, 1536, 4160, None), (4, None, 8192, 576, 4),
    (4, 32, 1536, 576, None), (2, 64, 8192, 576, None), (2, 64, 1536, 4160, 1), (2, 128, 8192, 4160, None),
    (2, None, 1536, 4160, 8),
    # W3: rows of whole quads need K % 128 = 0; K = 4224 is 33 units
    (3, 128, 8192, 4224, None), (3, 64, 1536, 4224, 1), (3, 32, 1536, 1152, None), (3, None, 8192, 1152, 4),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("bits", "group_size", "N", "K", "split"), GPU_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_h2_gpu(bits, group_size, N, K, split, bias) -> None:
    from qtool_kernels.gemv import default_h2_config, gemv_path

    qweight, scales, zeros, x = _inputs(N, K, bits, group_size, device="cuda")
    assert gemv_path(x, qweight, bits, group_size, {"H2": True}) == "h2"
    b = torch.randn(N, device="cuda").half() if bias else None
    cfg = default_h2_config(N, K, bits, group_size, torch.cuda.get_device_properties(0).multi_processor_count)
    if split is not None:
        cfg["SPLIT_K"] = split
    out = torch.full((1, N), float("nan"), dtype=torch.float16, device="cuda")
    ws = torch.full((cfg["SPLIT_K"], 1, N), float("nan"), device="cuda")
    y = qk.gemv_matmul(x, qweight, scales, zeros, bits, group_size, b, config=cfg, out=out, workspace=ws)
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, b)
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.gpu
@needs_cuda
def test_h2_gpu_dispatch_and_ab(monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantLinear's route: M = 1 fp16 W4 takes h2 only with QTOOL_GEMV_H2=1 (fp32 scales too,
    as PEQA passes them); QTOOL_GEMV_H2=0, bf16, M = 2 and W2 g32 take the fp32 kernel; both agree."""
    from qtool_kernels.gemv import gemv_path

    N, K = 4096, 4096
    qweight, scales, zeros, x = _inputs(N, K, 4, 128, device="cuda")
    x[0, ::97] = OUTLIER  # a few outlier channels, as in down_proj inputs
    assert gemv_path(x, qweight, 4, 128) == "fp32"  # opt-in: slower than fp32 on the H100
    monkeypatch.setenv("QTOOL_GEMV_H2", "1")
    assert gemv_path(x, qweight, 4, 128) == "h2"
    a = qk.forward_packed(x, qweight, scales.float(), zeros, 4, 128, None)
    monkeypatch.setenv("QTOOL_GEMV_H2", "0")
    assert gemv_path(x, qweight, 4, 128) == "fp32"
    b = qk.forward_packed(x, qweight, scales.float(), zeros, 4, 128, None)
    monkeypatch.setenv("QTOOL_GEMV_H2", "1")
    ref = qk.reference_gemv(x, qweight, scales.float(), zeros, 4, 128)
    _check_range(ref)
    assert rel_err(a, ref) < TOL[torch.float16] and rel_err(b, ref) < TOL[torch.float16]
    assert gemv_path(x.bfloat16(), qweight, 4, 128) == "fp32"
    assert gemv_path(torch.cat([x, x]), qweight, 4, 128) == "fp32"
    assert gemv_path(x, qweight, 3, 128) == "h2"  # W3 since §v12 (same word count here)
    assert gemv_path(x, qweight, 2, 32) == "fp32"  # a W2 g32 tile is half a quad of words


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, None), (4, 64), (2, 64), (2, 128), (3, 128),
                                                 (3, 64), (3, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_h2_gpu_tile_major(monkeypatch: pytest.MonkeyPatch, bits: int, group_size: int | None, bias: bool) -> None:
    """The decode route: tile_major_layout with an "H2" gemv_tiled entry, default config
    (one-wave split, fused split-K), against the reference and the fp32 kernel."""
    import qtool_kernels.gemv as gemv
    from qtool_kernels.gemv import gemv_path
    from qtool_kernels.tiles import groups_tile_major, tile_major

    N, K = 4096, 4224  # 33 K tiles of 128
    qweight, scales, zeros, x = _inputs(N, K, bits, group_size, device="cuda")
    x[0, ::97] = OUTLIER
    b = torch.randn(N, device="cuda").half() if bias else None
    ref = qk.reference_gemv(x, qweight, scales, zeros, bits, group_size, b)
    _check_range(ref)
    key = f"{bits}:{group_size or 'pc'}:1"
    entry = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 2, "programs_per_sm": 16, "min_k_tiles": 2,
             "H2": {"num_warps": 2 if bits == 3 else 4}}  # W3: a thread per row and unit
    tuned = dict(gemv._tuned(), gemv_tiled={key: entry})
    monkeypatch.setattr(gemv, "_tuned", lambda: tuned)
    monkeypatch.delenv("QTOOL_GEMV_H2", raising=False)
    q = tile_major(qweight, 64, 128, bits)
    s, z = groups_tile_major(scales, 64), groups_tile_major(zeros, 64)
    assert gemv_path(x, q, bits, group_size) == "h2"
    y = qk.gemv_matmul(x, q, s, z, bits, group_size, b)
    y2 = qk.gemv_matmul(x, q, s, z, bits, group_size, b)  # second call: split sized by residency
    monkeypatch.setenv("QTOOL_GEMV_H2", "0")
    assert gemv_path(x, q, bits, group_size) == "fp32"
    f = qk.gemv_matmul(x, q, s, z, bits, group_size, b)
    for out in (y, y2, f):
        assert rel_err(out, ref) < TOL[torch.float16]
