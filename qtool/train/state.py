"""The periodic training state for --resume: one safetensors file, never a pickle.

Tensors:  param.<name>               current trainable values
          best.<name>                values at the best validation metric so far
          optim.<name>.<key>         AdamW / PagedAdamW state (step, exp_avg, exp_avg_sq)
          rng.cpu, rng.cuda.<i>      generator states (uint8), so dropout continues as well
Metadata (strings): qtool.kind = train-state, step, config (JSON of the fields a resumed
run must share), history (JSON list of evaluations), best_step, best (JSON), tokens, seconds,
qtool.sha256 (content hash of the file, checked on read).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qtool.artifact import safetensors_io as stio
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
        save_file(tensors, str(tmp), metadata=stio.seal_metadata(meta))
        stio.seal(tmp)


def load_state(path: Path, param_names: list[str]) -> TrainState:
    """Read and check a training state: its content hash, every metadata field, every tensor's
    shape against the parameter it belongs to."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"--resume: no training state at {path}")
    tensors, meta = stio.load(path, "training state")
    if meta.get("qtool.kind") != KIND:
        raise QtoolError(f"{path}: not a qtool training state")
    stio.check_seal(path, meta, "delete it and train without --resume")
    step, tokens = _int_field(path, meta, "step"), _int_field(path, meta, "tokens")
    seconds = _json_field(path, meta, "seconds", (int, float))
    if not math.isfinite(seconds) or seconds < 0:
        raise QtoolError(f"{path}: seconds must be a finite number >= 0")
    config = _json_field(path, meta, "config", dict)
    history = _json_field(path, meta, "history", list)
    best = _json_field(path, meta, "best", (dict, type(None)))
    if not all(isinstance(h, dict) for h in history):
        raise QtoolError(f"{path}: history must be a list of evaluations")
    params = {n: tensors.get(f"param.{n}") for n in param_names}
    missing = [n for n, t in params.items() if t is None]
    if missing:
        raise QtoolError(f"{path}: training state lacks parameter {missing[0]} "
                         "(made for another model or method?)")
    known = {f"{p}.{n}" for n in param_names for p in ("param", "best")}
    for k in tensors:
        if not (k in known or k.startswith("optim.") or k == "rng.cpu" or re.fullmatch(r"rng\.cuda\.\d{1,3}", k)):
            raise QtoolError(f"{path}: unexpected tensor {k[:60]!r} in a training state")
    best_params = {n: tensors[f"best.{n}"] for n in param_names if f"best.{n}" in tensors} or None
    if best_params is not None and len(best_params) != len(param_names):
        raise QtoolError(f"{path}: best values are stored for some parameters only")
    optim: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, _, key = k.removeprefix("optim.").rpartition(".")
            optim.setdefault(name, {})[key] = v
    for name, t in [*params.items(), *(best_params or {}).items()]:
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise QtoolError(f"{path}: {name} is not a finite floating-point tensor")
        if t.shape != params[name].shape:
            raise QtoolError(f"{path}: best.{name} has shape {tuple(t.shape)}, "
                             f"param.{name} {tuple(params[name].shape)}")
    for name, entry in optim.items():
        if name not in params:
            raise QtoolError(f"{path}: optimizer state for unknown parameter {name[:60]}")
        for key, t in entry.items():
            if key == "step":
                if t.numel() != 1 or not torch.isfinite(t.float()).all() or float(t) < 0:
                    raise QtoolError(f"{path}: optim.{name}.step is not a count")
            elif key in ("exp_avg", "exp_avg_sq"):
                if t.shape != params[name].shape or not t.is_floating_point() or not torch.isfinite(t).all():
                    raise QtoolError(f"{path}: optim.{name}.{key} does not match its parameter or is not finite")
            else:
                raise QtoolError(f"{path}: unknown optimizer state optim.{name}.{key[:40]}")
    rng = tensors.get("rng.cpu")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape):
        raise QtoolError(f"{path}: rng.cpu is not a CPU generator state")
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if any(r.dtype != torch.uint8 or r.dim() != 1 for r in cuda):
        raise QtoolError(f"{path}: rng.cuda.* are not generator states")
    return TrainState(step, params, best_params, optim, rng, cuda, config, history, best, tokens, seconds)


def _json_field(path: Path, meta: dict[str, str], key: str, types: type | tuple[type, ...]):
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise QtoolError(f"{path}: training state lacks {key}") from None
    except (ValueError, RecursionError):
        raise QtoolError(f"{path}: {key} is not valid JSON") from None
    if not isinstance(value, types) or isinstance(value, bool):
        raise QtoolError(f"{path}: {key} has the wrong type ({type(value).__name__})")
    return value


def _int_field(path: Path, meta: dict[str, str], key: str) -> int:
    value = meta.get(key, "")
    if not value.isdigit() or len(value) > 18:
        raise QtoolError(f"{path}: {key} must be a non-negative integer, got {value[:20]!r}")
    return int(value)


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
