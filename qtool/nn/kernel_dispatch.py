"""Route QuantLinear's forward to the Triton kernels (qtool_kernels) when they apply.

Returns None when no kernel covers the layer's configuration, and the caller falls
back to dequantize + F.linear in torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from qtool.nn.qlinear import QuantLinear


def quant_linear(layer: QuantLinear, x: Tensor) -> Tensor | None:
    if os.environ.get("QTOOL_KERNELS", "1") == "0":  # force the torch reference path
        return None
    try:
        import qtool_kernels
    except ImportError:
        return None
    fn = getattr(qtool_kernels, "quant_linear", None)
    if fn is None:
        return None
    return fn(layer, x)
