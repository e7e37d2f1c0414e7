"""`qtool bench train`: training-step tokens/s and peak memory, PEQA and LoRA on the integer
base (and QLoRA on NF4) against bf16 LoRA on the fp model, same batch, same process.

Every variant runs the same step (forward with the model's own loss, backward, AdamW step)
on the same random token batch under bf16 autocast, with the non-quantized weights in bf16
and the trainable values in fp32. The first `warmup` steps (Triton compilation, cuBLAS
workspace, allocator growth) are not timed; the peak is read over the timed steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from qtool.errors import QtoolError

VARIANTS = ("bf16-lora", "peqa", "lora", "qlora")


def _trainable(model: nn.Module, variant: str, bits: int, group_size: int | None, rank: int
               ) -> dict[str, nn.Parameter]:
    from qtool.methods import quantize_model
    from qtool.methods.peqa import trainable_scales
    from qtool.nn.lora import add_lora, lora_parameters
    from qtool.nn.replace import cast_float
    from qtool.quant.grid import QuantSpec

    if variant in ("peqa", "lora"):
        quantize_model(model, QuantSpec(bits, group_size), "rtn", quiet=True)
    elif variant == "qlora":
        quantize_model(model, QuantSpec(4, 64), "nf4", quiet=True)
    cast_float(model, torch.bfloat16)
    if variant == "peqa":
        return trainable_scales(model)
    return lora_parameters(add_lora(model, rank, 16.0, 0.0))


def _step_fn(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor) -> Callable[[], float]:
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = ids.is_cuda

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def measure(model_name: str, variant: str, bits: int, group_size: int | None, batch: int, seqlen: int,
            steps: int, warmup: int, rank: int, device: torch.device, grad_checkpoint: bool = False) -> dict:
    from qtool.models.load import load_model

    if variant not in VARIANTS:
        raise QtoolError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    model, _, _ = load_model(model_name)
    params = _trainable(model, variant, bits, group_size, rank)
    model.to(device).train()
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    step = _step_fn(model, list(params.values()), ids)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in losses):
        raise QtoolError(f"{variant}: non-finite loss during the benchmark")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"variant": variant, "trainable": sum(p.numel() for p in params.values()),
            "tokens_per_s": batch * seqlen * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "peak_gb": None if peak is None else peak / 1e9, "final_loss": losses[-1]}


def run(model_name: str, variants: tuple[str, ...], bits: int, group_size: int | None, batch: int, seqlen: int,
        steps: int, warmup: int, rank: int, device: str = "cuda", grad_checkpoint: bool = False) -> dict:
    """Measure each variant in turn (a fresh model each); ratios are against bf16-lora when present."""
    if device == "cuda" and not torch.cuda.is_available():
        raise QtoolError("`qtool bench train` measures on a CUDA GPU (--device cpu only for a smoke run)")
    dev = torch.device(device)
    rows = []
    for v in variants:
        rows.append(measure(model_name, v, bits, group_size, batch, seqlen, steps, warmup, rank, dev,
                            grad_checkpoint))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["variant"] == "bf16-lora"), None)
    for r in rows:
        r["vs_bf16_lora"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    return {"model": model_name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "bits": bits, "group_size": group_size, "batch": batch, "seqlen": seqlen,
            "steps": steps, "warmup": warmup, "rank": rank, "grad_checkpoint": grad_checkpoint, "rows": rows}
