"""NF4 with blockwise absmax and double quantization (QLoRA, METHODS.md §4). Pure math.

Follows bitsandbytes' `quantize_4bit(quant_type="nf4")` so that codes and dequantized values
are the same as bitsandbytes' for the same tensor:

- The weight is flattened row-major (W [N, K] -> w [n], n = N·K) and cut into blocks of
  `block_size` (64) consecutive elements; the last block is short when block_size does not
  divide n. absmax_b = max |w| over block b (fp32).
- Each element is scaled by the reciprocal, x = w · (1 / absmax_b) in fp32 (bitsandbytes
  multiplies by the reciprocal; it does not divide), and coded as the nearest of the 16 NF4
  levels by comparison with the 15 midpoints (levels[i] + levels[i+1]) / 2 (computed in
  float64, stored as float32, as bitsandbytes' decision tree constants are): code =
  #{midpoints m : x > m}, so a value exactly on a midpoint takes the LOWER code.
- Codes are packed two per byte, first element in the HIGH nibble (bitsandbytes' layout):
  byte j = (code[2j] << 4) | code[2j+1]; an odd n leaves the last low nibble 0.
- Ŵ = levels[code] · absmax_b in fp32 (cast to the compute dtype afterwards).
- Double quantization: c = absmax − mean(absmax) (fp32), quantized in blocks of 256 with
  bitsandbytes' signed dynamic 8-bit map (`dynamic_map`) and its binary-search rounding
  (`quantize_blockwise_8bit`); the absmax used at dequantization is
  dynamic_map[q] · scale_256 + mean. Codes are chosen from the exact fp32 absmax before it
  is compressed, as in bitsandbytes.

One deliberate difference: a block that is all zeros has absmax 0. bitsandbytes then
multiplies by 1/0 = inf, gets NaN and (all comparisons false) code 0 (level −1); qtool uses
code 7 (level 0). Both dequantize to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.errors import QtoolError

# bitsandbytes.functional.get_4bit_type("nf4"), the table published with QLoRA.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7
NF4_OFFSET = 0.9677083  # QLoRA's create_normal_map: (1 − 1/(2·15) + 1 − 1/(2·16)) / 2
BLOCK_SIZES = (32, 64, 128, 256)
DQ_BLOCK = 256


def nf4_levels(device=None) -> Tensor:
    """The 16 NF4 levels, fp32 [16], ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def derive_nf4_levels(offset: float = NF4_OFFSET) -> Tensor:
    """The NF4 levels computed the QLoRA way (bitsandbytes `create_normal_map`).

    8 positive levels = Φ⁻¹ of 8 probabilities evenly spaced from `offset` down to 0.5
    (exclusive), 7 negative levels = −Φ⁻¹ of 7 probabilities spaced the same way, plus an
    exact 0; sorted and divided by the largest, so the range is [−1, 1]. The probabilities
    are float32 (torch.linspace), Φ⁻¹ is evaluated in float64, the result is float32."""
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()
    v = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64),
                   -torch.special.ndtri(p_neg)]).float()
    v = v.sort().values
    return v / v.max()


def nf4_midpoints(device=None) -> Tensor:
    """The 15 decision thresholds, fp32 [15]: (levels[i] + levels[i+1]) / 2 in float64."""
    lv = torch.tensor(NF4_LEVELS, dtype=torch.float64, device=device)
    return ((lv[1:] + lv[:-1]) / 2).float()


def n_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise QtoolError(f"nf4 block size must be one of {BLOCK_SIZES}, got {block_size}")


def block_absmax(w: Tensor, block_size: int) -> Tensor:
    """fp32 [B] max |w| over consecutive blocks of the flat tensor w [n] (last block short)."""
    n = w.numel()
    B = n_blocks(n, block_size)
    a = w.reshape(-1).float().abs()
    if B * block_size != n:
        a = torch.nn.functional.pad(a, (0, B * block_size - n))  # |0| never raises a max
    return a.reshape(B, block_size).amax(dim=1)


def _per_element(t: Tensor, block_size: int, n: int) -> Tensor:
    """[B] per-block values -> [n] per-element values."""
    return t.repeat_interleave(block_size)[:n]


def quantize_nf4(W: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """Codes uint8 [n] (unpacked, W flattened row-major) and absmax fp32 [B]."""
    check_block_size(block_size)
    w = W.reshape(-1).float()
    absmax = block_absmax(w, block_size)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    x = w * _per_element(inv, block_size, w.numel())  # [n] in [−1, 1]
    codes = torch.searchsorted(nf4_midpoints(W.device), x, right=False)  # #{m < x}: ties go low
    return codes.to(torch.uint8), absmax


def dequantize_nf4(codes: Tensor, absmax: Tensor, block_size: int, shape: tuple[int, ...]) -> Tensor:
    """Ŵ fp32 of `shape` from unpacked codes [n] and absmax [B]: levels[code] · absmax_b."""
    n = codes.numel()
    w = nf4_levels(codes.device)[codes.reshape(-1).long()] * _per_element(absmax.float(), block_size, n)
    return w.reshape(shape)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes [n] (< 16) -> uint8 [ceil(n/2)], first element in the high nibble."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    pairs = c.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """uint8 [ceil(n/2)] -> uint8 codes [n]; exact inverse of `pack_nibbles`."""
    if packed.numel() != (n + 1) // 2:
        raise QtoolError(f"packed nf4 codes hold {packed.numel()} bytes, expected {(n + 1) // 2} for {n} values")
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


# ------------------------------------------------------------ double quantization


def dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), fp32 [256].

    For exponent i = 0..6: the 2^i midpoints of linspace(0.1, 1, 2^i + 1), times 10^(i−6),
    with both signs; plus 0 and 1.0; sorted."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _nearest_dynamic(code: Tensor, x: Tensor) -> Tensor:
    """bitsandbytes' `dQuantize<0>`: a 7-step binary search over the sorted 256-entry code,
    then the nearer of the two neighbours by fp32 midpoint. Reproduced step by step (it is
    not always the exact nearest entry), vectorised over x."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(gt, up, down).to(torch.uint8)


def quantize_blockwise_8bit(x: Tensor, block_size: int = DQ_BLOCK) -> tuple[Tensor, Tensor]:
    """bitsandbytes `quantize_blockwise` with the dynamic map: codes uint8 [n], scale fp32 [B]."""
    x = x.reshape(-1).float()
    scale = block_absmax(x, block_size)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = _nearest_dynamic(dynamic_map().to(x.device), x * _per_element(inv, block_size, x.numel()))
    return q, scale


def dequantize_blockwise_8bit(q: Tensor, scale: Tensor, block_size: int = DQ_BLOCK) -> Tensor:
    return dynamic_map().to(q.device)[q.long()] * _per_element(scale.float(), block_size, q.numel())


@dataclass
class DoubleQuant:
    """An fp32 absmax vector [B] stored as 8-bit codes: absmax ≈ map[q] · scale_256 + mean.

    q: uint8 [B]; scale: fp32 [ceil(B/256)]; mean: fp32 [1]."""

    q: Tensor
    scale: Tensor
    mean: Tensor


def double_quantize(absmax: Tensor) -> DoubleQuant:
    absmax = absmax.float()
    mean = absmax.mean().reshape(1)
    q, scale = quantize_blockwise_8bit(absmax - mean, DQ_BLOCK)
    return DoubleQuant(q, scale, mean)


def double_dequantize(dq: DoubleQuant) -> Tensor:
    """fp32 [B]: the absmax constants used at dequantization."""
    return dequantize_blockwise_8bit(dq.q, dq.scale, DQ_BLOCK) + dq.mean.float()


def bits_per_param(block_size: int = 64, double_quant: bool = True, dq_block: int = DQ_BLOCK) -> float:
    """Nominal storage per weight: 4-bit code + its share of the constants.

    Without DQ: 4 + 32/block (4.5 at 64). With DQ: 4 + 8/block + 32/(block·dq_block)
    (4.127 at 64/256); the one fp32 mean per tensor is not counted."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * dq_block)
    return 4 + 32 / block_size
