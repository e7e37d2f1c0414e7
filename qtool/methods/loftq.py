"""LoftQ (METHODS.md §6): quantize every Linear of every block so that the quantized base plus a
rank-r LoRA adapter approximates the fp weight. No data. The math, for one matrix, is
qtool.quant.loftq; this file only walks the model.

  loftq      base = qtool's integer grid (RTN with --bits / --group-size / --symmetric): a normal
             QuantLinear checkpoint that PEQA, GPTQ-era tools and the kernels all read
  loftq-nf4  base = NF4 (QLoRA's data type, LoftQ's own setting), NF4Linear layers

Each layer is left wrapped in qtool.nn.lora.LoraLinear holding the LoftQ factors, so the model
returned is Ŵ + (α/r)·B·A; qtool.pipeline takes the adapter off and writes it as a PEFT sidecar.
With T = 0 the base is plain RTN (NF4) and the adapter keeps PEFT's default init (A Kaiming-uniform,
B = 0: the QLoRA start). The output head, when quantized, gets plain RTN (NF4) and no adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.methods.blocks import iter_blocks
from qtool.methods.nf4 import block_size_of
from qtool.methods.progress import progress_bar
from qtool.methods.registry import QuantizeOptions, register
from qtool.methods.rtn import quantize_lm_head
from qtool.models.load import decoder_layers
from qtool.nn.lora import LoraLinear
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import block_linears, set_module
from qtool.quant.loftq import LoftQResult, Quantizer, int_quantizer, loftq
from qtool.quant.nf4 import bits_per_param


def check_options(model: nn.Module, opts: QuantizeOptions) -> None:
    """Fail before any work: the rank must fit every layer (the SVD has min(out, in) components)."""
    if opts.lora_rank < 1:
        raise QtoolError(f"--rank must be ≥ 1, got {opts.lora_rank}")
    if not opts.lora_alpha > 0:
        raise QtoolError(f"--alpha must be > 0, got {opts.lora_alpha}")
    if opts.loftq_iters < 0:
        raise QtoolError(f"--loftq-iters must be ≥ 0, got {opts.loftq_iters}")
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            if opts.lora_rank > min(lin.in_features, lin.out_features):
                raise QtoolError(f"--rank {opts.lora_rank} exceeds min(out, in) = "
                                 f"{min(lin.in_features, lin.out_features)} of block {i} {name}")


def nf4_quantizer(block_size: int, double_quant: bool, bias: torch.Tensor | None) -> Quantizer:
    """NF4 as a LoftQ quantizer; the layer itself is what is kept, Ŵ is what it stores."""

    def quant(W: torch.Tensor) -> tuple[NF4Linear, torch.Tensor]:
        layer = NF4Linear.from_weight(W, block_size, double_quant, bias)
        return layer, layer.dequantize()

    return quant


def wrap(lin: nn.Linear, res: LoftQResult, opts: QuantizeOptions, nf4: bool) -> LoraLinear:
    base = res.q if nf4 else QuantLinear.from_quantized(res.q, opts.spec.bits, opts.spec.group_size, lin.bias)
    if lin.weight.device.type == "cpu":
        base = base.to("cpu")
    wrapper = LoraLinear(base, opts.lora_rank, opts.lora_alpha)
    if res.iters > 0:  # T = 0 keeps the wrapper's PEFT default init (B = 0)
        wrapper.lora_A.weight.copy_(res.A)
        wrapper.lora_B.weight.copy_(res.B)
    return wrapper


def run(model: nn.Module, opts: QuantizeOptions, nf4: bool) -> dict:
    check_options(model, opts)
    scaling = opts.lora_alpha / opts.lora_rank
    block_size = block_size_of(opts) if nf4 else None
    int_quant = int_quantizer(opts.spec, opts.scale_dtype)
    before, after, early, n = 0.0, 0.0, 0, 0
    layers = decoder_layers(model)
    with progress_bar(opts.quiet) as bar:
        task = bar.add_task(f"loftq{'-nf4' if nf4 else ''} blocks", total=len(layers))
        for _, block in iter_blocks(model):
            for name, lin in block_linears(block).items():
                W = lin.weight.detach().to(opts.device, torch.float32)
                quant = nf4_quantizer(block_size, opts.double_quant, lin.bias) if nf4 else int_quant
                res = loftq(W, quant, opts.lora_rank, scaling, opts.loftq_iters)
                set_module(block, name, wrap(lin, res, opts, nf4))
                norm = torch.linalg.matrix_norm(W).item() or 1.0
                before += res.errors[0] / norm
                after += res.errors[-1] / norm
                early += res.iters < opts.loftq_iters
                n += 1
            bar.update(task, advance=1, info=f"rel. error {before / max(n, 1):.4f} → {after / max(n, 1):.4f}")
    stats = {"loftq_iters": opts.loftq_iters, "lora_rank": opts.lora_rank, "lora_alpha": opts.lora_alpha,
             "loftq_base": "nf4" if nf4 else "int",
             # mean over layers of ‖W − Ŵ‖/‖W‖ (plain quantization) and ‖W − Ŵ − (α/r)BA‖/‖W‖ (LoftQ)
             "weight_rel_error_quant": round(before / max(n, 1), 6),
             "weight_rel_error_loftq": round(after / max(n, 1), 6),
             "loftq_layers_converged_early": early}
    if opts.quantize_lm_head:
        head = model.get_output_embeddings()
        if nf4:
            q = NF4Linear.from_weight(head.weight.detach().to(opts.device, torch.float32), block_size,
                                      opts.double_quant, head.bias).to("cpu")
            model.config.tie_word_embeddings = False
            model.set_output_embeddings(q)
        else:
            quantize_lm_head(model, opts)
    if nf4:
        stats.update({"nf4_block_size": block_size, "double_quant": opts.double_quant,
                      "bits_per_param": round(bits_per_param(block_size, opts.double_quant), 4)})
    return stats


@register("loftq")
@torch.no_grad()
def quantize_loftq(model: nn.Module, opts: QuantizeOptions, calib=None) -> dict:
    return run(model, opts, nf4=False)


@register("loftq-nf4")
@torch.no_grad()
def quantize_loftq_nf4(model: nn.Module, opts: QuantizeOptions, calib=None) -> dict:
    if opts.spec.bits != 4:
        raise QtoolError(f"loftq-nf4 has a 4-bit NF4 base; got --bits {opts.spec.bits}")
    return run(model, opts, nf4=True)
