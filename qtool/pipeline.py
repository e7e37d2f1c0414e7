"""End-to-end steps the CLI commands call: load → (calibrate) → quantize → save; load → evaluate."""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool import dist
from qtool.artifact.adapter import AdapterSpec, save_adapter
from qtool.artifact.checkpoint import CheckpointWriter, tied_keys
from qtool.data import calib as calib_mod
from qtool.errors import QtoolError
from qtool.methods import NEEDS_CALIBRATION, ApiqOptions, get_method, quantize_model
from qtool.models.stream import estimate_peak_bytes, open_model_streaming
from qtool.nn.lora import DEFAULT_TARGETS, lora_layers, lora_tensors, remove_lora
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
    lora_rank: int = 64  # loftq: rank r of the adapter written to OUTPUT/adapter/
    lora_alpha: float = 16.0  # loftq: LoRA α (scaling α/r)
    loftq_iters: int = 5  # loftq: alternations T
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # apiq: layers that get LoRA
    apiq: ApiqOptions = field(default_factory=ApiqOptions)  # apiq-bw | apiq-lw | omniquant training
    max_ram_gb: float | None = None  # refuse before any work when the estimated host memory is larger


STREAM_SHARD_BYTES = 128 * 1024**2  # a shard being written is held in memory until it is full
ADAPTER_DIR = "adapter"  # where quantize writes the LoRA adapter of a method that initialises one


def peak_memory() -> dict:
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def quantize(cfg: QuantizeConfig) -> dict:
    """Stream the source one block at a time (qtool.models.stream): read it, quantize it, write it,
    free it. Peak host memory: the tensors outside the blocks, one block, the calibration activations."""
    get_method(cfg.method)  # unknown / not-yet-implemented methods fail before any work
    if cfg.output.exists() and not cfg.overwrite:
        raise QtoolError(f"output {cfg.output} exists (use --overwrite)")
    torch.manual_seed(cfg.seed)
    # Methods that run blocks forward on calibration data compute in fp32 (as the fp reference did
    # when whole fp32 models were loaded); the data-free ones quantize each Linear in fp32 from the
    # source's dtype, so their blocks stay as stored (bf16 for most hub checkpoints).
    compute = torch.float32 if cfg.method in NEEDS_CALIBRATION else None
    stream, tok, source = open_model_streaming(cfg.model, block_dtype=compute, rest_dtype=compute)
    model = stream.model
    if cfg.max_ram_gb is not None:
        need = estimate_peak_bytes(stream, compute) + calib_bytes(cfg, model)
        if need > cfg.max_ram_gb * 1024**3:
            raise QtoolError(f"{cfg.model} needs about {need / 1024**3:.1f} GB of host memory to quantize with "
                             f"{cfg.method} (tensors outside the blocks + one block + calibration), more than "
                             f"--max-ram {cfg.max_ram_gb:g} GB")
    calib_info = None
    ids = None
    if cfg.method in NEEDS_CALIBRATION:
        max_len = calib_mod.model_max_seqlen(model.config)
        if cfg.calib_path is not None:
            cs = calib_mod.load(cfg.calib_path, tok, getattr(model.config, "vocab_size", None))
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
    adapters = _AdapterSink()
    writer_cm = (CheckpointWriter(cfg.output, cfg.overwrite, STREAM_SHARD_BYTES) if dist.is_main()
                 else _NoWriter())
    with writer_cm as writer:
        def release(i: int, block: torch.nn.Module) -> None:
            adapters.take(model)  # the block is still in the model: LoRA names keep their full path
            if cfg.keep_dtype is not None:
                cast_float(block, cfg.keep_dtype)
            writer.add(block, f"{stream.layers_prefix}.{i}.")

        stream.on_release = release
        model.qtool_stream = stream
        t0 = time.perf_counter()
        try:
            stats = quantize_model(model, cfg.spec, cfg.method, calib=ids, device=cfg.device,
                                   scale_dtype=cfg.scale_dtype, quantize_lm_head=cfg.quantize_lm_head,
                                   act_order=cfg.act_order, quiet=cfg.quiet, double_quant=cfg.double_quant,
                                   nf4_block_size=cfg.nf4_block_size, lora_rank=cfg.lora_rank,
                                   lora_alpha=cfg.lora_alpha, loftq_iters=cfg.loftq_iters,
                                   lora_targets=cfg.lora_targets, seed=cfg.seed, apiq=cfg.apiq)
        finally:
            del model.qtool_stream
            stream.reader.close()
        seconds = time.perf_counter() - t0
        if len(stream.released) != len(stream.layers):
            raise QtoolError(f"method {cfg.method} left {len(stream.layers) - len(stream.released)} blocks "
                             "unprocessed")
        adapters.take(model)  # the output head never gets one; kept for symmetry with whole models
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
        write_adapter = None
        if adapters.tensors:
            # Inside the checkpoint's atomic write, after its manifest, so the sidecar records the
            # fingerprint of the base as written. A sub-directory: the manifest hashes only
            # top-level files, so the checkpoint itself is unchanged.
            spec = adapters.spec()
            fields = {k: v for k, v in stats.items() if isinstance(v, (bool, int, float, str))}

            def write_adapter(tmp: Path, written: dict) -> None:
                save_adapter(tmp / ADAPTER_DIR, adapters.tensors, spec, written["fingerprint"], init=cfg.method,
                             **fields)

        if not dist.is_main():  # data-parallel calibration: every process holds the same model; rank 0 writes
            return info
        tied = tied_keys(model)
        writer.add(model, "", skip=tied)
        info = writer.finish(model.config, tok, info, tied, extra=write_adapter)
    if adapters.tensors:
        info = {**info, "adapter": str(cfg.output / ADAPTER_DIR)}
    if cfg.apiq.state_dir is not None and cfg.apiq.state_dir.exists():
        shutil.rmtree(cfg.apiq.state_dir)  # resumable state of a training method: done with it
    return info


def calib_bytes(cfg: QuantizeConfig, model: torch.nn.Module) -> int:
    """Host memory of the calibration activations when they stay on the CPU (one fp32 set of block
    inputs; training methods keep three)."""
    if cfg.method not in NEEDS_CALIBRATION or cfg.device.type == "cuda":
        return 0
    sets = 1 if cfg.method == "gptq" else 3
    return sets * cfg.calib_n * cfg.calib_seqlen * model.config.hidden_size * 4


class _NoWriter:
    """The checkpoint writer of a process other than rank 0 in data-parallel calibration: it computes
    the same blocks and writes nothing."""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add(self, *args, **kwargs) -> None:
        pass


class _AdapterSink:
    """LoRA tensors taken off each block as it is written (loftq, apiq): the adapter is small."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.first = None
        self.leaves: set[str] = set()

    def take(self, model: torch.nn.Module) -> None:
        layers = lora_layers(model)
        if not layers:
            return
        self.first = self.first or next(iter(layers.values()))
        self.leaves |= {n.rpartition(".")[2] for n in layers}
        self.tensors.update(lora_tensors(layers))
        remove_lora(model)

    def spec(self) -> AdapterSpec:
        w = self.first
        return AdapterSpec(w.rank, w.alpha, 0.0, w.lora_magnitude_vector is not None, tuple(sorted(self.leaves)))
