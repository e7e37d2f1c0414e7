"""Find the Linear layers to quantize and swap modules in place."""

from __future__ import annotations

from torch import nn

from qtool.nn.qlinear import QuantLinear


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers of one transformer block, in forward (registration) order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)}


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def cast_float(model: nn.Module, dtype) -> nn.Module:
    """Cast floating tensors to `dtype`, except QuantLinear storage: its scales keep the
    dtype they were optimised in (a bf16 round trip of fp16 scales would change Ŵ)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
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
