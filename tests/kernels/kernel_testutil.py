"""Shared helpers: random packed layers, the error metric and its bounds.

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same fp16/bf16 inputs and stored
scales). The kernels multiply exact integers by fp16/bf16 activations with fp32
accumulation, so the error is dominated by the final rounding of each output:
  fp16 output: unit roundoff 2^-11 ≈ 4.9e-4 per element (rms ≈ 2.8e-4)   -> bound 2e-3
  bf16 output: unit roundoff 2^-8  ≈ 3.9e-3 per element (rms ≈ 2.3e-3)   -> bound 1e-2
  fp32 output (scale gradient): fp32 accumulation of exact products      -> bound 1e-4
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.quant.grid import QuantSpec, rtn
from qtool.quant.pack import pack

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def rel_err(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN/inf anywhere gives inf so it never passes."""
    out = out.double().cpu()
    ref = ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def random_packed(N: int, K: int, bits: int, group_size: int | None, symmetric: bool = False,
                  device: str = "cpu", gen: torch.Generator | None = None):
    """(qweight, scales fp16, zeros) of an RTN-quantized random Gaussian weight."""
    W = torch.randn(N, K, generator=gen)
    qw = rtn(W, QuantSpec(bits, group_size, symmetric))
    return pack(qw.codes, bits).to(device), qw.scale.to(device), qw.zero.to(device)


def fresh_generator(device: str = "cpu") -> tuple[torch.Generator, int]:
    """A generator seeded afresh on every run (QTOOL_TEST_SEED replays one); print the seed
    in the test so a failure can be reproduced."""
    import os

    seed = int(os.environ.get("QTOOL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    return torch.Generator(device).manual_seed(seed), seed


def random_nf4(N: int, K: int, block_size: int = 64, double_quant: bool = True, bias: bool = False,
               device: str = "cpu", gen: torch.Generator | None = None):
    """An NF4Linear quantized from a random Gaussian weight (realistic codes and constants:
    every code occurs, the absmax varies from block to block)."""
    from qtool.nn.nf4linear import NF4Linear

    W = torch.randn(N, K, generator=gen, device=gen.device if gen is not None else "cpu") * 0.02
    b = torch.randn(N, generator=gen, device=W.device) if bias else None
    return NF4Linear.from_weight(W.to(device), block_size, double_quant, None if b is None else b.to(device))


def check_fused_split_k(run, split_k: int, M: int, N: int, bias: Tensor | None, n_blocks: int,
                        monkeypatch) -> Tensor:
    """Split-K finished by the last program (tickets.py): `run(**kw)` launches the kernel with
    `workspace=` or `out=`. Unfused into a poisoned workspace first, then fused with counters
    held here; y must equal, bit for bit, the partials added in split order (split 0 first)
    plus the bias, rounded once, land in the poisoned `out`, and leave the counters at 0."""
    import qtool_kernels.skinny as skinny  # split_k_buffers draws the counters there

    monkeypatch.setenv("QTOOL_FUSED_SPLIT_K", "0")
    ws = torch.full((split_k, M, N), float("nan"))
    run(workspace=ws)
    expected = ws[0].clone()
    for k in range(1, split_k):
        expected += ws[k]
    if bias is not None:
        expected += bias.float()
    monkeypatch.setenv("QTOOL_FUSED_SPLIT_K", "1")
    counters = torch.zeros(n_blocks, dtype=torch.int32)
    monkeypatch.setattr(skinny, "tickets", lambda device, n: counters[:n])
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = run(out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(y, expected.half())
    assert not counters.any()
    return y
