"""Whole-model quantization methods, one file each, registered by name.

A method takes the fp model (modified in place: its nn.Linear layers become
QuantLinear, or NF4Linear for nf4) and returns statistics to record in the checkpoint manifest.
A method that also initialises a LoRA adapter (loftq, apiq-bw, apiq-lw) leaves its layers wrapped in
qtool.nn.lora.LoraLinear; the pipeline takes the adapter off and writes it beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.nn.lora import DEFAULT_TARGETS
from qtool.quant.grid import QuantSpec


@dataclass
class ApiqOptions:
    """Training-based calibration (apiq-bw, apiq-lw, omniquant; qtool.methods.apiq)."""

    epochs: int = 20
    lr_clip: float | None = None  # γ/β learning rate; None = the method's default (apiq 5e-3, omniquant 1e-2)
    lr_lora: float = 5e-4
    weight_decay: float | None = None  # None = the method's default (apiq 0.1, omniquant 0)
    aug_loss: bool = False  # also match the fp block run on the quantized inputs
    offload: str = "auto"  # calibration activations: auto | gpu | cpu (pinned host memory)
    state_dir: Path | None = None  # per-block state, for --resume (None: not kept)
    resume: bool = False
    cuda_graphs: bool = True  # replay each training step as a CUDA graph (GPU only; same math as eager)


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
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # apiq: leaf names of the layers that get LoRA
    seed: int = 0  # apiq: per-block LoRA init
    apiq: ApiqOptions = field(default_factory=ApiqOptions)


METHODS: dict[str, Callable] = {}
NEEDS_CALIBRATION = {"gptq"}
PLANNED: tuple[str, ...] = ()


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
    from qtool.methods import apiq, gptq, loftq, nf4, rtn  # noqa: F401  (registration side effect)


def quantize_model(model, spec: QuantSpec, method: str = "rtn", calib=None, **options) -> dict:
    """Quantize an HF causal LM in place. `calib` is a token-id tensor [N, L] for methods that need it."""
    fn = get_method(method)
    opts = QuantizeOptions(spec=spec, **options)
    if method in NEEDS_CALIBRATION and calib is None:
        raise QtoolError(f"method '{method}' needs calibration data")
    return fn(model, opts, calib)
