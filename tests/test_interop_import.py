"""Import of community checkpoints: GPTQ (v1/v2), AWQ (GEMM) and compressed-tensors are read into
qtool's storage with the same codes, scales and zero-points (no re-quantization).

Round trips (export then import) are checked bit for bit for every bits × group × symmetric
combination at the layer level, and end to end through files and the CLI on a tiny model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from interop_util import tiny_checkpoint
from safetensors.torch import load_file, save_file

from qtool.artifact.checkpoint import load_checkpoint
from qtool.errors import QtoolError
from qtool.interop import community, gptq
from qtool.interop import compressed_tensors as ct
from qtool.interop.export import export_checkpoint
from qtool.nn.qlinear import QuantLinear
from qtool.quant.grid import QuantizedWeight
from tests.cli_util import run_cli

N, K = 64, 256
COMBOS = list(itertools.product((2, 3, 4, 8), (32, 64, 128, None), (False, True)))


def _random_layer(bits: int, group: int | None, sym: bool, act: bool = False, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    G = 1 if group is None else K // group
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int64).to(torch.uint8)
    zeros = (torch.full((N, G), 1 << (bits - 1), dtype=torch.uint8) if sym
             else torch.randint(0, 1 << bits, (N, G), generator=gen, dtype=torch.int64).to(torch.uint8))
    if not sym:
        zeros[0, 0] = 1 << (bits - 1)  # not every zero symmetric by chance only
    scales = (torch.rand(N, G, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    perm = torch.randperm(K, generator=gen) if act else None
    return QuantLinear.from_quantized(QuantizedWeight(codes, scales, zeros, perm), bits, group, None)


def _same(a: QuantLinear, b: QuantLinear) -> None:
    assert (a.bits, a.group_size, a.in_features, a.out_features) == (b.bits, b.group_size, b.in_features,
                                                                     b.out_features)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zeros, b.zeros)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
    assert (a.perm is None) == (b.perm is None) and (a.perm is None or torch.equal(a.perm, b.perm))


def _reimport(kind: str, layer: QuantLinear, sym: bool, qc: dict) -> QuantLinear:
    name = "model.layers.0.mlp.up_proj"
    tensors_of = ct.layer_tensors if kind == "compressed-tensors" else gptq.layer_tensors
    tensors = {f"{name}.{k}": v for k, v in tensors_of(layer, sym if kind == "compressed-tensors" else False)
               .items()}
    layers, grid = community._layers(kind, qc, tensors, "test")
    assert not tensors  # every tensor consumed
    return layers[name]


@pytest.mark.parametrize("bits,group,sym", COMBOS)
def test_round_trip_is_bit_identical(bits, group, sym):
    layer = _random_layer(bits, group, sym)
    qc = ct.quantization_config(bits, group, sym, [])
    _same(_reimport("compressed-tensors", layer, sym, qc), layer)
    qc = gptq.quantization_config(bits, group, sym, False, False, [])
    _same(_reimport("gptq", layer, sym, qc), layer)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_round_trip(bits):
    layer = _random_layer(bits, 64, False, act=True)
    back = _reimport("gptq", layer, False, gptq.quantization_config(bits, 64, False, True, False, []))
    # GPTQ keeps codes in feature order and only each feature's group: the order of the columns
    # inside a group is not stored, so the import lists each group's features in ascending order.
    assert torch.equal(back.scales, layer.scales) and torch.equal(back.zeros, layer.zeros)
    groups = lambda p: p.reshape(-1, 64).sort(dim=1).values  # noqa: E731
    assert torch.equal(groups(back.perm), groups(layer.perm))
    assert torch.equal(back.dense_weight(), layer.dense_weight())


def _awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Written from AutoAWQ's documented GEMM layout: 8 codes per int32 along N, nibble i holding
    channel (0, 2, 4, 6, 1, 3, 5, 7)[i] of its 8."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    R, C = codes.shape
    out = torch.zeros(R, C // 8, dtype=torch.int64)
    for w in range(C // 8):
        for i, ch in enumerate(order):
            out[:, w] |= codes[:, 8 * w + ch].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_awq_gemm_import():
    layer = _random_layer(4, 128, False)
    name = "model.layers.0.self_attn.o_proj"
    tensors = {f"{name}.qweight": _awq_pack(layer.codes().t().contiguous()),  # [K, N/8]
               f"{name}.qzeros": _awq_pack(layer.zeros.t().contiguous()),
               f"{name}.scales": layer.scales.t().contiguous()}
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    layers, _ = community._layers("awq", qc, tensors, "test")
    _same(layers[name], layer)
    with pytest.raises(QtoolError, match="GEMM"):
        community._layers("awq", {**qc, "version": "gemv"}, dict(tensors), "test")


def test_gptq_v1_import_adds_one_and_refuses_overflow():
    layer = _random_layer(4, 64, True)  # z = 8: v1 stores 7
    name = "model.layers.0.mlp.up_proj"
    t = {f"{name}.{k}": v for k, v in gptq.layer_tensors(layer, v1=True).items()}
    qc = gptq.quantization_config(4, 64, True, False, True, [])
    assert qc["checkpoint_format"] == "gptq"
    layers, _ = community._layers("gptq", qc, dict(t), "test")
    _same(layers[name], layer)
    t[f"{name}.qzeros"] = torch.full_like(t[f"{name}.qzeros"], -1)  # every v1 zero 15: z = 16
    with pytest.raises(QtoolError, match="outside the 4-bit grid"):
        community._layers("gptq", qc, t, "test")


def test_checkpoint_round_trip_and_commands(tmp_path, capsys):
    """GPTQ and compressed-tensors exports of a tiny checkpoint, given back to qtool: the same
    fingerprint (codes, zeros, scales), and eval / finetune --method peqa and lora / swap-scales -o /
    export --delta run on the community directories as they are."""
    ck = tiny_checkpoint(tmp_path / "ck", 3, 64)
    info = json.loads((ck / "qtool.json").read_text())
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"hello world {i}, the quick brown fox jumps over the lazy dog." for i in range(40)))
    for fmt in ("gptq", "compressed-tensors"):
        out = tmp_path / fmt
        export_checkpoint(ck, fmt, out)
        imported = community.as_checkpoint_dir(out)
        assert imported != out and json.loads((imported / "qtool.json").read_text())["fingerprint"] == \
            info["fingerprint"]
        assert community.as_checkpoint_dir(out) == imported  # converted once, then cached
    code, text, err = run_cli(capsys, "eval", tmp_path / "gptq", "--corpus", corpus, "--seqlen", 64, "--max-windows",
                              2, "--device", "cpu", "-q", "--json", "-")
    assert code == 0, err
    assert json.loads(text)["rows"][0]["perplexity"]["ppl"] > 1
    delta = tmp_path / "task.safetensors"
    code, _, err = run_cli(capsys, "finetune", tmp_path / "compressed-tensors", "--method", "peqa", "--task", "t",
                           "--data", corpus, "--format", "text", "-o", delta, "--max-steps", 2, "--batch-size", 2,
                           "--seqlen", 64, "--eval-every", 0, "--eval-samples", 2, "--device", "cpu", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "finetune", tmp_path / "gptq", "--method", "lora", "--rank", 4, "--task", "t",
                           "--data", corpus, "--format", "text", "-o", tmp_path / "lora", "--max-steps", 1,
                           "--batch-size", 2, "--seqlen", 64, "--eval-every", 0, "--eval-samples", 2, "--device",
                           "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    code, _, err = run_cli(capsys, "swap-scales", tmp_path / "gptq", delta)
    assert code == 2 and "give -o" in err
    code, _, err = run_cli(capsys, "swap-scales", tmp_path / "gptq", delta, "-o", tmp_path / "swapped", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", tmp_path / "gptq", "-f", "gptq", "--delta", delta, "-o",
                           tmp_path / "task-gptq", "-q")
    assert code == 0, err
    swapped = load_checkpoint(tmp_path / "swapped").model.get_submodule("model.layers.0.self_attn.q_proj")
    t = load_file(str(tmp_path / "task-gptq" / "model.safetensors"))
    assert torch.equal(t["model.layers.0.self_attn.q_proj.scales"], swapped.scales.t())


def test_corrupted_and_unsupported_refused(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ck", 4, 64)
    out = tmp_path / "gptq"
    export_checkpoint(ck, "gptq", out)
    t = load_file(str(out / "model.safetensors"))
    del t["model.layers.1.mlp.down_proj.qzeros"]
    save_file(t, str(out / "model.safetensors"))
    code, _, err = run_cli(capsys, "eval", out, "--device", "cpu", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "down_proj: tensor qzeros is missing" in err
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq"}
    (out / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "finetune", out, "--task", "bbc-news")
    assert code == 2 and "'hqq' cannot be imported" in err
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", out, "-o", tmp_path / "q")
    assert code == 2 and "already quantized" in err and not (tmp_path / "q").exists()
