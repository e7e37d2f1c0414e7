"""NF4Linear: a Linear whose weight is stored as NF4 codes with blockwise absmax (QLoRA).

Storage (names are the checkpoint's tensor names, see docs/format.md §NF4; n = N·K, the
weight W [N out, K in] flattened row-major, B = ceil(n / block_size)):
  nf4_codes     uint8 [ceil(n/2)]   two codes per byte, first element in the high nibble
  absmax        fp32 [B]            without double quantization, or instead:
  absmax_q      uint8 [B]           dynamic-map 8-bit codes of absmax − mean
  absmax_scale  fp32 [ceil(B/256)]  per-256 scale of those codes
  absmax_mean   fp32 [1]            the subtracted mean
  bias          [N] (optional)
Ŵ = levels[code] · absmax_b (qtool.quant.nf4). No dense weight is kept. On CUDA the forward
runs qtool_kernels.nf4_linear (fused decode for few rows, else a transient Ŵ + cuBLAS; dX
for QLoRA); elsewhere it dequantizes to x.dtype on the fly. The constants are not
trainable (PEQA refuses this kind).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtool.nn.qlinear import dequantized_linear
from qtool.quant import nf4


class NF4Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int = 64,
        double_quant: bool = True,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        nf4.check_block_size(block_size)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.double_quant = double_quant
        n = in_features * out_features
        B = nf4.n_blocks(n, block_size)
        u8, f32 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float32, device=device)
        self.register_buffer("nf4_codes", torch.empty((n + 1) // 2, **u8))
        self.register_buffer("absmax", None if double_quant else torch.empty(B, **f32))
        self.register_buffer("absmax_q", torch.empty(B, **u8) if double_quant else None)
        self.register_buffer("absmax_scale", torch.empty(nf4.n_blocks(B, nf4.DQ_BLOCK), **f32)
                             if double_quant else None)
        self.register_buffer("absmax_mean", torch.empty(1, **f32) if double_quant else None)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.use_kernels = True  # qtool_kernels.nf4_linear on CUDA (fp16/bf16 activations)
        self._dense: Tensor | None = None  # set only inside qtool.nn.qlinear.dense_cache

    @classmethod
    def from_weight(cls, W: Tensor, block_size: int = 64, double_quant: bool = True,
                    bias: Tensor | None = None) -> NF4Linear:
        """Quantize a dense W [N, K] (any float dtype; computed in fp32)."""
        N, K = W.shape
        layer = cls(K, N, block_size, double_quant, bias is not None,
                    bias.dtype if bias is not None else torch.float32, device=W.device)
        codes, absmax = nf4.quantize_nf4(W, block_size)
        layer.nf4_codes.copy_(nf4.pack_nibbles(codes))
        if double_quant:
            dq = nf4.double_quantize(absmax)
            layer.absmax_q.copy_(dq.q)
            layer.absmax_scale.copy_(dq.scale)
            layer.absmax_mean.copy_(dq.mean)
        else:
            layer.absmax.copy_(absmax)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def codes(self) -> Tensor:
        """uint8 [n] unpacked codes of the row-major flattened weight."""
        return nf4.unpack_nibbles(self.nf4_codes, self.in_features * self.out_features)

    def block_absmax(self) -> Tensor:
        """fp32 [B]: the absmax constants as used at dequantization (after DQ if enabled)."""
        if self.double_quant:
            return nf4.double_dequantize(nf4.DoubleQuant(self.absmax_q, self.absmax_scale, self.absmax_mean))
        return self.absmax.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ [N, K], computed in fp32 and cast to `dtype`."""
        W = nf4.dequantize_nf4(self.codes(), self.block_absmax(), self.block_size,
                               (self.out_features, self.in_features))
        return W.to(dtype)

    dense_weight = dequantize

    def bits_per_param(self) -> float:
        """Stored bits per weight, counting every buffer except the bias."""
        bufs = (self.nf4_codes, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_mean)
        nbytes = sum(t.numel() * t.element_size() for t in bufs if t is not None)
        return 8 * nbytes / (self.in_features * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernels and x.is_cuda:
            from qtool.nn import kernel_dispatch

            if torch.is_autocast_enabled("cuda"):
                # As QuantLinear: autocast hands fp32 activations; the kernels take fp16/bf16,
                # which autocast would have fed a dense Linear anyway.
                x = x.to(torch.get_autocast_dtype("cuda"))
            y = kernel_dispatch.nf4_linear(self, x)
            if y is not None:
                return y
        return dequantized_linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, bias={self.bias is not None}")
