"""The synthetic decoder `qtool bench decode` times: fusing q/k/v and gate/up must not change it."""

from __future__ import annotations

import pytest
import torch

from qtool.bench.decode import Block, LlamaShape


@pytest.mark.parametrize("kv_heads", [4, 2])  # grouped attention: k/v narrower than q
def test_fused_block_matches_unfused(kv_heads: int) -> None:
    c = LlamaShape(hidden=64, intermediate=96, heads=4, kv_heads=kv_heads, layers=1, vocab=32)
    torch.manual_seed(0)
    blk = Block(c).double()
    for p in blk.parameters():
        p.data.normal_(0, 0.1)
    T, pos, hd = 8, torch.tensor([3]), 16
    ang = pos.double()[:, None] / (10000 ** (torch.arange(0, hd, 2).double() / hd))[None, :]
    emb = torch.cat((ang, ang), -1)
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    mask = torch.arange(T)[None, :] <= pos[:, None]
    caches = [torch.randn(2, kv_heads, T, hd, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        ref_caches = [t.clone() for t in caches]
        ref = blk(x, pos, emb.cos(), emb.sin(), *ref_caches, mask)
        blk.fuse()
        assert not hasattr(blk, "q_proj") and blk.qkv_proj.out_features == 64 + 2 * kv_heads * hd
        assert blk.gate_up_proj.out_features == 2 * 96
        out = blk(x, pos, emb.cos(), emb.sin(), *caches, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(caches, ref_caches, strict=True):  # the new k/v went to the same cache slots
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
