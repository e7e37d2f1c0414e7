"""Programmatic dependent launch (PDL, sm_90+) for the decode GEMVs.

A decode step is a chain of short kernels, and each GEMV pays a fixed ~4 µs (docs/kernels.md
§v13): the launch, the first loads' latency with the DRAM idle, the tail. With PDL a kernel
is launched while its predecessor in the stream still runs; it may do what does not depend
on that predecessor, then waits (griddepcontrol.wait, which returns once the predecessor
has finished and its writes are visible).

What a GEMV does before the wait is only an L2 prefetch of its first code tiles: a prefetch
returns nothing to registers, and L2 is the point of coherence, so even codes that the
predecessor were rewriting could not be read stale. x, scales, zeros, the partials and the
split-K tickets are touched after the wait only (PEQA's optimizer rewrites scales in place,
and the previous GEMV puts its tickets back to 0 in its last program).

QTOOL_PDL (read on every call): 0 off; 1 wait first; n > 1 wait after prefetching the
first n − 1 tiles of each program (tile-major codes; row-major falls back to 1). The
default, 2, measured best in a compiled 7B decode step (docs/kernels.md §v13).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# One thread of the program asks L2 for `$2` bytes at `$1` (TMA's bulk prefetch, sm_90)
_PREFETCH = tl.constexpr("""{
.reg .pred p;
.reg .u32 t;
mov.u32 t, %tid.x;
setp.eq.u32 p, t, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")


def pdl_mode(device: torch.device) -> int:
    """The PDL setting for a launch on `device`: QTOOL_PDL where the GPU has PDL, else 0."""
    mode = int(os.environ.get("QTOOL_PDL", "2") or 0)
    if mode <= 0 or device.type != "cuda":
        return 0
    return mode if torch.cuda.get_device_capability(device)[0] >= 9 else 0


@triton.jit
def prefetch_l2(ptr, nbytes):
    """Ask L2 for nbytes (a multiple of 16) from ptr, issued by one thread of the program."""
    tl.inline_asm_elementwise(_PREFETCH, "=r,l,r", [ptr.to(tl.int64, bitcast=True), nbytes], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_wait():
    """Wait until the kernel before has finished and its writes are visible, then let the
    kernel after launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
