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


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_split_kv_attention_matches_sdpa(compiled: bool) -> None:
    """The decoder's attention through kernels/decode_attention.py (a custom op under
    torch.compile) against SDPA over the masked cache, same block, same step."""
    from qtool.bench.decode import compile_blocks, synthetic_model

    model = synthetic_model("synthetic-7b", 1, fuse=True, attention="sdpa")
    blk = model.blocks[0]
    T, pos = 512, torch.tensor([200], device="cuda")
    hd = 128
    ang = pos.float()[:, None] / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))[None, :]
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().half(), emb.sin().half()
    mask = torch.arange(T, device="cuda")[None, :] <= pos[:, None]
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.float16)
    caches = [torch.randn(1, 32, T, hd, device="cuda", dtype=torch.float16) for _ in range(2)]
    with torch.no_grad():
        ref = blk(x, pos, cos, sin, *[c.clone() for c in caches], mask)
        blk.attention = "split-kv"
        if compiled:
            compile_blocks(model)
        caches[0][:, :, 300:] = float("nan")  # past the position: never read
        out = blk(x, pos, cos, sin, *caches, mask)
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 2e-3
