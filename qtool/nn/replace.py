"""Find the Linear layers to quantize and swap modules in place."""

from __future__ import annotations

from torch import nn

from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear

QUANT_TYPES = (QuantLinear, NF4Linear)  # every quantized Linear a checkpoint can hold


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers of one transformer block, in forward (registration) order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QUANT_TYPES)}


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Integer-grid layers only (what PEQA and scale swapping work on)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def nf4_linears(model: nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized Linear, of any kind (QUANT_TYPES)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def cast_float(model: nn.Module, dtype) -> nn.Module:
    """Cast floating tensors to `dtype`, except quantized storage: QuantLinear scales keep the
    dtype they were optimised in (a bf16 round trip of fp16 scales would change Ŵ), NF4
    absmax constants stay fp32."""
    for mod in model.modules():
        if isinstance(mod, QUANT_TYPES):
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.to(dtype)
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and "inv_freq" not in name:
                setattr(mod, name, b.to(dtype))
    return model
