"""Optimizers by name: `build_optimizer("adamw" | "paged_adamw", ...)` (the --optim choices)."""

from __future__ import annotations

import torch

from qtool.errors import QtoolError
from qtool.train.paged_adamw import PagedAdamW

_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "paged_adamw": PagedAdamW}
OPTIMIZERS = tuple(_REGISTRY)


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over `params`; "paged_adamw" keeps its moments in pinned host memory (qtool/train/paged_adamw.py)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise QtoolError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
