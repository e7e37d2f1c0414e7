"""Triton kernels for packed 2/3/4/8-bit weights × fp16/bf16 activations (installed as `qtool_kernels`).

Entry points: `quant_linear(layer, x)`, called by QuantLinear.forward on CUDA, and
`nf4_linear(layer, x)`, called by NF4Linear.forward; they return None for any case they do
not cover, and the torch fallback runs. Design and the notes of each kernel version:
docs/kernels.md. Every kernel has its `reference_*` beside it.
"""

import sys

if __name__ != "qtool_kernels":
    # Run from the repository root, this folder is also importable as plain `kernels` (cwd on
    # sys.path): the name of Hugging Face's hub-kernel package, which transformers probes and
    # bitsandbytes' CPU backend imports (`from kernels import get_kernel`). A second copy loaded
    # under that name would register qtool's torch ops again and replace the ones compiled graphs
    # call, so the name is made to point at the one copy (which has no `get_kernel`: callers fall
    # back as when the hub package is missing).
    try:
        import qtool_kernels as _installed

        sys.modules[__name__] = _installed
    except ImportError:
        pass
else:
    # Relative imports: absolute `qtool_kernels` imports would recurse into a half-built module.
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
