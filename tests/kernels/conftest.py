"""Kernel tests run on the CPU through Triton's interpreter when no GPU is present.

TRITON_INTERPRET is read when a kernel is decorated (`@triton.jit` returns an
InterpretedFunction then), so it must be set before qtool_kernels is imported; a copy
imported earlier without it is dropped so the test modules import a fresh one.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m == "qtool_kernels" or m.startswith("qtool_kernels.")]:
        del sys.modules[name]
