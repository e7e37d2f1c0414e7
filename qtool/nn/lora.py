"""LoRA and DoRA adapters that wrap any Linear-like layer: nn.Linear, QuantLinear, NF4Linear.

  LoRA:  y = base(x) + (α/r)·B·A·dropout(x)
  DoRA:  y = base(x) + (m/‖Ŵ + (α/r)BA‖ − 1)·(Ŵ·x′) + (m/‖Ŵ + (α/r)BA‖)·(α/r)·B·A·x′,   x′ = dropout(x)
         (the row norm is detached, as in the DoRA paper §4.3 and PEFT, so no gradient flows
         through the dense Ŵ; Ŵ is dequantized per call and freed, never kept.)

The base layer is never modified and never receives gradients. Sub-module names
(`lora_A`, `lora_B`, `lora_magnitude_vector`) are PEFT's, so the state-dict keys of a
wrapped model are PEFT's keys without the `base_model.model.` prefix
(qtool.artifact.adapter writes and reads that format).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.errors import QtoolError

# The linears of a Llama/Gemma/Mistral/Qwen/OLMo block, and Phi-3's fused qkv_proj and gate_up_proj
# (quantized and adapted as they are stored); QLoRA's "every linear layer" (lm_head excluded, as in
# PEFT's "all-linear" and the QLoRA reference code).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "gate_up_proj")


def base_weight(layer: nn.Module) -> Tensor:
    """Ŵ [N, K] fp32 in the original column order, whatever the layer stores."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    if hasattr(layer, "dense_weight"):
        return layer.dense_weight(torch.float32).detach()
    raise QtoolError(f"cannot read the weight of a {type(layer).__name__} to wrap it with LoRA")


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise QtoolError(f"LoRA rank must be ≥ 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        anchor = next(itertools.chain(base.parameters(), base.buffers()), None)  # nn.Linear has no buffers
        device = anchor.device if anchor is not None else None
        kw = dict(bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.reset_lora()
        if dora:
            self.lora_magnitude_vector = nn.Parameter(self._norm().to(torch.float32))

    def reset_lora(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a=√5), B = 0, so the wrapped layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def _norm(self, W: Tensor | None = None) -> Tensor:
        W = base_weight(self.base) if W is None else W
        return (W + self.delta_weight().detach().to(W.device)).norm(p=2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        xd = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            xd = xd.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(xd))
        if self.lora_magnitude_vector is None:
            return y + (lora * self.scaling).to(y.dtype)
        W = base_weight(self.base).to(x.device)
        scale = (self.lora_magnitude_vector / self._norm(W)).view(*([1] * (y.dim() - 1)), -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.bias
            base_out = y if bias is None else y - bias.to(y.dtype)
        else:  # dropout changed the input: the magnitude term needs Ŵ·x′, not Ŵ·x
            base_out = F.linear(xd.to(lora.dtype), W.to(lora.dtype))
        del W
        out = (scale - 1) * base_out + scale * lora * self.scaling
        return y + out.to(y.dtype)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"rank={self.rank}, alpha={self.alpha}{dora}"


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def wrap_modules(model: nn.Module, names: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False) -> dict[str, LoraLinear]:
    """Wrap the named Linear-like layers; freezes the whole model first."""
    from qtool.nn.replace import QUANT_TYPES, set_module

    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"the model has no module {name}") from None
        if isinstance(layer, LoraLinear):
            raise QtoolError(f"{name} already has a LoRA adapter")
        if not isinstance(layer, (nn.Linear, *QUANT_TYPES)):
            raise QtoolError(f"{name} is a {type(layer).__name__}, not a linear layer")
        w = LoraLinear(layer, rank, alpha, dropout, dora)
        set_module(model, name, w)
        wrapped[name] = w
    return wrapped


def target_names(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Linear-like layers whose leaf name is in `targets`; lm_head is never a target."""
    from qtool.nn.replace import QUANT_TYPES

    targets = set(targets)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, *QUANT_TYPES)) and _leaf(n) in targets and "lm_head" not in n]
    if not names:
        raise QtoolError(f"no layer matches the LoRA targets {sorted(targets)}")
    return names


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False,
             targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, LoraLinear]:
    """Wrap every target layer (see `target_names`); returns {module name: wrapper}."""
    return wrap_modules(model, target_names(model, targets), rank, alpha, dropout, dora)


def lora_tensors(layers: dict[str, LoraLinear]) -> dict[str, dict[str, Tensor]]:
    """Detached fp32 CPU copies, per module, keyed by PEFT's part names."""
    out = {}
    for name, w in layers.items():
        parts = {"lora_A.weight": w.lora_A.weight, "lora_B.weight": w.lora_B.weight}
        if w.lora_magnitude_vector is not None:
            parts["lora_magnitude_vector"] = w.lora_magnitude_vector
        out[name] = {k: v.detach().float().cpu().clone() for k, v in parts.items()}
    return out


@torch.no_grad()
def set_lora_tensors(layers: dict[str, LoraLinear], tensors: dict[str, dict[str, Tensor]]) -> None:
    for name, parts in tensors.items():
        w = layers[name]
        w.lora_A.weight.copy_(parts["lora_A.weight"])
        w.lora_B.weight.copy_(parts["lora_B.weight"])
        m = parts.get("lora_magnitude_vector")
        if m is not None:
            w.lora_magnitude_vector.copy_(m)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def remove_lora(model: nn.Module) -> None:
    """Put every wrapped base layer back (the adapters are discarded)."""
    from qtool.nn.replace import set_module

    for name, w in lora_layers(model).items():
        set_module(model, name, w.base)


def lora_parameters(layers: dict[str, LoraLinear]) -> dict[str, nn.Parameter]:
    """Trainable tensors by their state-dict name (`<module>.lora_A.weight`, ...)."""
    params: dict[str, nn.Parameter] = {}
    for name, w in layers.items():
        params[f"{name}.lora_A.weight"] = w.lora_A.weight
        params[f"{name}.lora_B.weight"] = w.lora_B.weight
        if w.lora_magnitude_vector is not None:
            params[f"{name}.lora_magnitude_vector"] = w.lora_magnitude_vector
    for p in params.values():
        p.requires_grad_(True)
    return params


def n_parameters(layers: dict[str, LoraLinear]) -> int:
    return sum(p.numel() for p in lora_parameters(layers).values())
