"""How many programs of a kernel an SM holds at once, and the split-K that fits one wave.

The M = 1 GEMV hides memory latency with programs in flight, not with software pipelining, so
its grid is sized to the SMs' resident slots. A grid a little larger than the slots runs a
second, nearly empty wave: 1,024 programs on 132 SMs × 7 slots (71 registers) is 1.11 waves,
and the last 100 programs run alone. No CUDA here: `resident_programs` takes what the
compiler reported (CompiledKernel.n_regs on a GPU, cuobjdump offline: offline.py), and
`record`/`recorded` keep it per launch signature for the wrappers (gemv.py, skinny.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of compute capability 9.0 (H100/H200; CUDA occupancy calculator)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    warps: int = 64
    programs: int = 32
    shared: int = 233472  # 228 KB of shared memory per SM
    shared_reserved: int = 1024  # taken by the runtime per resident program


SM90 = SMLimits()


def resident_programs(regs: int, num_warps: int, shared: int = 0, sm: SMLimits = SM90) -> int:
    """Programs (CTAs) of `num_warps` warps using `regs` registers per thread and `shared`
    bytes of shared memory that one SM holds at once."""
    per_warp = -(-regs * 32 // sm.reg_unit) * sm.reg_unit
    by_regs = (sm.regs // per_warp) // num_warps
    by_shared = sm.shared // (shared + sm.shared_reserved)
    return max(0, min(by_regs, sm.warps // num_warps, sm.programs, by_shared))


def slots(n_sm: int, programs_per_sm: int, resident: int | None) -> int:
    """Programs one wave may hold: `programs_per_sm` (a tuned cap) per SM, fewer when the
    compiled kernel fits fewer (`resident`, unknown before its first launch)."""
    return n_sm * (min(programs_per_sm, resident) if resident else programs_per_sm)


def split_k_one_wave(n_tiles: int, k_tiles: int, slots: int, cap: int, min_tiles: int = 4) -> int:
    """The largest split-K (≤ cap, ≥ min_tiles K tiles per program) whose grid of n_tiles ×
    split programs fits in one wave of `slots` resident programs; 1 when the row blocks alone
    fill a wave. Every program is equally long, so a grid of P programs takes ceil(P / slots)
    program-times whatever the split: past one wave, more splits only add partial waves and
    per-program work (prologue, row sums, the fp32 partials written and re-read). The split is
    then trimmed so that no K slice is empty (86 tiles in 14 slices of 7 would leave one empty:
    13 slices)."""
    split = max(1, min(cap, slots // max(n_tiles, 1), k_tiles // min_tiles))
    per_split = -(-k_tiles // split)
    return -(-k_tiles // per_split)


def split_k_waves(n_tiles: int, k_tiles: int, slots: int, cap: int, min_tiles: int = 4,
                  min_fill: float = 0.8, waves: int = 3) -> int:
    """split_k_one_wave, unless its one wave would leave more than 1 − min_fill of the slots
    idle (wide layers: many row blocks, few K tiles): then the smallest split that makes
    `waves` waves of shorter programs, if the K tiles allow it. Measured for the half2 GEMV
    under back-to-back calls (2026-11-24): 70B.up W4 g128 (448 row blocks, 1,320 slots) took
    56.4 µs at split 2 (one wave, 68 % full) and 48.3 µs at split 8 (3 waves); 70B.down,
    whose one wave is 97 % full, was slower at every larger split (49.1–52.5 against 46.1 µs)."""
    split = split_k_one_wave(n_tiles, k_tiles, slots, cap, min_tiles)
    if n_tiles * split >= min_fill * slots:
        return split
    many = min(cap, k_tiles // min_tiles, -(-waves * slots // max(n_tiles, 1)))
    if many <= split:
        return split
    per_split = -(-k_tiles // many)
    return -(-k_tiles // per_split)


# launch signature -> programs per SM of the kernel it compiled to, recorded at its first
# launch (registers and shared memory are known only then); later calls size their grid by it.
_RESIDENT: dict[tuple, int] = {}


def recorded(key: tuple) -> int | None:
    """Programs per SM recorded for this launch signature, or None before its first launch."""
    return _RESIDENT.get(key)


def record(key: tuple, compiled: object) -> None:
    """Note how many programs of `compiled` (what a Triton launch returns: n_regs,
    metadata.num_warps, metadata.shared) fit on an SM; a no-op under the interpreter (no
    compiled kernel) or when the count is unknown."""
    regs = getattr(compiled, "n_regs", None)
    meta = getattr(compiled, "metadata", None)
    if regs and meta is not None:
        _RESIDENT[key] = resident_programs(regs, meta.num_warps, meta.shared)
