"""GPTQ for one Linear layer (METHODS.md §2; Frantar et al. 2022).

Sees one weight W [N, K] and its Hessian H = 2·X·Xᵀ [K, K] built from calibration
inputs X [K, tokens], nothing else. Columns are quantized left to right in blocks of
`block_size`; each column's rounding error, scaled by the inverse-Hessian Cholesky
factor, is pushed onto the columns not yet quantized. Group scales are chosen when a
group starts, from the columns as updated so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import QtoolError
from qtool.quant.grid import QuantizedWeight, QuantSpec, choose_qparams


def accumulate_hessian(H: Tensor, n_seen: int, X: Tensor) -> tuple[Tensor, int]:
    """Running mean of 2·x·xᵀ over tokens. X is [..., K]. Returns (H, tokens seen)."""
    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    n_new = X.shape[0]
    total = n_seen + n_new
    H.mul_(n_seen / total)
    X = X * (2.0 / total) ** 0.5
    H.addmm_(X.t(), X)
    return H, total


def inverse_cholesky(H: Tensor, damp: float, max_tries: int = 6) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H), raising damp ×10 on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, damp
        damp *= 10.0
    raise QtoolError(f"GPTQ: Hessian not positive definite even with damping {damp / 10:g}")


def gptq(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[QuantizedWeight, dict]:
    """Quantize W [N, K] given H [K, K]. Returns the codes and stats (damp used, proxy loss)."""
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    g = spec.group_len(K)
    if spec.group_size is not None and block_size % g != 0:
        raise QtoolError(f"GPTQ block size {block_size} must be a multiple of group size {g}")
    Hinv, damp_used = inverse_cholesky(H, damp)
    G = spec.n_groups(K)
    scale = torch.empty(N, G, device=W.device)
    zero = torch.empty(N, G, device=W.device, dtype=torch.uint8)
    codes = torch.empty(N, K, device=W.device, dtype=torch.uint8)
    loss = torch.zeros(N, device=W.device)

    if spec.group_size is None:  # per-channel: one range from the whole row, chosen up front
        s, z = choose_qparams(W, spec)
        scale[:], zero[:] = s.to(scale_dtype).float(), z

    qmax = spec.qmax
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        # Work on the block transposed ([cols, N]) so each column is a contiguous row.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if spec.group_size is not None and col % g == 0:
                # Groups never straddle blocks (g divides block_size), so the whole group is in W1.
                s_new, z_new = choose_qparams(W1[i : i + g].t(), QuantSpec(spec.bits, None, spec.symmetric))
                scale[:, gi : gi + 1], zero[:, gi : gi + 1] = s_new.to(scale_dtype).float(), z_new
            s, z = scale[:, gi], zero[:, gi].float()
            w = W1[i]
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            w_hat = s * (q - z)
            d = Hinv1[i, i]
            err = (w - w_hat) / d
            loss += (w - w_hat) ** 2 / d**2 / 2
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]
            Err1[i] = err
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]

    stats = {"damp": damp_used, "proxy_loss": loss.sum().item()}
    return QuantizedWeight(codes, scale.to(scale_dtype), zero, perm), stats
