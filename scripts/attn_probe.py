"""Decode attention in `qtool bench decode`'s synthetic model: one query token over a static
KV cache with a boolean mask, per SDPA backend, timed inside a CUDA graph (the decode step's
conditions). Both models of the benchmark run the same attention, so this is shared time.

  python scripts/attn_probe.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, reps: int = 200) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps // 20):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e-3 / reps


def main() -> None:
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    H, hd, T = 32, 128, 512
    for B in (1, 16):
        q = torch.randn(B, H, 1, hd, device="cuda", dtype=torch.float16)
        k = torch.randn(B, H, T, hd, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        mask = torch.arange(T, device="cuda")[None, :] <= T // 2
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        kv_bytes = 2 * k.numel() * 2
        for name, be in [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]:
            def fn(be=be, q=q, k=k, v=v, mask=mask):
                if be is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                t = timed(fn)
            except Exception as e:
                print(f"B={B} {name:9s}: unavailable ({type(e).__name__}: {str(e)[:80]})", flush=True)
                continue
            print(f"B={B} {name:9s}: {t * 1e6:7.1f} us  ({kv_bytes / t / 1e9:5.0f} GB/s of KV)  rel err {err:.1e}",
                  flush=True)
        # FlexAttention (torch.compile'd): a split-KV decoding kernel for short queries; the
        # static cache's mask becomes a score_mod on the current position (a device tensor)
        from torch.nn.attention.flex_attention import flex_attention

        pos = torch.tensor([T // 2], device="cuda")

        def score_mod(score, b, h, q_idx, kv_idx, pos=pos):
            return torch.where(kv_idx <= pos[0], score, -float("inf"))

        flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        try:
            out = flex(q, k, v, score_mod=score_mod)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t = timed(lambda q=q, k=k, v=v, f=flex, sm=score_mod: f(q, k, v, score_mod=sm))
            print(f"B={B} flex     : {t * 1e6:7.1f} us  ({kv_bytes / t / 1e9:5.0f} GB/s of KV)  rel err {err:.1e}",
                  flush=True)
        except Exception as e:
            print(f"B={B} flex     : unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)


if __name__ == "__main__":
    main()
