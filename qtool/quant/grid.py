"""Uniform integer grid (METHODS.md §1): choose scale/zero, quantize, dequantize.

Shapes: W is [N out, K in]; groups run along K. With group size g there are
G = ceil(K / g) groups; when g does not divide K the last group is short and is
treated as if padded with zeros (the grid always contains 0, so zero padding never
changes a group's range). Per-channel is g = K (G = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.errors import QtoolError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """What grid a weight is quantized to. group_size None means per output channel."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QtoolError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUPS:
            raise QtoolError(
                f"group size must be one of {SUPPORTED_GROUPS} or 'channel', got {self.group_size}"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def group_len(self, K: int) -> int:
        return K if self.group_size is None else self.group_size

    def n_groups(self, K: int) -> int:
        g = self.group_len(K)
        return (K + g - 1) // g


@dataclass
class QuantizedWeight:
    """Integer codes plus the per-group affine map back to floats.

    codes: uint8 [N, K]; scale: float [N, G]; zero: uint8 [N, G] (integer zero-point);
    perm: int64 [K] or None. With perm (GPTQ act-order) the columns of `codes` are in
    permuted order: codes[:, j] encodes W[:, perm[j]], so forward uses x[..., perm].
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    perm: Tensor | None = None


def group_view(W: Tensor, g: int) -> Tensor:
    """[N, K] -> [N, G, g], zero-padding the last group when g does not divide K."""
    N, K = W.shape
    G = (K + g - 1) // g
    if G * g != K:
        W = torch.nn.functional.pad(W, (0, G * g - K))
    return W.reshape(N, G, g)


def expand_groups(t: Tensor, g: int, K: int) -> Tensor:
    """[N, G] per-group values -> [N, K] per-column values."""
    return t.repeat_interleave(g, dim=1)[:, :K]


def choose_qparams(
    W: Tensor,
    spec: QuantSpec,
    wmin: Tensor | None = None,
    wmax: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale [N, G] (fp32) and integer zero-point [N, G] (uint8) for W [N, K].

    wmin/wmax override the per-group range (clipping, searched or learned); they are
    [N, G] and the range is still widened to contain 0 so the zero-point is an integer
    inside the code range, as in GPTQ's quantizer.
    """
    Wg = group_view(W.float(), spec.group_len(W.shape[1]))
    if wmin is None:
        wmin = Wg.amin(dim=2)
    if wmax is None:
        wmax = Wg.amax(dim=2)
    zeros = torch.zeros_like(wmin)
    wmin = torch.minimum(wmin, zeros)
    wmax = torch.maximum(wmax, zeros)
    if spec.symmetric:
        absmax = torch.maximum(-wmin, wmax)
        half = 2 ** (spec.bits - 1)
        scale = absmax / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        scale = (wmax - wmin) / spec.qmax
        scale_safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale_safe).clamp(0, spec.qmax)
    # A constant (all-zero) group: any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero.to(torch.uint8)


def quantize(W: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes uint8 [N, K]: clamp(round(W / s) + z, 0, 2^b - 1)."""
    N, K = W.shape
    g = spec.group_len(K)
    if K % g == 0:  # broadcast over a group view: the same elementwise ops, no [N, K] copies of s and z
        Wg = W.float().reshape(N, K // g, g)
        q = torch.round(Wg / scale.float()[..., None]) + zero.float()[..., None]
        return torch.clamp(q, 0, spec.qmax).to(torch.uint8).reshape(N, K)
    s = expand_groups(scale.float(), g, K)
    z = expand_groups(zero.float(), g, K)
    return torch.clamp(torch.round(W.float() / s) + z, 0, spec.qmax).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    """Ŵ = s · (q − z), fp32 [N, K] (or in scale's dtype if it is float64)."""
    K = codes.shape[1]
    g = K if group_size is None else group_size
    dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
    s = expand_groups(scale.to(dtype), g, K)
    z = expand_groups(zero.to(dtype), g, K)
    return s * (codes.to(dtype) - z)


def rtn(W: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest. Scales are rounded to their storage dtype before the codes are
    chosen, so the stored (scale, code) pairs are exactly what was optimised."""
    N, K = W.shape
    rows = max(1, _RTN_CHUNK // max(K, 1))  # rows are independent: bound the fp32 temporaries
    codes, scales, zeros = [], [], []
    for r0 in range(0, N, rows):
        w = W[r0 : r0 + rows]
        scale, zero = choose_qparams(w, spec)
        scale = scale.to(scale_dtype).float()
        codes.append(quantize(w, scale, zero, spec))
        scales.append(scale.to(scale_dtype))
        zeros.append(zero)
    if len(codes) == 1:
        return QuantizedWeight(codes[0], scales[0], zeros[0])
    return QuantizedWeight(torch.cat(codes), torch.cat(scales), torch.cat(zeros))


_RTN_CHUNK = 1 << 22  # elements per chunk of rows (16 MiB of fp32 per temporary)
