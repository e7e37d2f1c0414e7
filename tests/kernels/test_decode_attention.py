"""Split-KV decode attention (kernels/decode_attention.py) against the float64 definition.

On the CPU the kernels run under TRITON_INTERPRET at small shapes; the GPU test runs the
7B decode shape. Slots past the position are filled with NaN and huge values: a kernel
that read them (or weighted them by a zero that is not exactly zero) fails.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import TOL, fresh_generator, rel_err
from qtool_kernels.decode_attention import chunking, decode_attention, decode_attention_reference, default_tile


def _case(B: int, H: int, Hkv: int, T: int, D: int, p: int, dtype: torch.dtype, device: str = "cpu"):
    gen, seed = fresh_generator()
    print(f"seed={seed}")
    q = torch.randn(B, 1, H, D, generator=gen).to(dtype).transpose(1, 2)  # strided, as the decoder's
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    k[:, :, p + 1:: 2], v[:, :, p + 1:: 2] = float("nan"), float("nan")
    k[:, :, p + 2:: 2], v[:, :, p + 2:: 2] = 6e4, -6e4
    pos = torch.tensor([p])
    return q.to(device), k.to(device), v.to(device), pos.to(device)


@pytest.mark.parametrize("B,H,Hkv,T,D,p", [
    (1, 4, 4, 64, 32, 0),     # one valid slot
    (1, 4, 4, 64, 32, 37),    # mid-chunk
    (2, 4, 2, 96, 32, 95),    # grouped heads, full cache
    (1, 2, 1, 80, 16, 63),    # a chunk boundary, T not a power of two
    (3, 2, 2, 48, 64, 20),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused,block_t", [(True, None), (False, None), (True, 128)])
def test_decode_attention(B, H, Hkv, T, D, p, dtype, fused, block_t) -> None:
    """fused: each head's last chunk merges (a ticket); else the merge kernel. block_t 128:
    batch 16's tile (one chunk per head here)."""
    q, k, v, pos = _case(B, H, Hkv, T, D, p, dtype)
    out = decode_attention(q, k, v, pos, n_sm=4, fused=fused, block_t=block_t)
    assert out.shape == (B, H, 1, D) and out.dtype == dtype
    assert rel_err(out, decode_attention_reference(q, k, v, pos)) < TOL[dtype]


def test_position_past_cache_reads_all() -> None:
    q, k, v, _ = _case(1, 2, 2, 64, 16, 63, torch.float16)
    far = torch.tensor([1000])
    assert rel_err(decode_attention(q, k, v, far, n_sm=4), decode_attention_reference(q, k, v, far)) < 2e-3


def test_chunking() -> None:
    # a 7B step at batch 1: 32 heads on 132 SMs -> 32 chunks of 16 slots over 512
    assert default_tile(32, 132) == (16, 8, 1) and chunking(512, 32, 132, 16, 8) == (16, 32)
    # batch 16: 512 heads, one chunk of the whole cache per head
    assert default_tile(512, 132) == (128, 1, 4) and chunking(512, 512, 132, 128, 1) == (512, 1)
    for T, bh in [(80, 2), (1, 7), (4096, 3)]:
        chunk, S = chunking(T, bh, 132)
        assert chunk % 32 == 0 and (S - 1) * chunk < T <= S * chunk


@pytest.mark.gpu
@pytest.mark.parametrize("B,p", [(1, 255), (1, 511), (16, 300)])
def test_decode_attention_gpu(B: int, p: int) -> None:
    q, k, v, pos = _case(B, 32, 32, 512, 128, p, torch.float16, device="cuda")
    ref = decode_attention_reference(q, k, v, pos)
    for _ in range(3):  # the ticket counters must be back at 0 for the next call
        out = decode_attention(q, k, v, pos)
        assert rel_err(out, ref) < TOL[torch.float16]
