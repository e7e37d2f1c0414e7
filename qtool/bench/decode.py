"""`qtool bench decode`: greedy decode tokens/s, quantized vs fp16, on a Llama-2-7B-shaped model.

The synthetic model is the Llama architecture written out in plain torch (RMSNorm,
rotary embeddings, grouped attention over a static KV cache, SwiGLU MLP) with random
weights, so the layer sizes are the real ones without a download. One decode step has
fixed shapes (the cache is preallocated, the position is a device tensor), so the step
is captured once in a CUDA graph and replayed: the time measured is the GPU's, not
Python's. fp16 runs first; then every Linear of the decoder blocks is quantized with RTN
into a QuantLinear (the LM head stays fp16, as in GPTQ/AWQ checkpoints) and the same
step is timed again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    layers: int = 32
    vocab: int = 32000
    rope_theta: float = 10000.0


SYNTHETIC = {"synthetic-7b": LlamaShape()}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c: LlamaShape) -> None:
        super().__init__()
        d, hd = c.hidden, c.hidden // c.heads
        self.heads, self.kv_heads, self.hd = c.heads, c.kv_heads, hd
        self.q_proj = nn.Linear(d, c.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.heads * hd, d, bias=False)
        self.gate_proj = nn.Linear(d, c.intermediate, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, d, bias=False)
        self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
        self.attention = "sdpa"  # or "split-kv" (CUDA): kernels/decode_attention.py

    def fuse(self) -> None:
        """q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj` (gpt-fast's wqkv): the
        weights concatenated along the output dimension, so a decode step reads the same bytes
        in 4 GEMVs per layer instead of 7, each with its launch, prologue and split-K tail
        paid once. Exact: every output row is the same dot product as before. Called before
        quantization, the fused Linear quantizes into the same rows (RTN is per row/group)."""
        def cat(*mods: nn.Linear) -> nn.Linear:
            w = torch.cat([m.weight.data for m in mods])
            fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            fused.weight.data.copy_(w)
            return fused

        self.qkv_proj = cat(self.q_proj, self.k_proj, self.v_proj)
        self.gate_up_proj = cat(self.gate_proj, self.up_proj)
        del self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj

    def forward(self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                mask: Tensor) -> Tensor:
        B = x.shape[0]
        h = self.ln1(x)
        if hasattr(self, "qkv_proj"):
            nq, nkv = self.heads * self.hd, self.kv_heads * self.hd
            q, k, v = self.qkv_proj(h).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(B, 1, self.heads, self.hd).transpose(1, 2)
        k = k.reshape(B, 1, self.kv_heads, self.hd).transpose(1, 2)
        v = v.reshape(B, 1, self.kv_heads, self.hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        if self.attention == "split-kv" and q.is_cuda:  # reads slots 0..pos only
            from qtool_kernels.decode_attention import attend_decode

            a = attend_decode(q, k_cache, v_cache, pos)
        else:
            a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                               enable_gqa=self.kv_heads != self.heads)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, 1, -1))
        h = self.ln2(x)
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return x + self.down_proj(F.silu(gate) * up)


class TinyLlama(nn.Module):
    """Llama decoder for one-token steps over a static cache of `max_len` positions."""

    def __init__(self, c: LlamaShape) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

    def step(self, tok: Tensor, pos: Tensor, caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """tok [B] at position pos [1] -> next greedy token [B]."""
        c = self.c
        hd = c.hidden // c.heads
        max_len = caches[0][0].shape[2]
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, device=tok.device, dtype=torch.float32) / hd))
        ang = pos.float()[:, None] * inv[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos().to(self.embed.weight.dtype), emb.sin().to(self.embed.weight.dtype)
        mask = torch.arange(max_len, device=tok.device)[None, :] <= pos[:, None]  # [1, T]
        x = self.embed(tok)[:, None, :]
        for blk, (kc, vc) in zip(self.blocks, caches, strict=True):
            x = blk(x, pos, cos, sin, kc, vc, mask)
        return self.lm_head(self.norm(x))[:, 0].argmax(-1)


def captured_step(model: TinyLlama, batch: int, max_len: int) -> tuple[torch.cuda.CUDAGraph, Tensor, list]:
    """One greedy decode step of `batch` sequences captured in a CUDA graph (after two warm-up
    steps on a side stream): (graph, pos, caches). Each replay feeds the step its own output
    token and advances pos; the caller sets pos before replaying and keeps caches alive."""
    c = model.c
    dtype = model.embed.weight.dtype
    hd = c.hidden // c.heads
    kv = (batch, c.kv_heads, max_len, hd)
    caches = [(torch.randn(kv, device="cuda", dtype=dtype), torch.randn(kv, device="cuda", dtype=dtype))
              for _ in range(c.layers)]
    tok = torch.randint(0, c.vocab, (batch,), device="cuda")
    pos = torch.tensor([max_len // 2], device="cuda")  # attend over half the cache
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                nxt = model.step(tok, pos, caches)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nxt = model.step(tok, pos, caches)
            tok.copy_(nxt)
            pos.add_(1)
    return graph, pos, caches


def _time_decode(model: TinyLlama, batch: int, new_tokens: int, max_len: int) -> float:
    """Seconds per decode step (one token for each of `batch` sequences), graph-replayed."""
    graph, pos, caches = captured_step(model, batch, max_len)
    times = []
    for _ in range(3):
        pos.fill_(max_len // 2 - new_tokens)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(new_tokens):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / new_tokens)
    del graph, caches
    return sorted(times)[len(times) // 2]


def compile_blocks(model: TinyLlama) -> None:
    """Compile Block.forward once for all blocks (torch.compile, whole graph): the norms,
    rotary, cache writes, attention glue and SwiGLU fuse into a few kernels around the
    linears. Parameters are graph inputs, so the 32 blocks share one compiled graph per
    batch size and Linear type; QuantLinear enters it as one custom op (qtool::forward_packed).
    Where qtool's kernels use programmatic dependent launch (kernels/pdl.py: Hopper, QTOOL_PDL
    not 0), inductor's kernels use it too, so each kernel of the step launches while the one
    before it finishes; both models get the same setting."""
    import functools

    import torch._inductor.config as inductor_config
    from qtool_kernels.pdl import pdl_mode

    options = {}
    if hasattr(inductor_config.triton, "enable_pdl") and torch.cuda.is_available() \
            and pdl_mode(torch.device("cuda")) > 0:
        options["triton.enable_pdl"] = True
    fn = torch.compile(Block.forward, fullgraph=True, dynamic=False, options=options or None)
    for blk in model.blocks:
        blk.forward = functools.partial(fn, blk)


def _quantize_blocks(model: TinyLlama, bits: int, group_size: int | None) -> None:
    from qtool.nn.qlinear import QuantLinear
    from qtool.quant.grid import QuantSpec, rtn

    spec = QuantSpec(bits, group_size)
    for blk in model.blocks:
        for name, mod in list(blk.named_children()):
            if isinstance(mod, nn.Linear):
                qw = rtn(mod.weight.data.float(), spec)
                setattr(blk, name, QuantLinear.from_quantized(qw, bits, group_size, None))
                del mod
    torch.cuda.empty_cache()


def synthetic_model(model_name: str, layers: int, fuse: bool, attention: str = "split-kv") -> TinyLlama:
    """The named synthetic model in fp16 on CUDA, random weights at a Llama-like scale (which
    keeps activations finite), projections fused if asked (Block.fuse), attention by
    `attention` ("split-kv": kernels/decode_attention.py; "sdpa": torch's, masked)."""
    shape = LlamaShape(**{**SYNTHETIC[model_name].__dict__, "layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TinyLlama(shape).half()
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.02)
    for blk in model.blocks:
        blk.attention = attention
        if fuse:
            blk.fuse()
    return model


def run(model_name: str, bits: int, group_size: int | None, batches: tuple[int, ...], new_tokens: int,
        layers: int = 32, max_len: int = 512, tile_major: bool = True, compile: bool = True,
        fuse: bool = True, attention: str = "split-kv") -> dict:
    """fp16 vs quantized decode step time per batch size; tile_major: the codes stored
    tile-major for the quantized run (qtool.nn.qlinear.tile_major_layout, as `qtool eval`'s
    generation does), else in the checkpoint's row-major layout; compile: both models'
    blocks under torch.compile (compile_blocks), then the same CUDA graph; fuse: both
    models' q/k/v and gate/up projections concatenated (Block.fuse), before quantizing;
    attention: both models' ("split-kv" reads the cache up to the position only, "sdpa" all of
    it under a mask)."""
    import contextlib

    from qtool_kernels.pdl import pdl_mode

    from qtool.errors import QtoolError
    from qtool.nn.qlinear import tile_major_layout

    if not torch.cuda.is_available():
        raise QtoolError("`qtool bench decode` needs a CUDA GPU")
    if model_name not in SYNTHETIC:
        raise QtoolError(f"only {list(SYNTHETIC)} is supported so far (a HF model is not yet)")
    if attention not in ("split-kv", "sdpa"):
        raise QtoolError(f"--attention must be split-kv or sdpa, not {attention!r}")
    model = synthetic_model(model_name, layers, fuse, attention)

    def timed(b: int) -> float:
        from torch._dynamo.exc import TorchDynamoException

        try:
            return _time_decode(model, b, new_tokens, max_len)
        except TorchDynamoException as e:  # compiling is lazy: its failures surface at the first step
            raise QtoolError(f"torch.compile of the decoder blocks failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}); rerun with --no-compile") from e

    if compile:
        compile_blocks(model)
    fp16 = {b: timed(b) for b in batches}
    _quantize_blocks(model, bits, group_size)
    if compile:
        compile_blocks(model)
    with tile_major_layout(model) if tile_major else contextlib.nullcontext(0) as n_tiled:
        quant = {b: timed(b) for b in batches}
    rows = [{"batch": b, "fp16_ms": fp16[b] * 1e3, "quant_ms": quant[b] * 1e3, "fp16_tok_s": b / fp16[b],
             "quant_tok_s": b / quant[b], "speedup": fp16[b] / quant[b]} for b in batches]
    return {"model": model_name, "layers": layers, "gpu": torch.cuda.get_device_name(), "bits": bits,
            "group_size": group_size, "tile_major_layers": n_tiled, "new_tokens": new_tokens, "kv_len": max_len,
            "compiled": compile, "fused": fuse, "attention": attention,
            "pdl": pdl_mode(torch.device("cuda")), "torch": torch.__version__,
            "rows": rows}
