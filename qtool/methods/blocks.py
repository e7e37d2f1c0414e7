"""Run a model block by block on calibration windows, using the model's own block forward.

`capture_inputs` records, for each decoder block, the keyword arguments the model
passes it (attention mask, position embeddings...: these depend only on the window
length, so one window's suffice) and the hidden states entering block 0 for every
window. Methods then feed those through one block at a time, so peak memory is one
model plus one block's work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qtool.models.load import decoder_layers


def iter_blocks(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(index, block) in order. For a streamed model (qtool.models.stream) each block is read from the
    shards when its turn comes and written out and freed when the caller asks for the next one; the
    caller must be done with a block (and its quantized layers in place) by then."""
    stream = getattr(model, "qtool_stream", None)
    if stream is not None:
        yield from stream.blocks()
    else:
        yield from enumerate(decoder_layers(model))


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a block: records its kwargs and passes the hidden states through."""

    def __init__(self, index: int, last: int, sink: dict) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == 0:
            self.sink.setdefault("x0", []).append(hidden_states)
            if self.sink.get("first_only"):
                raise _Stop
        if self.index == self.last:
            raise _Stop
        return hidden_states


@dataclass
class BlockInputs:
    x: list[Tensor]  # per window: [1, L, hidden], the input of the current block
    kwargs: list[dict]  # per block: the keyword arguments of its forward


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: Tensor, device: torch.device, store: torch.device | None = None
                   ) -> BlockInputs:
    """Hidden states entering block 0 for each window, and every block's kwargs."""
    layers = decoder_layers(model)
    originals = list(layers)
    sink: dict = {}
    store = store or device
    # Everything before the blocks (embeddings, rotary tables) runs on `device`.
    in_blocks = {id(m) for blk in originals for m in blk.modules()}
    for m in model.modules():
        if id(m) not in in_blocks and next(m.children(), None) is None:
            m.to(device)
    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(i, len(originals) - 1, sink)
        for w in range(input_ids.shape[0]):
            sink["first_only"] = w > 0
            try:
                model(input_ids=input_ids[w : w + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, blk in enumerate(originals):
            layers[i] = blk
    kwargs = [_to(sink["kwargs"][i], device) for i in range(len(originals))]
    return BlockInputs([x.to(store) for x in sink["x0"]], kwargs)


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def propagate(block: nn.Module, xs: list[Tensor], kwargs: dict, device: torch.device) -> list[Tensor]:
    """Outputs of `block` for every window (the next block's inputs), stored where xs were."""
    return [run_block(block, x.to(device), kwargs).to(x.device) for x in xs]
