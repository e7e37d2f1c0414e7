"""NF4 (QLoRA): each Linear of every block quantized on its own to NF4 with blockwise absmax,
optionally with double-quantized constants. No data. The math is qtool.quant.nf4."""

from __future__ import annotations

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.methods.blocks import iter_blocks
from qtool.methods.progress import progress_bar
from qtool.methods.registry import QuantizeOptions, register
from qtool.models.load import decoder_layers
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.replace import block_linears, set_module
from qtool.quant.nf4 import bits_per_param


def block_size_of(opts: QuantizeOptions) -> int:
    """For nf4 the group size is the absmax block size (default 64)."""
    if opts.nf4_block_size is not None:
        return opts.nf4_block_size
    return 64 if opts.spec.group_size is None else opts.spec.group_size


def quantize_linear(layer: nn.Linear, opts: QuantizeOptions, block_size: int) -> NF4Linear:
    W = layer.weight.detach().to(opts.device, torch.float32)
    q = NF4Linear.from_weight(W, block_size, opts.double_quant, layer.bias)
    return q.to("cpu") if layer.weight.device.type == "cpu" else q


@register("nf4")
@torch.no_grad()
def quantize_nf4(model: nn.Module, opts: QuantizeOptions, calib=None) -> dict:
    if opts.spec.bits != 4:
        raise QtoolError(f"nf4 is a 4-bit data type; got --bits {opts.spec.bits}")
    block_size = block_size_of(opts)
    layers = decoder_layers(model)
    stored_bits, n_params = 0.0, 0
    with progress_bar(opts.quiet) as bar:
        task = bar.add_task("nf4 blocks", total=len(layers))
        for _, block in iter_blocks(model):
            for name, lin in block_linears(block).items():
                q = quantize_linear(lin, opts, block_size)
                set_module(block, name, q)
                n = q.in_features * q.out_features
                stored_bits += q.bits_per_param() * n
                n_params += n
            bar.update(task, advance=1)
    if opts.quantize_lm_head:
        head = model.get_output_embeddings()
        q = NF4Linear.from_weight(head.weight.detach().to(opts.device, torch.float32), block_size,
                                  opts.double_quant, head.bias).to("cpu")
        stored_bits += q.bits_per_param() * q.in_features * q.out_features
        n_params += q.in_features * q.out_features
        model.config.tie_word_embeddings = False
        model.set_output_embeddings(q)
    return {"nf4_block_size": block_size, "double_quant": opts.double_quant,
            "bits_per_param": round(bits_per_param(block_size, opts.double_quant), 4),
            "bits_per_param_stored": round(stored_bits / max(n_params, 1), 4)}
