"""Zeroed int32 counters for the split-K reduction done by the last program of each row block.

A split-K GEMV used to end in two more kernels per layer (the partials' sum, then the cast),
each a launch and a pass over the partials: ~224 extra launches per decoded token for a
7B model. Instead every program stores its fp32 partial and takes a ticket from its row
block's counter; the program that draws the last ticket sums the partials in split order
(the same order every time) and writes y, then puts the counter back to 0. So the counters
must start at 0 and are left at 0: one region of a per-device arena per CUDA stream (two
launches on one stream never overlap; a graph replays on the region of the stream it was
captured on). The arena is allocated outside graph capture (a warm-up launch precedes every
capture); when it does not exist yet during a capture, or every region is taken, the call
gets fresh zeros (a memset; inside a capture it lands in the graph's pool and is never
reused outside it).
"""

from __future__ import annotations

import torch
from torch import Tensor

REGIONS = 16
PER_REGION = 16384  # row blocks × row groups of one launch (28672 / 8 rows = 3584 at most today)

_arena: dict[int, Tensor] = {}
_region: dict[tuple[int, int], int] = {}


def tickets(device: torch.device, n: int) -> Tensor:
    """n int32 counters at 0 on `device`, which the kernel must leave at 0."""
    if device.type != "cuda" or n > PER_REGION:
        return torch.zeros(n, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    capturing = torch.cuda.is_current_stream_capturing()
    arena = _arena.get(index)
    if arena is None:
        if capturing:
            return torch.zeros(n, dtype=torch.int32, device=device)
        arena = _arena[index] = torch.zeros(REGIONS * PER_REGION, dtype=torch.int32, device=device)
    key = (index, torch.cuda.current_stream(device).cuda_stream)
    region = _region.get(key)
    if region is None:
        taken = sum(1 for k in _region if k[0] == index)
        if taken >= REGIONS:
            return torch.zeros(n, dtype=torch.int32, device=device)
        region = _region[key] = taken
    return arena[region * PER_REGION: region * PER_REGION + n]
