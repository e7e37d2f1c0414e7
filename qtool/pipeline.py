"""End-to-end steps the CLI commands call: load → (calibrate) → quantize → save; load → evaluate."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.artifact.checkpoint import save_checkpoint
from qtool.data import calib as calib_mod
from qtool.errors import QtoolError
from qtool.methods import NEEDS_CALIBRATION, get_method, quantize_model
from qtool.models.load import load_model
from qtool.nn.replace import cast_float
from qtool.quant.grid import QuantSpec


@dataclass
class QuantizeConfig:
    model: str
    output: Path
    method: str
    spec: QuantSpec
    calib_path: Path | None = None
    calib_n: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scale_dtype: torch.dtype = torch.float16
    act_order: bool = False
    quantize_lm_head: bool = False
    overwrite: bool = False
    quiet: bool = False
    keep_dtype: torch.dtype | None = None  # dtype of unquantized tensors in the checkpoint
    double_quant: bool = True  # nf4 only: 8-bit absmax constants
    nf4_block_size: int | None = None  # nf4 only: absmax block (32 | 64 | 128 | 256)


def peak_memory() -> dict:
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def quantize(cfg: QuantizeConfig) -> dict:
    get_method(cfg.method)  # unknown / not-yet-implemented methods fail before any work
    if cfg.output.exists() and not cfg.overwrite:
        raise QtoolError(f"output {cfg.output} exists (use --overwrite)")
    torch.manual_seed(cfg.seed)
    model, tok, source = load_model(cfg.model)
    calib_info = None
    ids = None
    if cfg.method in NEEDS_CALIBRATION:
        max_len = calib_mod.model_max_seqlen(model.config)
        if cfg.calib_path is not None:
            cs = calib_mod.load(cfg.calib_path, tok)
        else:
            cs = calib_mod.build(tok, "bbc", cfg.calib_n, cfg.calib_seqlen, cfg.seed, max_len)
        if cs.input_ids.shape[1] > max_len:
            raise QtoolError(f"calibration windows of {cs.input_ids.shape[1]} tokens exceed the model's "
                             f"context of {max_len}")
        ids = cs.input_ids
        calib_info = {**cs.meta, "fingerprint": cs.fingerprint,
                      "path": str(cfg.calib_path) if cfg.calib_path else None}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = quantize_model(model, cfg.spec, cfg.method, calib=ids, device=cfg.device,
                           scale_dtype=cfg.scale_dtype, quantize_lm_head=cfg.quantize_lm_head,
                           act_order=cfg.act_order, quiet=cfg.quiet, double_quant=cfg.double_quant,
                           nf4_block_size=cfg.nf4_block_size)
    seconds = time.perf_counter() - t0
    if cfg.keep_dtype is not None:
        cast_float(model, cfg.keep_dtype)
    info = {
        "method": cfg.method,
        "bits": cfg.spec.bits,
        "group_size": stats.get("nf4_block_size", cfg.spec.group_size),
        "symmetric": cfg.spec.symmetric,
        "act_order": cfg.act_order,
        "quantize_lm_head": cfg.quantize_lm_head,
        "source": source.to_dict(),
        "calibration": calib_info,
        "stats": {**stats, "seconds": round(seconds, 2), **peak_memory(), "device": str(cfg.device),
                  "seed": cfg.seed},
    }
    return save_checkpoint(model, tok, info, cfg.output, cfg.overwrite)
