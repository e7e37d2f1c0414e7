"""Route QuantLinear's and NF4Linear's CUDA forwards to the Triton kernels (qtool_kernels).

Each entry returns None when no kernel covers the layer's configuration, and the caller
falls back to dequantize + F.linear in torch. QTOOL_KERNELS=0 forces that fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import Tensor, nn


def _entry(name: str) -> Callable | None:
    """qtool_kernels.<name>, or None when kernels are switched off or not installed."""
    if os.environ.get("QTOOL_KERNELS", "1") == "0":  # force the torch reference path
        return None
    try:
        import qtool_kernels
    except ImportError:
        return None
    return getattr(qtool_kernels, name, None)


def quant_linear(layer: nn.Module, x: Tensor) -> Tensor | None:
    fn = _entry("quant_linear")
    return None if fn is None else fn(layer, x)


def nf4_linear(layer: nn.Module, x: Tensor) -> Tensor | None:
    fn = _entry("nf4_linear")
    return None if fn is None else fn(layer, x)
