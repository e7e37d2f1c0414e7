"""The periodic training state for --resume: one safetensors file, never a pickle.

Tensors:  param.<name>               current trainable values
          best.<name>                values at the best validation metric so far
          optim.<name>.<key>         AdamW / PagedAdamW state (step, exp_avg, exp_avg_sq)
          rng.cpu, rng.cuda.<i>      generator states (uint8), so dropout continues as well
Metadata (strings): qtool.kind = train-state, step, config (JSON of the fields a resumed
run must share), history (JSON list of evaluations), best_step, best (JSON), tokens, seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qtool.artifact.atomic import atomic_file
from qtool.errors import QtoolError

KIND = "train-state"
STATE_FILE = "state.safetensors"


@dataclass
class TrainState:
    step: int
    params: dict[str, Tensor]
    best_params: dict[str, Tensor] | None
    optim: dict[str, dict[str, Tensor]]
    rng_cpu: Tensor | None
    rng_cuda: list[Tensor]
    config: dict
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    tokens: int = 0
    seconds: float = 0.0


def save_state(path: Path, state: TrainState) -> None:
    tensors: dict[str, Tensor] = {}
    for name, t in state.params.items():
        tensors[f"param.{name}"] = t.detach().cpu().contiguous()
    for name, t in (state.best_params or {}).items():
        tensors[f"best.{name}"] = t.detach().cpu().contiguous()
    for name, st in state.optim.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{name}.{k}"] = v.detach().cpu().contiguous()
    if state.rng_cpu is not None:
        tensors["rng.cpu"] = state.rng_cpu
    for i, r in enumerate(state.rng_cuda):
        tensors[f"rng.cuda.{i}"] = r
    meta = {"format": "pt", "qtool.kind": KIND, "step": str(state.step), "config": json.dumps(state.config),
            "history": json.dumps(state.history), "best": json.dumps(state.best),
            "tokens": str(state.tokens), "seconds": repr(state.seconds)}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: Path, param_names: list[str]) -> TrainState:
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"--resume: no training state at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise QtoolError(f"{path}: cannot read training state ({e})") from None
    if meta.get("qtool.kind") != KIND:
        raise QtoolError(f"{path}: not a qtool training state")
    params = {n: tensors.get(f"param.{n}") for n in param_names}
    missing = [n for n, t in params.items() if t is None]
    if missing:
        raise QtoolError(f"{path}: training state lacks parameter {missing[0]} "
                         "(made for another model or method?)")
    best = {n: tensors[f"best.{n}"] for n in param_names if f"best.{n}" in tensors} or None
    optim: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, _, key = k.removeprefix("optim.").rpartition(".")
            optim.setdefault(name, {})[key] = v
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    return TrainState(int(meta["step"]), params, best, optim, tensors.get("rng.cpu"), cuda,
                      json.loads(meta["config"]), json.loads(meta["history"]), json.loads(meta["best"]),
                      int(meta["tokens"]), float(meta["seconds"]))


def optimizer_state(optimizer: torch.optim.Optimizer,
                    params: dict[str, nn.Parameter]) -> dict[str, dict[str, Tensor]]:
    return {name: dict(optimizer.state[p]) for name, p in params.items() if p in optimizer.state}


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                      saved: dict[str, dict[str, Tensor]]) -> None:
    # An optimizer that places its own state (PagedAdamW: pinned host memory) says so.
    load = getattr(optimizer, "load_param_state", None)
    for name, p in params.items():
        st = saved.get(name)
        if not st:
            continue
        if load is not None:
            load(p, st)
            continue
        # `step` stays a CPU scalar as torch's (non-fused) AdamW keeps it; moments go to the param.
        optimizer.state[p] = {k: (v if k == "step" else v.to(p.device, p.dtype)) for k, v in st.items()}
