"""Triton kernels for packed 2/3/4/8-bit weights × fp16/bf16 activations (installed as `qtool_kernels`).

Entry point: `quant_linear(layer, x)`, called by QuantLinear.forward on CUDA; it returns
None for any case it does not cover, and the torch fallback runs. Design and the notes of
each kernel version: docs/kernels.md. Every kernel has its `reference_*` beside it.
"""

# Relative imports: run from the repository root, this folder is also importable as plain
# `kernels` (cwd on sys.path), and transformers probes `import kernels` for Hugging Face's
# hub package; absolute `qtool_kernels` imports here would then recurse into a half-built module.
from .dequant import dequantize_packed, reference_dequantize
from .linear import SKINNY_MAX_M, forward_packed, quant_linear, skinny_max_m
from .scale_grad import reference_scale_grad, scale_grad
from .skinny import reference_skinny, skinny_matmul

__all__ = [
    "SKINNY_MAX_M",
    "dequantize_packed",
    "forward_packed",
    "quant_linear",
    "reference_dequantize",
    "reference_scale_grad",
    "reference_skinny",
    "scale_grad",
    "skinny_matmul",
    "skinny_max_m",
]
