"""Packed integer storage that FSDP can shard: the bytes of each packed buffer held by a frozen
float32 Parameter (bitsandbytes' `quant_storage` idea), viewed back to its integer dtype when used.

FSDP shards parameters, never buffers, and a packed QuantLinear / NF4Linear keeps its weight in
integer buffers (int32 `qweight`, uint8 `nf4_codes`). `to_float_storage` moves each such buffer
into a Parameter `<name>_storage` (requires_grad=False): its bytes, flattened, padded to a
multiple of 4 and reinterpreted as float32, so FSDP sees one more float parameter to shard and
all-gather. Collectives copy bytes, so every bit pattern (NaN payloads included) comes back
intact; mixed precision must not cast these parameters (see docs/distributed.md). A forward
pre-hook puts the integer view back under the buffer's name each time the layer runs, after
FSDP's own pre-forward hook (on the enclosing block) has gathered the full parameter, and a
forward hook takes it away again (the buffer is None between forwards). The view shares the
gathered storage, which FSDP frees after forward and refills in place before backward, so
what autograd saved stays valid. Apply FSDP to modules that contain packed layers (the
blocks), never to a packed layer itself: its FSDP hook would run after ours, and our view would
see the shard.

Scales, zeros and biases stay buffers: at 4 bits, group 128 they are about 5 % of the packed
weight, replicated on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear

PACKED = {QuantLinear: ("qweight",), NF4Linear: ("nf4_codes",)}
SUFFIX = "_storage"


def float_storage(t: Tensor) -> Tensor:
    """The bytes of `t` as a 1-D float32 tensor (zero-padded to whole words)."""
    b = t.detach().contiguous().view(-1).view(torch.uint8)
    pad = (-b.numel()) % 4
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    return b.view(torch.float32)


def integer_view(storage: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """`storage`'s first bytes seen as a `dtype` tensor of `shape` (no copy)."""
    n = shape.numel() * torch.empty(0, dtype=dtype).element_size()
    return storage.view(torch.uint8)[:n].view(dtype).view(shape)


def _restore_hook(layer: nn.Module, _inputs) -> None:
    for name, (dtype, shape) in layer._packed_meta.items():
        layer._buffers[name] = integer_view(getattr(layer, name + SUFFIX), dtype, shape)


def _drop_hook(layer: nn.Module, _inputs, _output) -> None:
    # Between forwards no view may hold the gathered storage (FSDP frees it after forward);
    # what backward needs, autograd saved itself.
    for name in layer._packed_meta:
        layer._buffers[name] = None


def to_float_storage(model: nn.Module) -> int:
    """Move every packed buffer of the model's quantized layers into a frozen float32 Parameter;
    returns the number of bytes moved. The model computes exactly as before."""
    moved = 0
    for layer in model.modules():
        names = next((v for k, v in PACKED.items() if isinstance(layer, k)), ())
        meta = {}
        for name in names:
            buf = layer._buffers.get(name)
            if buf is None or buf.dim() != 2 and name == "qweight":  # tile-major (4-D) layouts stay as they are
                continue
            meta[name] = (buf.dtype, buf.shape)
            layer.register_parameter(name + SUFFIX, nn.Parameter(float_storage(buf), requires_grad=False))
            layer._buffers[name] = None
            moved += buf.numel() * buf.element_size()
        if meta:
            layer._packed_meta = meta
            layer.register_forward_pre_hook(_restore_hook)
            layer.register_forward_hook(_drop_hook)
    return moved
