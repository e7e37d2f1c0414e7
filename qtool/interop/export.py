"""`qtool export`: write a qtool checkpoint (optionally with a task's PEQA scales, and with a
LoRA adapter beside it) as a Hugging Face model directory another stack loads.

Every check runs before anything is written; the output appears complete (atomic directory
rename) or not at all.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from qtool.artifact.adapter import CONFIG as ADAPTER_CONFIG
from qtool.artifact.adapter import check_adapter, read_adapter
from qtool.artifact.atomic import atomic_dir
from qtool.artifact.checkpoint import load_checkpoint
from qtool.errors import QtoolError
from qtool.interop import bnb_nf4, gptq
from qtool.interop import compressed_tensors as ct
from qtool.interop.hf_dir import copy_side_files, write_config, write_tensors
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import quantized_linears

FORMATS = ("compressed-tensors", "gptq", "bnb-nf4")
ADAPTER_DIR = "adapter"


@dataclass
class ExportReport:
    path: Path
    format: str
    layers: int  # quantized Linears written
    dense: list[str]  # Linears that stayed dense (the format's ignore list)
    runtimes: list[str]  # who loads the result (tested here or documented by that project)
    task: str | None = None
    adapter: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_vllm_adapter(path: Path) -> None:
    """What vLLM's LoRA loader accepts: no modules_to_save, no DoRA. One line otherwise."""
    read_adapter(path)  # the PEFT format itself (shapes, parts)
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    if cfg.get("use_dora"):
        raise QtoolError(f"{path}: a DoRA adapter; vLLM's LoRA loader refuses DoRA (serve it with transformers + "
                         "PEFT, or train --method lora without --dora)")
    if cfg.get("modules_to_save"):
        raise QtoolError(f"{path}: adapter has modules_to_save {cfg['modules_to_save']}; vLLM's LoRA loader "
                         "refuses those")


def _dense_linears(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def _dense_tensors(model: nn.Module, layers: dict[str, nn.Module], tied: set[str]) -> dict[str, Tensor]:
    """Every state-dict tensor except the quantized layers' storage (their bias stays, HF-named)."""
    out = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if k in tied or v is None or (mod in layers and leaf != "bias"):
            continue
        out[k] = v.detach().cpu().contiguous()
    return out


def _int_layers(layers: dict[str, nn.Module], fmt: str) -> dict[str, QuantLinear]:
    nf4 = [n for n, m in layers.items() if isinstance(m, NF4Linear)]
    if nf4:
        raise QtoolError(f"{nf4[0]} is an NF4 layer; --format {fmt} holds integer grids: use --format bnb-nf4")
    grids = {(m.bits, m.group_size) for m in layers.values()}
    if len(grids) != 1:
        raise QtoolError(f"layers use {len(grids)} different bit-width/group-size pairs; --format {fmt} is "
                         "written with one config group")
    return layers  # type: ignore[return-value]


def _build(fmt: str, layers: dict[str, nn.Module], dense: list[str], gptq_v1: bool
           ) -> tuple[dict[str, Tensor], dict, list[str]]:
    """(quantized tensors by full name, quantization_config, runtimes) for the format."""
    out: dict[str, Tensor] = {}
    if fmt == "bnb-nf4":
        ints = [n for n, m in layers.items() if not isinstance(m, NF4Linear)]
        if ints:
            raise QtoolError(f"{ints[0]} is an integer-grid layer; --format bnb-nf4 holds NF4 checkpoints "
                             "(`qtool quantize --method nf4`): use --format compressed-tensors or gptq")
        for name, m in layers.items():
            out.update({f"{name}.{k}": v for k, v in bnb_nf4.layer_tensors(m).items()})
        first = next(iter(layers.values()))
        return out, bnb_nf4.quantization_config(first, dense), bnb_nf4.RUNTIMES
    ints = _int_layers(layers, fmt)
    first = next(iter(ints.values()))
    if fmt == "compressed-tensors":
        all_K = sorted({m.in_features for m in ints.values()})
        for name, m in ints.items():
            ct.check_layer(name, m, all_K)
        sym = all(ct.is_symmetric(m) for m in ints.values())
        for name, m in ints.items():
            out.update({f"{name}.{k}": v for k, v in ct.layer_tensors(m, sym).items()})
        return out, ct.quantization_config(first.bits, first.group_size, sym, dense), ct.runtimes(first.bits, sym)
    for name, m in ints.items():
        gptq.check_layer(name, m, gptq_v1)
    sym = all(ct.is_symmetric(m) for m in ints.values())
    act = any(m.perm is not None for m in ints.values())
    for name, m in ints.items():
        out.update({f"{name}.{k}": v for k, v in gptq.layer_tensors(m, gptq_v1).items()})
    qc = gptq.quantization_config(first.bits, first.group_size, sym, act, gptq_v1, dense)
    return out, qc, gptq.runtimes(first.bits, sym)


def export_checkpoint(ckpt: Path, fmt: str, out: Path, delta: Path | None = None, adapter: Path | None = None,
                      overwrite: bool = False, gptq_v1: bool = False) -> ExportReport:
    t0 = time.perf_counter()
    ckpt, out = Path(ckpt), Path(out)
    if fmt not in FORMATS:
        raise QtoolError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if gptq_v1 and fmt != "gptq":
        raise QtoolError("--gptq-v1 applies to --format gptq only")
    if out.exists() and not overwrite:
        raise QtoolError(f"output {out} exists (use --overwrite)")
    if out.resolve() == ckpt.resolve():
        raise QtoolError("-o must differ from the checkpoint directory")
    if adapter is not None:
        check_vllm_adapter(adapter)
    ck = load_checkpoint(ckpt, with_tokenizer=False)
    model, info = ck.model, ck.info
    task = None
    if delta is not None:
        task = model.load_scales(Path(delta)).task  # refuses a Δs made for another base
    layers = quantized_linears(model)
    if adapter is not None:
        check_adapter(read_adapter(adapter), layers, info.get("fingerprint"), str(ckpt))
    dense_names = _dense_linears(model)
    tensors, qc, runtimes = _build(fmt, layers, dense_names, gptq_v1)
    tensors.update(_dense_tensors(model, layers, set(info.get("tied", []))))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_config(ckpt, tmp, qc)
        write_tensors(tmp, tensors)
        copied = copy_side_files(ckpt, tmp)
        if "generation_config.json" not in copied and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)  # the defaults transformers derives from config.json
        if fmt == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
        if adapter is not None:
            shutil.copytree(adapter, tmp / ADAPTER_DIR)
    return ExportReport(out, fmt, len(layers), dense_names, runtimes, task, adapter is not None,
                        time.perf_counter() - t0)
