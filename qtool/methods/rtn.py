"""Round-to-nearest: each Linear quantized on its own, no data."""

from __future__ import annotations

import torch
from torch import nn

from qtool.methods.blocks import iter_blocks
from qtool.methods.progress import progress_bar
from qtool.methods.registry import QuantizeOptions, register
from qtool.models.load import decoder_layers
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import block_linears, set_module
from qtool.quant.grid import rtn


def quantize_linear(layer: nn.Linear, opts: QuantizeOptions) -> QuantLinear:
    W = layer.weight.detach().to(opts.device, torch.float32)
    qw = rtn(W, opts.spec, opts.scale_dtype)
    q = QuantLinear.from_quantized(qw, opts.spec.bits, opts.spec.group_size, layer.bias)
    return q.to("cpu") if layer.weight.device.type == "cpu" else q


@register("rtn")
@torch.no_grad()
def quantize_rtn(model: nn.Module, opts: QuantizeOptions, calib=None) -> dict:
    layers = decoder_layers(model)
    with progress_bar(opts.quiet) as bar:
        task = bar.add_task("rtn blocks", total=len(layers))
        for _, block in iter_blocks(model):
            for name, lin in block_linears(block).items():
                set_module(block, name, quantize_linear(lin, opts))
            bar.update(task, advance=1)
    if opts.quantize_lm_head:
        quantize_lm_head(model, opts)
    return {}


def quantize_lm_head(model: nn.Module, opts: QuantizeOptions, H=None) -> None:
    """RTN (or GPTQ when a Hessian is given) on the output projection; unties it from the embedding."""
    head = model.get_output_embeddings()
    W = head.weight.detach().to(opts.device, torch.float32)
    if H is None:
        qw = rtn(W, opts.spec, opts.scale_dtype)
    else:
        from qtool.quant.gptq import gptq

        qw, _ = gptq(W, H, opts.spec, opts.block_size, opts.damp, opts.act_order, opts.scale_dtype)
    q = QuantLinear.from_quantized(qw, opts.spec.bits, opts.spec.group_size, head.bias).to("cpu")
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(q)
