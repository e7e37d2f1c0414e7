"""QuantLinear: a Linear whose weight is stored as packed integer codes.

Storage (names are the checkpoint's tensor names, see docs/format.md):
  qweight  int32 [N, ceil(K/32)·bits]   codes packed along K (qtool.quant.pack)
  scales   fp16/bf16/fp32 [N, G]        per-group (or per-channel, G = 1) scale s₀
  zeros    uint8 [N, G]                 integer zero-points z
  perm     int64 [K] (optional)         act-order column permutation
  bias     [N] (optional)
Ŵ = s · (q − z). PEQA adds a trainable `scale_delta` Δs [N, G]: s = s₀ + Δs.
The layer knows nothing of LoRA; adapters wrap it (qtool.nn.lora).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.quant.grid import QuantizedWeight, dequantize
from qtool.quant.pack import pack, packed_words, unpack


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        bias: bool = False,
        act_order: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size  # None: per output channel
        g = in_features if group_size is None else group_size
        self.n_groups = (in_features + g - 1) // g
        N, K, G = out_features, in_features, self.n_groups
        self.register_buffer("qweight", torch.empty(N, packed_words(K, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(N, G, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.empty(N, G, dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.empty(K, dtype=torch.int64, device=device) if act_order else None)
        self.register_buffer("bias", torch.empty(N, dtype=bias_dtype, device=device) if bias else None)
        self.scale_delta: nn.Parameter | None = None
        self.use_kernels = True  # the Triton path on CUDA when qtool_kernels supports the config
        self._dense: Tensor | None = None  # set only inside `dense_cache` (CPU inference)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bits: int, group_size: int | None, bias: Tensor | None) -> QuantLinear:
        N, K = qw.codes.shape
        layer = cls(K, N, bits, group_size, bias is not None, qw.perm is not None, qw.scale.dtype,
                    bias.dtype if bias is not None else torch.float32, device=qw.codes.device)
        layer.qweight.copy_(pack(qw.codes, bits))
        layer.scales.copy_(qw.scale)
        layer.zeros.copy_(qw.zero)
        if qw.perm is not None:
            layer.perm.copy_(qw.perm)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def codes(self) -> Tensor:
        qweight = self.qweight
        if qweight.dim() == 4:  # tile-major inside `tile_major_layout`
            from qtool_kernels.tiles import row_major

            qweight = row_major(qweight)
        return unpack(qweight, self.bits, self.in_features)

    def effective_scales(self) -> Tensor:
        if self.scale_delta is None:
            return self.scales
        return self.scales.float() + self.scale_delta

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ [N, K] in the stored (possibly act-order permuted) column order."""
        scales, zeros = self.effective_scales(), self.zeros
        if zeros.dim() == 3:  # tile-major inside `tile_major_layout`
            from qtool_kernels.tiles import groups_row_major

            scales, zeros = groups_row_major(scales), groups_row_major(zeros)
        return dequantize(self.codes(), scales, zeros, self.group_size).to(dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ [N, K] in the original column order (for export and tests)."""
        W = self.dequantize(dtype)
        if self.perm is None:
            return W
        return W[:, torch.argsort(self.perm)]

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.use_kernels and x.is_cuda:
            from qtool.nn import kernel_dispatch

            if torch.is_autocast_enabled("cuda"):
                # Under autocast the activations arrive in fp32; the kernels take fp16/bf16,
                # which is what autocast would have fed a dense Linear anyway.
                x = x.to(torch.get_autocast_dtype("cuda"))
            y = kernel_dispatch.quant_linear(self, x)
            if y is not None:
                return y
        if self.scale_delta is not None and self.scale_delta.requires_grad:
            from qtool.nn.scale_grad import scale_trainable_linear

            return scale_trainable_linear(self, x)
        return dequantized_linear(self, x)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={g}, act_order={self.perm is not None}, bias={self.bias is not None}")


def dequantized_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """The torch path of any packed layer: Ŵ from the dense cache if one is set, else dequantized now."""
    trains = getattr(layer, "scale_delta", None) is not None and torch.is_grad_enabled()
    if layer._dense is not None and not trains:
        W = layer._dense.to(x.dtype)
    else:
        W = layer.dequantize(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, W, bias)


@contextlib.contextmanager
def dense_cache(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """A device without kernels: dequantize each frozen QuantLinear (and NF4Linear) once,
    not per call.

    Costs one dense copy of the quantized layers for the duration of the block; meant for
    CPU evaluation, generation and CPU LoRA training over a frozen base, where unpacking on
    every call dominates the run time. Layers whose scales train (PEQA's Δs) are skipped:
    their Ŵ changes every step."""
    # Every packed layer type (QuantLinear, NF4Linear) carries a `_dense` slot; matching on
    # it keeps this module free of imports of the other layer types.
    layers = [m for m in model.modules() if hasattr(m, "_dense") and hasattr(m, "dequantize")
              and getattr(m, "scale_delta", None) is None]
    try:
        for m in layers:
            m._dense = m.dequantize(dtype)
        yield
    finally:
        for m in layers:
            m._dense = None


@contextlib.contextmanager
def tile_major_layout(model: nn.Module) -> Iterator[int]:
    """Store each frozen CUDA QuantLinear's codes tile-major for the block (decode, generation).

    The M = 1 GEMV reads a program's rows as one contiguous run per K tile in this layout
    (qtool_kernels.tiles; measured on an H100, docs/benchmarks.md). The codes are permuted in
    place, one layer at a time (no second copy of the model), and put back on exit, so
    checkpoints and swap-scales always see the stored layout. Scales and zeros go tile-major
    too ([N / BN, G, BN]: one contiguous load per tile instead of BN strided ones, which
    compiles to 56 registers instead of 71 at W4 g128 for sm_90, 9 programs per SM instead
    of 7) unless a Δs is attached (s₀ + Δs is formed per call in row order). Layers without
    a measured tile for their class or shape, on the CPU, or whose scales train (PEQA) stay
    as they are. Yields the number of layers converted."""
    try:
        from qtool_kernels.gemv import tile_major_tile
        from qtool_kernels.tiles import groups_row_major, groups_tile_major, row_major, tile_major
    except ImportError:  # no Triton: nothing reads the tile-major layout
        yield 0
        return
    import os

    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"  # CPU tests run the kernels there
    done: list[QuantLinear] = []
    try:
        for m in model.modules():
            if not (isinstance(m, QuantLinear) and (m.qweight.is_cuda or interpreting) and m.qweight.dim() == 2
                    and m.use_kernels):
                continue
            if m.scale_delta is not None and m.scale_delta.requires_grad:
                continue
            tile = tile_major_tile(m.bits, m.group_size, m.out_features, m.in_features)
            if tile is None or m.qweight.shape[1] * 32 != m.in_features * m.bits:
                continue
            m.qweight = tile_major(m.qweight, tile[0], tile[1], m.bits)
            if m.scale_delta is None:
                m.scales, m.zeros = groups_tile_major(m.scales, tile[0]), groups_tile_major(m.zeros, tile[0])
            done.append(m)
        yield len(done)
    finally:
        for m in done:
            m.qweight = row_major(m.qweight).contiguous()
            if m.zeros.dim() == 3:
                m.scales, m.zeros = groups_row_major(m.scales), groups_row_major(m.zeros)
