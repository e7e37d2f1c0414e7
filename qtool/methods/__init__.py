"""Whole-model quantization methods, one file each, registered by name.

A method takes the fp model (modified in place: its nn.Linear layers become
QuantLinear, or NF4Linear for nf4) and returns statistics to record in the checkpoint manifest.
A method that also initialises a LoRA adapter (loftq, apiq-bw, apiq-lw) leaves its layers wrapped in
qtool.nn.lora.LoraLinear; the pipeline takes the adapter off and writes it beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from qtool.errors import QtoolError
from qtool.methods.registry import (  # noqa: F401 (the package's public names)
    METHODS,
    NEEDS_CALIBRATION,
    PLANNED,
    ApiqOptions,
    QuantizeOptions,
    register,
)
from qtool.quant.grid import QuantSpec


def all_method_names() -> list[str]:
    _load()
    return sorted(set(METHODS) | set(PLANNED))


def get_method(name: str) -> Callable:
    _load()
    if name in METHODS:
        return METHODS[name]
    if name in PLANNED:
        raise QtoolError(f"method '{name}' is not implemented yet (planned); available now: "
                         f"{', '.join(sorted(METHODS))}")
    raise QtoolError(f"unknown method '{name}'; choose one of {', '.join(all_method_names())}")


def _load() -> None:
    from qtool.methods import apiq, gptq, loftq, nf4, rtn  # noqa: F401  (registration side effect)


def quantize_model(model, spec: QuantSpec, method: str = "rtn", calib=None, **options) -> dict:
    """Quantize an HF causal LM in place. `calib` is a token-id tensor [N, L] for methods that need it."""
    fn = get_method(method)
    opts = QuantizeOptions(spec=spec, **options)
    if method in NEEDS_CALIBRATION and calib is None:
        raise QtoolError(f"method '{method}' needs calibration data")
    return fn(model, opts, calib)
