"""GPTQ over a whole model, block by block (qtool.quant.gptq holds the per-layer math).

For each block: Linear layers that read the same input (q/k/v, gate/up) form a group;
groups are quantized in forward order, each on Hessians collected with the earlier
groups already quantized ("true sequential"). The block's quantized outputs then feed
the next block, so every layer sees the inputs it will see at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from qtool import dist
from qtool.methods.blocks import capture_inputs, iter_blocks, propagate, run_block
from qtool.methods.progress import progress_bar
from qtool.methods.registry import QuantizeOptions, register
from qtool.methods.rtn import quantize_lm_head
from qtool.models.load import decoder_layers
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import block_linears, set_module
from qtool.quant.gptq import accumulate_hessian, gptq
from qtool.quant.grid import QuantizedWeight


@torch.no_grad()
def input_groups(block: nn.Module, linears: dict[str, nn.Linear], x, kwargs) -> list[list[str]]:
    """Group the block's Linear layers by the tensor they read, in the order they run."""
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their identities unique
    order: list[str] = []
    hooks = []
    for name, lin in linears.items():
        def hook(_m, inp, name=name):
            seen[name] = inp[0]
            order.append(name)
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        run_block(block, x, kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    for name in order:
        if groups and seen[groups[-1][0]] is seen[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = [n for n in linears if n not in seen]
    return groups + [[n] for n in missing]


class _Collected(Exception):
    """Raised once every layer of the group has seen its input: the rest of the block is not needed."""


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], xs, kwargs, device) -> dict[str, torch.Tensor]:
    Hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    pending: set[str] = set()
    hooks = []
    for name in names:
        lin = block.get_submodule(name)
        K = lin.in_features
        Hs[name] = torch.zeros(K, K, device=device, dtype=torch.float32)
        counts[name] = 0

        def hook(_m, inp, name=name):
            Hs[name], counts[name] = accumulate_hessian(Hs[name], counts[name], inp[0])
            pending.discard(name)
            if not pending:
                raise _Collected
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for x in xs:
            pending.update(names)
            try:
                run_block(block, x.to(device), kwargs)
            except _Collected:
                pass
    finally:
        for h in hooks:
            h.remove()
    for name in names:  # data-parallel calibration: each process saw its own windows
        Hs[name], counts[name] = dist.merge_mean_(Hs[name], counts[name])
    return Hs


@register("gptq", needs_calibration=True)
@torch.no_grad()
def quantize_gptq(model: nn.Module, opts: QuantizeOptions, calib: torch.Tensor) -> dict:
    device = opts.device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    inputs = capture_inputs(model, dist.windows(calib), device)
    xs = inputs.x
    layers = decoder_layers(model)
    stats: dict[str, dict] = {}
    with progress_bar(opts.quiet) as bar:
        task = bar.add_task("gptq blocks", total=len(layers))
        for i, block in iter_blocks(model):
            block.to(device)
            kwargs = inputs.kwargs[i]
            linears = block_linears(block)
            done: list[QuantLinear] = []
            for group in input_groups(block, linears, xs[0].to(device), kwargs):
                H = collect_hessians(block, group[:1], xs, kwargs, device)[group[0]]
                # Layers reading the same input share H, and GPTQ treats rows independently:
                # quantize them as one stacked matrix (one column sweep instead of several).
                lins = [block.get_submodule(name) for name in group]
                W = torch.cat([lin.weight.float() for lin in lins])
                qw, st = gptq(W, H, opts.spec, opts.block_size, opts.damp, opts.act_order, opts.scale_dtype)
                dist.same_everywhere_(qw.codes, qw.scale, qw.zero, qw.perm)
                row = 0
                for name, lin in zip(group, lins, strict=True):
                    n = lin.out_features
                    part = QuantizedWeight(qw.codes[row : row + n], qw.scale[row : row + n],
                                           qw.zero[row : row + n], qw.perm)
                    q = QuantLinear.from_quantized(part, opts.spec.bits, opts.spec.group_size, lin.bias)
                    # The later groups' Hessians and the block's outputs run this layer once per window:
                    # dequantize it once for the block instead of unpacking its codes on every call
                    # (which took a third of a CPU profile of GPTQ on SmolLM2, more on the GPU's fp32
                    # fallback). Same Ŵ, same fp32 product.
                    q._dense, q.use_kernels = q.dequantize(torch.float32), False
                    done.append(q)
                    set_module(block, name, q)
                    row += n
                stats[f"{i}.{'+'.join(group)}"] = st
                del H
            xs = propagate(block, xs, kwargs, device)
            for q in done:
                q._dense, q.use_kernels = None, True
            block.to("cpu")
            bar.update(task, advance=1, info=f"block {i}")
    if opts.quantize_lm_head:
        base = model.get_output_embeddings()
        norm = _final_norm(model).to(device)
        H = torch.zeros(base.in_features, base.in_features, device=device)
        n = 0
        for x in xs:
            H, n = accumulate_hessian(H, n, norm(x.to(device)))
        H, n = dist.merge_mean_(H, n)
        quantize_lm_head(model, opts, H)
        norm.to("cpu")
    model.config.use_cache = use_cache
    model.to("cpu")
    damps = [s["damp"] for s in stats.values()]
    return {"layers": len(stats), "max_damp": max(damps) if damps else None,
            "proxy_loss_total": sum(s["proxy_loss"] for s in stats.values())}


def _final_norm(model: nn.Module) -> nn.Module:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.norm
