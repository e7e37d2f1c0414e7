"""Occupancy arithmetic (kernels/occupancy.py) and how the GEMV sizes its grid with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from qtool_kernels import gemv, occupancy
from qtool_kernels.occupancy import resident_programs, split_k_one_wave, split_k_waves


@pytest.mark.parametrize(("regs", "warps", "shared", "expected"), [
    (63, 4, 1024, 8),  # 64 registers a thread after rounding: 2,048 a warp, 32 warps
    (71, 4, 1024, 7),  # 72 -> 2,304 a warp: 28 warps
    (56, 4, 1024, 9),
    (168, 4, 0, 3),
    (255, 4, 0, 2),
    (32, 4, 0, 16),  # the warp limit (64 a SM)
    (16, 1, 0, 32),  # the program limit (32 a SM)
    (32, 4, 100_000, 2),  # shared memory: 228 KB over 100 KB + 1 KB reserved each
])
def test_resident_programs(regs: int, warps: int, shared: int, expected: int) -> None:
    assert resident_programs(regs, warps, shared) == expected


def test_split_fits_one_wave() -> None:
    # 70B.down W4 g128 64 x 128 tiles: 128 row blocks x 224 K tiles
    assert split_k_one_wave(128, 224, 132 * 8, 16) == 8  # 1,024 programs on 1,056 slots
    assert split_k_one_wave(128, 224, 132 * 7, 16) == 7  # not 8: 1,024 on 924 slots is 1.11 waves
    # the row blocks alone fill more than a wave: no split
    assert split_k_one_wave(1792, 28, 132 * 4, 16) == 1
    # at least min_tiles K tiles per program
    assert split_k_one_wave(64, 32, 132 * 8, 16) == 8
    # 7B.down: 86 K tiles; 14 slices of 7 tiles would leave the 14th empty -> 13
    assert split_k_one_wave(64, 86, 132 * 7, 16) == 13


def test_split_spreads_a_mostly_idle_wave() -> None:
    # 70B.up W4 g128 (448 row blocks x 64 K tiles, 1,320 slots): one wave would be split 2,
    # 896 programs (68 %); three waves of shorter programs instead: split 9 -> slices of 8 -> 8
    assert split_k_one_wave(448, 64, 1320, 32, 2) == 2
    assert split_k_waves(448, 64, 1320, 32, 2) == 8
    # a full enough wave stays: 70B.down (97 %), 7B.down (87 %), W2 g64 70B.up (85 %)
    assert split_k_waves(128, 224, 1188, 32, 2) == split_k_one_wave(128, 224, 1188, 32, 2) == 9
    assert split_k_waves(64, 86, 1320, 32, 2) == 18
    assert split_k_waves(224, 64, 1320, 32, 2) == 5
    # K tiles run out first (7B.qo: 64 row blocks x 32 tiles, ≥ 2 each): the one-wave split
    assert split_k_waves(64, 32, 1320, 32, 2) == 16


@pytest.mark.parametrize("n_tiles", [1, 7, 64, 128, 448, 1792])
@pytest.mark.parametrize("k_tiles", [1, 4, 9, 32, 86, 224])
@pytest.mark.parametrize("slots", [132 * 3, 132 * 7, 132 * 10])
def test_split_waves_invariants(n_tiles: int, k_tiles: int, slots: int) -> None:
    one, split = split_k_one_wave(n_tiles, k_tiles, slots, 32, 2), split_k_waves(n_tiles, k_tiles, slots, 32, 2)
    assert one <= split <= 32 and (split - 1) * -(-k_tiles // split) < k_tiles
    if split > one:  # only when one wave would be under 80 % full, and never past 3 waves' worth of slices
        assert n_tiles * one < 0.8 * slots and k_tiles // split >= 2
        assert n_tiles * (split - 1) < 3 * slots


@pytest.mark.parametrize("n_tiles", [1, 7, 64, 128, 448, 1792])
@pytest.mark.parametrize("k_tiles", [1, 4, 9, 32, 86, 224])
@pytest.mark.parametrize("slots", [132 * 3, 132 * 7, 132 * 8])
def test_split_invariants(n_tiles: int, k_tiles: int, slots: int) -> None:
    split = split_k_one_wave(n_tiles, k_tiles, slots, 16)
    assert 1 <= split <= 16
    per_split = -(-k_tiles // split)
    assert (split - 1) * per_split < k_tiles  # no empty K slice (the kernel's own slicing)
    if split > 1:
        assert n_tiles * split <= slots and k_tiles // split >= 4


def test_gemv_config_uses_recorded_residency() -> None:
    N, K, n_sm = 8192, 28672, 132
    assert gemv.default_gemv_config(1, N, K, 4, 128, n_sm)["SPLIT_K"] == 8
    assert gemv.default_gemv_config(1, N, K, 4, 128, n_sm, resident=7)["SPLIT_K"] == 7
    # programs_per_sm caps the slots even when more programs fit
    assert gemv.default_gemv_config(1, N, K, 4, 128, n_sm, resident=9)["SPLIT_K"] == 8
    # a tuned SPLIT_K wins
    assert gemv.default_gemv_config(1, N, K, 4, 128, n_sm, {"SPLIT_K": 3}, resident=7)["SPLIT_K"] == 3


def test_record_residency() -> None:
    key = ("test-key",)
    try:
        occupancy.record(key, None)  # the interpreter returns no compiled kernel
        assert occupancy.recorded(key) is None
        occupancy.record(key, SimpleNamespace(n_regs=71, metadata=SimpleNamespace(num_warps=4, shared=1024)))
        assert occupancy.recorded(key) == 7
    finally:
        occupancy._RESIDENT.pop(key, None)


def test_gemv_tiled_large_layers() -> None:
    """The tuned "large" entry (W4 g128, layers of >= 2^27 codes: 2 warps, pipelined K loop)
    applies by size; the tile, fixed by the tile-major layout, stays the same."""
    big = gemv.default_gemv_config(1, 8192, 28672, 4, 128, 132, tiled=True)
    small = gemv.default_gemv_config(1, 4096, 4096, 4, 128, 132, tiled=True)
    assert (big["num_warps"], big["STAGES"]) == (2, 3)
    assert (small["num_warps"], small["STAGES"]) == (4, 1)
    assert (big["BLOCK_N"], big["BLOCK_K"]) == (small["BLOCK_N"], small["BLOCK_K"])
    assert gemv.tile_major_tile(4, 128, 8192, 28672) == gemv.tile_major_tile(4, 128, 4096, 4096)
