"""`qtool bench apiq-block`: one Llama-2-7B-shaped block through ApiQ calibration.

The block is transformers' own LlamaDecoderLayer (hidden 4096, MLP 11008, 32 heads, random
weights), calibrated exactly as `qtool quantize --method apiq-bw` does (qtool.methods.apiq.
calibrate_block) on a few windows for a few epochs. Measured: seconds per optimisation step,
seconds per window of the three forward passes around the training (teacher, loss before,
propagation), and peak GPU memory with the window activations separated out. Projected: one
7B calibration at ApiQ's setting (32 blocks, 128 windows of 2048 tokens, 20 epochs), with the
activations on the GPU or in pinned host memory (--offload cpu).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass

import torch

from qtool.errors import QtoolError


@dataclass(frozen=True)
class BlockShape:
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    blocks: int = 32  # of the full model, for the projection
    vocab: int = 32000


def run(method: str = "apiq-bw", bits: int = 2, group_size: int | None = 64, rank: int = 64, windows: int = 8,
        seqlen: int = 2048, epochs: int = 1, offload: str = "gpu", device: str = "cuda",
        shape: BlockShape = BlockShape(), full_windows: int = 128, full_epochs: int = 20,
        warmup: bool = True) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.methods import ApiqOptions, QuantizeOptions
    from qtool.methods.apiq import Windows, activation_bytes, calibrate_block, choose_store, make_config
    from qtool.methods.blocks import capture_inputs
    from qtool.models.load import decoder_layers
    from qtool.quant.grid import QuantSpec

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QtoolError("bench apiq-block needs a CUDA GPU (or --device cpu with a small --hidden)")
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.heads, num_hidden_layers=1,
                         vocab_size=shape.vocab, max_position_embeddings=max(4096, seqlen), use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, shape.vocab, (windows, seqlen))
    opts = QuantizeOptions(QuantSpec(bits, group_size), device=dev, lora_rank=rank, quiet=True,
                           apiq=ApiqOptions(epochs=epochs, offload=offload))
    cfg = make_config(method, opts)
    store = choose_store(offload, dev, activation_bytes(model, ids, cfg))
    inputs = capture_inputs(model, ids, dev, store=store)
    model.get_input_embeddings().to("cpu")  # only the block counts
    model.get_output_embeddings().to("cpu")
    X = Windows(store, inputs.x)
    Xq = Windows(store, X)
    block = decoder_layers(model)[0]
    if warmup:
        # The first block a process calibrates pays for cuBLAS/attention setup and allocator growth
        # (measured: ~0.2 s per step over 8 steps without this); time a second, identical run.
        one = Windows(store, [X[0]])
        calibrate_block(copy.deepcopy(block), 0, one, Windows(store, one), inputs.kwargs[0],
                        dataclasses.replace(cfg, epochs=1), dev)
        del one
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    res, _ = calibrate_block(block, 0, X, Xq, inputs.kwargs[0], cfg, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1024**3 if dev.type == "cuda" else None
    set_gb = windows * seqlen * shape.hidden * 4 / 1024**3  # one set of window activations (fp32)
    n_sets = 3 + cfg.aug_loss  # X, Xq, teacher (+ aug teacher): see qtool.methods.apiq.activation_bytes
    on_gpu = store.type == "cuda"
    # One set (X, which Xq still shares at block 0) predates `base`; the teacher outputs and the
    # new Xq (and the aug teacher) are inside `peak`: take them out to get the block's own share.
    block_peak = None if peak is None else peak - (set_gb * (n_sets - 1) if on_gpu else 0.0)
    step = res.train_seconds / max(res.steps, 1)
    per_window = (res.seconds - res.train_seconds) / windows
    full_steps = full_windows * full_epochs
    block_seconds = step * full_steps + per_window * full_windows
    full_set = full_windows * seqlen * shape.hidden * 4 / 1024**3
    return {
        "method": method, "bits": bits, "group_size": group_size, "rank": cfg.rank, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "shape": asdict(shape),
        "measured": {"windows": windows, "seqlen": seqlen, "epochs": epochs, "steps": res.steps,
                     "seconds": round(res.seconds, 2), "train_seconds": round(res.train_seconds, 2),
                     "seconds_per_step": round(step, 4), "forward_seconds_per_window": round(per_window, 4),
                     "activations_on": store.type, "peak_gpu_gb": _round(peak, 3),
                     "peak_gpu_gb_block_only": _round(block_peak, 3),
                     "loss_before": res.loss_before, "loss_after": res.loss_after},
        "projected_7b": {"blocks": shape.blocks, "windows": full_windows, "epochs": full_epochs,
                         "seconds_per_block": round(block_seconds, 1),
                         "hours": round(block_seconds * shape.blocks / 3600, 2),
                         "peak_gpu_gb_activations_on_gpu": _round(block_peak and block_peak + n_sets * full_set, 2),
                         "peak_gpu_gb_activations_offloaded": _round(block_peak, 2),
                         "host_gb_activations_offloaded": round(n_sets * full_set, 2)},
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)
