"""Triton kernels for packed 2/3/4/8-bit weights × fp16/bf16 activations (installed as `qtool_kernels`).

Entry points: `quant_linear(layer, x)`, called by QuantLinear.forward on CUDA, and
`nf4_linear(layer, x)`, called by NF4Linear.forward; they return None for any case they do
not cover, and the torch fallback runs. Design and the notes of each kernel version:
docs/kernels.md. Every kernel has its `reference_*` beside it.
"""

# Relative imports: run from the repository root, this folder is also importable as plain
# `kernels` (cwd on sys.path), and transformers probes `import kernels` for Hugging Face's
# hub package; absolute `qtool_kernels` imports here would then recurse into a half-built module.
from .dequant import dequantize_packed, reference_dequantize
from .gemv import default_gemv_config, gemv_matmul, reference_gemv, tile_major_tile
from .linear import GEMV_MAX_M, SKINNY_MAX_M, forward_packed, gemv_max_m, quant_linear, skinny_max_m
from .nf4 import (
    NF4_SKINNY_MAX_M,
    NF4Weight,
    dequantize_nf4,
    nf4_forward,
    nf4_linear,
    nf4_linear_ref,
    nf4_skinny_matmul,
    reference_dequantize_nf4,
)
from .scale_grad import reference_scale_grad, scale_grad
from .skinny import reference_skinny, skinny_matmul
from .tiles import row_major, tile_major

__all__ = [
    "GEMV_MAX_M",
    "NF4_SKINNY_MAX_M",
    "SKINNY_MAX_M",
    "NF4Weight",
    "dequantize_nf4",
    "dequantize_packed",
    "default_gemv_config",
    "forward_packed",
    "gemv_matmul",
    "gemv_max_m",
    "nf4_forward",
    "nf4_linear",
    "nf4_linear_ref",
    "nf4_skinny_matmul",
    "quant_linear",
    "reference_dequantize",
    "reference_dequantize_nf4",
    "reference_gemv",
    "reference_scale_grad",
    "reference_skinny",
    "row_major",
    "scale_grad",
    "skinny_matmul",
    "skinny_max_m",
    "tile_major",
    "tile_major_tile",
]
