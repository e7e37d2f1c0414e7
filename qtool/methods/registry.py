"""The method registry and the options every method takes (qtool.methods re-exports them).

Method modules import from here, not from the package, so that the package can import the
method modules (for their registration) without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
