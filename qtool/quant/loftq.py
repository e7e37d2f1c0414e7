"""LoftQ (METHODS.md §6) for one weight matrix: alternate quantization and a rank-r SVD so that the
quantized base plus a LoRA adapter approximates W. Pure math, no nn.Module, no I/O.

Notation: W [N out, K in]; the LoRA wrapper computes y = x·(Ŵ + s·B·A)ᵀ with A = lora_A.weight
[r, K], B = lora_B.weight [N, r] and s = α/r (PEFT's `scaling`). With L_0 = 0, for t = 1..T:

    Q_t = quant(W − L_{t−1})                  Ŵ_t = dequant(Q_t)
    L_t = best rank-r approximation of W − Ŵ_t  = U_r·diag(S_r)·V_rᵀ (truncated SVD)

L_t is stored split as B = U_r·diag(√S_r)/√s and A = diag(√S_r)·V_rᵀ/√s, so that s·B·A = L_t
exactly: the α/r the wrapper multiplies by is divided out here, half from each factor, which keeps
‖A‖ and ‖B‖ balanced (PEFT's LoftQ also puts √S on each side, but as of PEFT 0.21 it does not
divide by the scaling, so its adapter is off by α/r unless α = r: huggingface/peft#1982).

Error e_t = ‖W − (Ŵ_t + s·B_t·A_t)‖_F. The SVD step is optimal for a given Q, but re-quantizing is
not: RTN and NF4 choose a new range for W − L_{t−1}, and at 2 bits the plain alternation drifts
upward after a few steps (e.g. 0.789, 0.753, 0.748, 0.749, 0.751 on a random 96×160 matrix). So
an iterate is kept only if it lowers e; the first one that does not ends the loop (later ones
would start from the same kept point). e_t is therefore non-increasing in t, and
e_1 = min_L ‖W − quant(W) − L‖ < e_0 = ‖W − quant(W)‖ (plain RTN / NF4) whenever W ≠ quant(W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from qtool.errors import QtoolError
from qtool.quant.grid import QuantizedWeight, QuantSpec, dequantize, rtn

Q = TypeVar("Q")
# quant(W) -> (whatever the caller stores, e.g. a QuantizedWeight; Ŵ fp32 [N, K] exactly as stored)
Quantizer = Callable[[Tensor], tuple[Q, Tensor]]


@dataclass
class LoftQResult(Generic[Q]):
    """q, W_hat: the kept quantized base; A [r, K], B [N, r] fp32; errors[t] = e_t for t = 0..iters
    (errors[0] is the error of plain quantization, before any adapter)."""

    q: Q
    W_hat: Tensor
    A: Tensor
    B: Tensor
    errors: list[float] = field(default_factory=list)

    @property
    def iters(self) -> int:
        """Alternations actually run (≤ the T asked for: fewer when the iteration converged)."""
        return len(self.errors) - 1


def int_quantizer(spec: QuantSpec, scale_dtype: torch.dtype = torch.float16) -> Quantizer:
    """qtool's integer grid (RTN) as a LoftQ quantizer: Ŵ is computed from the scales as stored."""

    def quant(W: Tensor) -> tuple[QuantizedWeight, Tensor]:
        qw = rtn(W, spec, scale_dtype)
        return qw, dequantize(qw.codes, qw.scale, qw.zero, spec.group_size)

    return quant


def check_loftq_args(shape: tuple[int, ...], rank: int, scaling: float, iters: int) -> None:
    if len(shape) != 2:
        raise QtoolError(f"LoftQ takes a 2-D weight, got shape {tuple(shape)}")
    if rank < 1:
        raise QtoolError(f"LoRA rank must be ≥ 1, got {rank}")
    if rank > min(shape):
        raise QtoolError(f"LoRA rank {rank} exceeds min(out, in) = {min(shape)} of a {shape[0]}×{shape[1]} weight")
    if not scaling > 0:
        raise QtoolError(f"LoRA scaling α/r must be > 0, got {scaling}")
    if iters < 0:
        raise QtoolError(f"LoftQ iterations must be ≥ 0, got {iters}")


def low_rank_factors(R: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """The best rank-r approximation of R [N, K] as (A [r, K], B [N, r]) with scaling·B·A = U_r S_r V_rᵀ."""
    U, S, Vh = torch.linalg.svd(R.float(), full_matrices=False)
    root = (S[:rank] / scaling).sqrt()  # √(S/s) on each side: s·(U√(S/s))(√(S/s)Vᵀ) = U S Vᵀ
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def loftq(W: Tensor, quant: Quantizer, rank: int, scaling: float, iters: int) -> LoftQResult:
    """Run T = `iters` LoftQ alternations on W [N, K] with the quantizer `quant` (see module docstring).

    T = 0 returns plain quant(W) with A = 0, B = 0 (the adapter adds nothing). Computes in fp32 on
    W's device."""
    check_loftq_args(tuple(W.shape), rank, scaling, iters)
    W = W.float()
    N, K = W.shape
    q, W_hat = quant(W)  # Q_1 = quant(W − L_0), L_0 = 0
    A, B = W.new_zeros(rank, K), W.new_zeros(N, rank)
    err = torch.linalg.matrix_norm(W - W_hat).item()
    errors = [err]
    for t in range(1, iters + 1):
        # Q_t = quant(W − L_{t−1}) with L_{t−1} = s·B·A of the kept iterate; Q_1 was computed above
        q_t, W_hat_t = (q, W_hat) if t == 1 else quant(W - scaling * (B @ A))
        A_t, B_t = low_rank_factors(W - W_hat_t, rank, scaling)
        err_t = torch.linalg.matrix_norm(W - W_hat_t - scaling * (B_t @ A_t)).item()
        if t > 1 and err_t >= err:
            break  # this step made things worse: keep the previous iterate (see docstring)
        q, W_hat, A, B, err = q_t, W_hat_t, A_t, B_t, err_t
        errors.append(err)
    return LoftQResult(q, W_hat, A, B, errors)
