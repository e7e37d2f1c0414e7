"""A loaded checkpoint's scales in memory: s = s₀ + Δs for a task, and back to s₀, bit-exact.

One formula everywhere: s = (s₀ + Δs) rounded to the scale dtype (`combine_scales`), so a Δs
applied in memory (`qtool eval --delta`, `model.load_scales`) and one swapped into a checkpoint
directory (qtool.swap, `qtool swap-scales`) give bit-identical scales.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import Tensor, nn

from qtool.artifact import safetensors_io as st
from qtool.artifact.delta import ScaleDelta, check_delta, read_delta
from qtool.errors import QtoolError

SCALES_FILE = "scales.safetensors"
BASE_SCALES_FILE = "base_scales.safetensors"
APPLIED_KEY = "scale_delta"


def _read_scales(path: Path) -> dict[str, Tensor]:
    return st.load(path, "scales file")[0]


def combine_scales(s0: Tensor, delta: Tensor) -> Tensor:
    """s = s₀ + Δs, added in fp32 and rounded once to s₀'s dtype (the stored scale dtype)."""
    s = (s0.float() + delta.to(s0.device, torch.float32)).to(s0.dtype)
    if not torch.isfinite(s).all():
        raise QtoolError("s0 + Δs overflows the scale dtype")
    return s


def _quant_linears(model: nn.Module) -> dict:
    from qtool.nn.replace import quant_linears

    return quant_linears(model)


def install_scale_api(model: nn.Module, info: dict, path: Path | None = None) -> nn.Module:
    """Give a loaded checkpoint's model `model.load_scales(path)` and `model.restore_base_scales()`.

    `info` is the checkpoint manifest (its fingerprint validates every Δs); `path` is the
    checkpoint directory, needed when it was loaded with a Δs already swapped in (the base
    scales are then read from base_scales.safetensors)."""
    model._qtool_info = info
    model._qtool_dir = Path(path) if path is not None else None
    model.load_scales = types.MethodType(load_scales, model)
    model.restore_base_scales = types.MethodType(restore_base_scales, model)
    # Capture s0 now, in the stored dtype, before anything (e.g. a cast to bf16 for
    # evaluation) can change the live scales.
    _base_scales(model)
    return model


def _base_scales(model: nn.Module) -> dict[str, Tensor]:
    """The base s₀ of every QuantLinear, captured once (the first time a Δs is applied)."""
    base = getattr(model, "_qtool_base_scales", None)
    if base is not None:
        return base
    info = getattr(model, "_qtool_info", None) or {}
    ckpt = getattr(model, "_qtool_dir", None)
    if info.get(APPLIED_KEY):
        if ckpt is None:
            raise QtoolError("this model was loaded with task scales swapped in; install_scale_api needs its "
                             "directory to find the base scales")
        saved = _read_scales(ckpt / BASE_SCALES_FILE)
        layers = _quant_linears(model)
        missing = [n for n in layers if f"{n}.scales" not in saved]
        if missing:
            raise QtoolError(f"{ckpt / BASE_SCALES_FILE} has no scales for {missing[0]}")
        base = {n: saved[f"{n}.scales"] for n in layers}
        for n, layer in layers.items():
            if base[n].shape != layer.scales.shape or base[n].dtype != layer.scales.dtype:
                raise QtoolError(f"{ckpt / BASE_SCALES_FILE}: scales of {n} do not match the checkpoint's")
    else:
        base = {n: m.scales.detach().to("cpu", copy=True) for n, m in _quant_linears(model).items()}
    model._qtool_base_scales = base
    return base


def load_scales(model: nn.Module, path: Path | str | ScaleDelta, info: dict | None = None) -> ScaleDelta:
    """Apply a task's Δs in memory: every QuantLinear's scales become s₀ + Δs. The integer
    codes are untouched, so switching tasks costs one small copy per layer. Returns the delta."""
    info = info if info is not None else getattr(model, "_qtool_info", None)
    if info is None:
        raise QtoolError("load_scales needs the checkpoint manifest (load the model with load_checkpoint)")
    delta = path if isinstance(path, ScaleDelta) else read_delta(Path(path))
    check_delta(delta, info, "this model")
    layers = _quant_linears(model)
    base = _base_scales(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.scales.copy_(combine_scales(base[name].to(layer.scales.device), delta.tensors[name]))
    model._qtool_applied = delta.task
    return delta


def restore_base_scales(model: nn.Module) -> None:
    """Undo load_scales: put the base s₀ back, bit-exact."""
    base = getattr(model, "_qtool_base_scales", None)
    if base is None:
        return
    with torch.no_grad():
        for name, layer in _quant_linears(model).items():
            layer.scales.copy_(base[name].to(layer.scales.device))
    model._qtool_applied = None


def apply_delta(model, path: Path, info: dict, checkpoint_dir: Path | None = None) -> ScaleDelta:
    """Apply a Δs to a loaded model in memory (`qtool eval --delta`), as `load_scales`.

    `checkpoint_dir` is needed only when the checkpoint on disk already has task scales
    swapped in (the base scales are then read from its base_scales.safetensors)."""
    if checkpoint_dir is not None and getattr(model, "_qtool_dir", None) is None:
        model._qtool_dir = Path(checkpoint_dir)
    if getattr(model, "_qtool_info", None) is None:
        model._qtool_info = info
    return load_scales(model, path, info)


remove_delta = restore_base_scales  # the name `qtool eval --delta` pairs with apply_delta
