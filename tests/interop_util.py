"""Shared helpers for the interop tests: qtool checkpoints made with RTN from an in-memory model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from qtool.artifact.checkpoint import save_checkpoint
from qtool.methods import quantize_model
from qtool.quant.grid import QuantSpec


def rtn_checkpoint(fp_model, tok, out: Path, bits: int, group_size: int | None, symmetric: bool = False):
    """Quantize a copy of `fp_model` with RTN and save it as a qtool checkpoint at `out`;
    returns (out, the quantized model)."""
    model = copy.deepcopy(fp_model)
    quantize_model(model, QuantSpec(bits, group_size, symmetric), "rtn", quiet=True)
    save_checkpoint(model, tok, {"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": symmetric},
                    out)
    return out, model.eval()


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def with_act_order(model, seed: int = 0):
    """Give every QuantLinear a random act-order permutation (column j then encodes feature perm[j]):
    a valid act-order layer, as GPTQ --act-order writes, without running GPTQ."""
    from qtool.nn.qlinear import QuantLinear
    from qtool.nn.replace import quant_linears, set_module
    from qtool.quant.grid import QuantizedWeight

    g = torch.Generator().manual_seed(seed)
    for name, m in quant_linears(model).items():
        perm = torch.randperm(m.in_features, generator=g)
        qw = QuantizedWeight(m.codes(), m.scales.clone(), m.zeros.clone(), perm)
        set_module(model, name, QuantLinear.from_quantized(qw, m.bits, m.group_size, m.bias))
    return model


def tiny_checkpoint(out: Path, bits: int, group_size: int | None, symmetric: bool = False, act_order: bool = False,
                    hidden: int = 128, inter: int = 256, seed: int = 0, edit=None) -> Path:
    """A tiny random Llama quantized with RTN, saved as a qtool checkpoint; `edit(model)` may
    change the quantized model before it is saved."""
    from peqa_util import byte_tokenizer, tiny_llama

    model = tiny_llama(seed, hidden=hidden, inter=inter)
    quantize_model(model, QuantSpec(bits, group_size, symmetric), "rtn", quiet=True)
    if act_order:
        with_act_order(model, seed)
    if edit is not None:
        edit(model)
    save_checkpoint(model, byte_tokenizer(), {"method": "rtn", "bits": bits, "group_size": group_size,
                                              "symmetric": symmetric, "act_order": act_order}, out)
    return out
