"""The dispatcher through QuantLinear: forward and gradients vs the torch path in float64."""

from __future__ import annotations

import os

import pytest
import qtool_kernels as qk
import torch
from kernel_testutil import TOL, rel_err

from qtool.nn.qlinear import QuantLinear
from qtool.quant.grid import QuantSpec, rtn


def _layer(N: int, K: int, bits: int, group_size: int | None, device: str, bias: bool) -> QuantLinear:
    W = torch.randn(N, K, device=device)
    b = torch.randn(N, device=device) if bias else None
    return QuantLinear.from_quantized(rtn(W, QuantSpec(bits, group_size)), bits, group_size, b)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 y through the layer's own dequantize (the torch fallback's math)."""
    W = layer.dequantize(torch.float64)
    y = x.double() @ W.T
    return y if layer.bias is None else y + layer.bias.double()


def _check(layer: QuantLinear, M: int, dtype: torch.dtype, device: str) -> None:
    K, N = layer.in_features, layer.out_features
    layer.scale_delta = torch.nn.Parameter(0.01 * torch.randn(N, layer.n_groups, device=device))
    x = torch.randn(2, M, K, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(2, M, N, device=device).to(dtype)
    y = qk.quant_linear(layer, x)
    assert y is not None and y.shape == (2, M, N) and y.dtype == dtype
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    delta64 = layer.scale_delta.detach().double().requires_grad_(True)
    from qtool.quant.grid import dequantize

    W = dequantize(layer.codes(), layer.scales.double() + delta64, layer.zeros, layer.group_size)
    ref = x64 @ W.T + layer.bias.double()
    ref.backward(dy.double())
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(x.grad, x64.grad) < TOL[dtype]
    assert rel_err(layer.scale_delta.grad, delta64.grad) < TOL[torch.float32]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, None), (2, 32)])
@pytest.mark.parametrize("M", [1, 17])  # 1: skinny kernel; 17 rows of 2 batches: dequant + matmul
def test_dispatch_interpreter(bits: int, group_size: int | None, M: int) -> None:
    layer = _layer(48, 576, bits, group_size, "cpu", bias=True)
    _check(layer, M, torch.float16, "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
def test_no_grad_matches_fallback() -> None:
    layer = _layer(48, 576, 4, 64, "cpu", bias=False)
    x = torch.randn(3, 576).half()
    with torch.no_grad():
        y = qk.quant_linear(layer, x)
        fallback = layer(x.float())  # CPU: QuantLinear's own torch path
    assert rel_err(y, fallback) < TOL[torch.float16]


def test_unsupported_returns_none() -> None:
    layer = _layer(48, 576, 4, 64, "cpu", bias=False)
    assert qk.quant_linear(layer, torch.randn(3, 576)) is None  # fp32 activations: torch path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, 32), (8, None), (4, None)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_gpu(bits, group_size, M, dtype) -> None:
    layer = _layer(1536, 576, bits, group_size, "cuda", bias=True)
    _check(layer, M, dtype, "cuda")
    # Through QuantLinear.forward itself (x.is_cuda routes to qtool_kernels).
    x = torch.randn(M, 576, device="cuda").to(dtype)
    layer.scale_delta = None
    with torch.no_grad():
        y = layer(x)
        layer.use_kernels = False
        y_torch = layer(x)
    assert rel_err(y, _reference(layer, x)) < TOL[dtype]
    assert rel_err(y_torch, _reference(layer, x)) < TOL[dtype]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
def test_forward_packed_op_schema() -> None:
    """The custom op torch.compile sees: schema, fake (meta) shape and the eager result agree."""
    from qtool_kernels.linear import _forward_packed_op
    from qtool_kernels.tiles import groups_tile_major, tile_major

    layer = _layer(128, 640, 4, 64, "cpu", bias=True)
    x = torch.randn(3, 640).half()
    args = (x, layer.qweight, layer.scales.half(), layer.zeros, 4, 64, layer.bias.half())
    torch.library.opcheck(_forward_packed_op, args, test_utils=("test_schema", "test_faketensor"))
    # tile-major codes and scales: N comes from the 4-d codes, not the scales' first dim
    tiled = (x[:1], tile_major(layer.qweight, 64, 128, 4), groups_tile_major(layer.scales.half(), 64),
             groups_tile_major(layer.zeros, 64), 4, 64, None)
    torch.library.opcheck(_forward_packed_op, tiled, test_utils=("test_faketensor",))
    assert torch.equal(_forward_packed_op(*tiled), qk.forward_packed(*tiled))


def _quantized_block(c, std: float, group_size: int, fuse: bool, device: str) -> tuple[torch.nn.Module, object]:
    """(model holding one fp16 decoder block of shape c, the block) with random weights of
    std `std`, projections fused if asked, every Linear quantized W4 RTN."""
    from qtool.bench.decode import Block, _quantize_blocks

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(c).half().to(device)])
    for p in model.parameters():
        p.data.normal_(0, std)
    if fuse:
        model.blocks[0].fuse()
    _quantize_blocks(model, 4, group_size)
    return model, model.blocks[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run (CPU)")
@pytest.mark.parametrize("fuse", [False, True])  # 7 projections, or qkv + o + gate_up + down
def test_compiles_as_one_graph(monkeypatch, fuse: bool) -> None:
    """A decoder block with QuantLinears compiles whole (fullgraph: no break at the kernels),
    each linear as one qtool::forward_packed node, and matches eager bit for bit."""
    from qtool.bench.decode import Block, LlamaShape
    from qtool.nn import kernel_dispatch

    # on the CPU QuantLinear.forward takes its torch path; route it to the kernels' entry
    # (kernel_dispatch.quant_linear, as on CUDA) so that is what dynamo traces
    monkeypatch.setattr(QuantLinear, "forward", lambda self, x: kernel_dispatch.quant_linear(self, x))

    c = LlamaShape(hidden=128, intermediate=256, heads=4, kv_heads=4, layers=1, vocab=64)
    _, blk = _quantized_block(c, 0.05, 64, fuse, "cpu")
    T, pos = 16, torch.tensor([5])
    hd = 32
    ang = pos.float()[:, None] / (10000 ** (torch.arange(0, hd, 2) / hd))[None, :]
    emb = torch.cat((ang, ang), -1)
    args = (torch.randn(1, 1, 128).half(), pos, emb.cos().half(), emb.sin().half())
    mask = torch.arange(T)[None, :] <= pos[:, None]
    caches = [torch.randn(1, 4, T, hd).half() for _ in range(2)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        ref = blk(*args, *[t.clone() for t in caches], mask)
        out = torch.compile(Block.forward, fullgraph=True, dynamic=False, backend=backend)(
            blk, *args, *[t.clone() for t in caches], mask)
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qtool.forward_packed.default) == (4 if fuse else 7)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 16])  # the GEMV and the skinny kernel inside the compiled graph
@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_block_gpu(batch: int, fuse: bool) -> None:
    """Inductor-compiled decoder block (what `qtool bench decode` times) vs eager, tile-major
    QuantLinears: the same kernels run inside the graph; only inductor's fused glue differs."""
    from qtool.bench.decode import Block, LlamaShape
    from qtool.nn.qlinear import tile_major_layout

    c = LlamaShape(hidden=1024, intermediate=2816, heads=8, kv_heads=8, layers=1, vocab=64)
    model, blk = _quantized_block(c, 0.02, 128, fuse, "cuda")
    T, pos, hd = 64, torch.tensor([9], device="cuda"), 128
    ang = pos.float()[:, None] / (10000 ** (torch.arange(0, hd, 2, device="cuda") / hd))[None, :]
    emb = torch.cat((ang, ang), -1)
    args = (torch.randn(batch, 1, 1024, device="cuda").half(), pos, emb.cos().half(), emb.sin().half())
    mask = torch.arange(T, device="cuda")[None, :] <= pos[:, None]
    caches = [torch.randn(batch, 8, T, hd, device="cuda").half() for _ in range(2)]
    with torch.no_grad(), tile_major_layout(model) as n:
        assert n == (4 if fuse else 7)
        ref = blk(*args, *[t.clone() for t in caches], mask)
        out = torch.compile(Block.forward, fullgraph=True, dynamic=False)(blk, *args, *[t.clone() for t in caches],
                                                                          mask)
    assert rel_err(out, ref) < TOL[torch.float16]
