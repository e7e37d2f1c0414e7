"""Whole-model quantization methods, one file each, registered by name.

A method takes the fp model (modified in place: its nn.Linear layers become
QuantLinear, or NF4Linear for nf4) and returns statistics to record in the checkpoint manifest.
A method that also initialises a LoRA adapter (loftq) leaves its layers wrapped in
qtool.nn.lora.LoraLinear; the pipeline takes the adapter off and writes it beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qtool.errors import QtoolError
from qtool.quant.grid import QuantSpec


@dataclass
class QuantizeOptions:
    spec: QuantSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scale_dtype: torch.dtype = torch.float16
    quantize_lm_head: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    quiet: bool = False
    double_quant: bool = True  # nf4: 8-bit absmax constants (QLoRA double quantization)
    nf4_block_size: int | None = None  # nf4: absmax block; None = spec.group_size (64 if per-channel)
    lora_rank: int = 64  # methods that also initialise a LoRA adapter (loftq): its rank r
    lora_alpha: float = 16.0  # ... and its α (the wrapper scales B·A by α/r)
    loftq_iters: int = 5  # loftq: alternations T (LoftQ's published scripts use 5)


METHODS: dict[str, Callable] = {}
NEEDS_CALIBRATION = {"gptq"}
PLANNED = ("apiq-bw", "apiq-lw", "omniquant")


def register(name: str, needs_calibration: bool = False):
    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn

    return deco


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
    from qtool.methods import gptq, loftq, nf4, rtn  # noqa: F401  (registration side effect)


def quantize_model(model, spec: QuantSpec, method: str = "rtn", calib=None, **options) -> dict:
    """Quantize an HF causal LM in place. `calib` is a token-id tensor [N, L] for methods that need it."""
    fn = get_method(method)
    opts = QuantizeOptions(spec=spec, **options)
    if method in NEEDS_CALIBRATION and calib is None:
        raise QtoolError(f"method '{method}' needs calibration data")
    return fn(model, opts, calib)
