"""NF4 (QLoRA): table, derivation, codes vs a bitsandbytes-algorithm reference, packing,
double quantization, bits/param, checkpoint round trip, CLI.

The reference is computed here, independently of qtool.quant.nf4, from the table published
in bitsandbytes (functional.get_4bit_type("nf4")) and its algorithm: flatten row-major,
blocks of 64, absmax per block, x = w · (1/absmax) in fp32, nearest level (float64
distance; ties to the lower level, as bitsandbytes' `x > midpoint` tree does),
Ŵ = level · absmax in fp32. No bitsandbytes dependency."""

import json

import numpy as np
import pytest
import torch

from qtool.quant import nf4
from tests.cli_util import run_cli
from tests.conftest import tiny_llama

PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# The thresholds of bitsandbytes' dQuantizeNF4 decision tree (csrc/kernels.cu), ascending.
BNB_TREE = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
            -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
            0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
            0.5016634166240692, 0.6427869200706482, 0.8614784181118011]


def reference_nf4(W: torch.Tensor, block: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bitsandbytes' algorithm in numpy: (codes [n], absmax [B], Ŵ [n]) — fp32 like the CUDA kernel."""
    w = W.detach().float().reshape(-1).numpy()
    n = w.size
    table = np.array(PUBLISHED_NF4, dtype=np.float32)
    codes = np.empty(n, dtype=np.uint8)
    absmax = []
    for b0 in range(0, n, block):
        blk = w[b0:b0 + block]
        a = np.float32(np.abs(blk).max())
        absmax.append(a)
        x = blk * (np.float32(1.0) / a)  # fp32, reciprocal multiply as in kQuantizeBlockwise
        d = np.abs(x.astype(np.float64)[:, None] - table.astype(np.float64)[None, :])
        codes[b0:b0 + block] = d.argmin(axis=1)  # argmin picks the first (lower) level on a tie
    absmax = np.array(absmax, dtype=np.float32)
    w_hat = table[codes] * np.repeat(absmax, block)[:n]
    return codes, absmax, w_hat


def test_table_is_the_published_one():
    assert nf4.nf4_levels().tolist() == [float(np.float32(v)) for v in PUBLISHED_NF4]
    assert nf4.NF4_LEVELS[nf4.NF4_ZERO_CODE] == 0.0
    assert sum(v > 0 for v in nf4.NF4_LEVELS) == 8 and sum(v < 0 for v in nf4.NF4_LEVELS) == 7


def test_derivation_from_normal_quantiles_matches_table():
    derived = nf4.derive_nf4_levels()
    assert derived.dtype == torch.float32
    assert (derived - nf4.nf4_levels()).abs().max().item() <= 1e-7


def test_midpoints_are_bitsandbytes_tree_thresholds():
    assert nf4.nf4_midpoints().tolist() == [float(np.float32(v)) for v in BNB_TREE]


@pytest.mark.parametrize("shape", [(64, 64), (7, 9), (3, 37), (96, 160), (1, 1), (5, 200)])
@pytest.mark.parametrize("block", [64, 32])
def test_codes_and_values_equal_reference(shape, block):
    torch.manual_seed(shape[0] * 1000 + shape[1])
    W = torch.randn(shape) * 0.05
    W.view(-1)[0] = 0.3  # an outlier: the block's absmax
    codes, absmax = nf4.quantize_nf4(W, block)
    ref_codes, ref_absmax, ref_w = reference_nf4(W, block)
    assert np.array_equal(codes.numpy(), ref_codes)
    assert np.array_equal(absmax.numpy(), ref_absmax)
    W_hat = nf4.dequantize_nf4(codes, absmax, block, shape)
    assert W_hat.shape == shape
    assert np.array_equal(W_hat.reshape(-1).numpy(), ref_w)  # max abs diff 0


def test_ties_on_midpoints_go_to_the_lower_code():
    mids = nf4.nf4_midpoints()
    W = torch.cat([torch.ones(1), mids, torch.nextafter(mids, torch.full_like(mids, 2.0))])
    codes, absmax = nf4.quantize_nf4(W.reshape(1, -1), 64)
    assert absmax.item() == 1.0
    assert codes[1:16].tolist() == list(range(15))  # exactly on midpoint i -> code i (lower)
    assert codes[16:].tolist() == list(range(1, 16))  # one ulp above -> code i + 1


def test_zero_block_dequantizes_to_zero():
    W = torch.zeros(2, 64)
    W[1] = torch.linspace(-1, 1, 64)
    codes, absmax = nf4.quantize_nf4(W, 64)
    assert codes[:64].eq(nf4.NF4_ZERO_CODE).all()
    assert nf4.dequantize_nf4(codes, absmax, 64, (2, 64))[0].eq(0).all()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 129])
def test_pack_round_trip_and_nibble_order(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = nf4.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(nf4.unpack_nibbles(packed, n), codes)
    assert nf4.pack_nibbles(torch.tensor([0x1, 0xA, 0x3], dtype=torch.uint8)).tolist() == [0x1A, 0x30]


def test_dynamic_map_shape():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and m.unique().numel() == 256
    assert m[127].item() == 0.0 and m[255].item() == 1.0 and torch.all(m[1:] > m[:-1])


def test_dynamic_8bit_search_picks_the_nearest_entry():
    """bitsandbytes' binary search + midpoint step, reproduced, lands on the nearest map entry
    for ordinary values (checked against a brute-force argmin)."""
    torch.manual_seed(2)
    x = torch.randn(5000)
    q, scale = nf4.quantize_blockwise_8bit(x, 256)
    xn = x / scale.repeat_interleave(256)[:5000]
    nearest = (xn[:, None].double() - nf4.dynamic_map()[None, :].double()).abs().argmin(dim=1)
    assert torch.equal(q.long(), nearest)


def test_double_quant_round_trip_error_bound():
    torch.manual_seed(0)
    absmax = nf4.block_absmax(torch.randn(64 * 1000) * 0.02, 64)  # 1000 constants: 4 DQ blocks, last short
    dq = nf4.double_quantize(absmax)
    assert dq.q.dtype == torch.uint8 and dq.q.shape == (1000,)
    assert dq.scale.shape == (4,) and dq.mean.shape == (1,)
    back = nf4.double_dequantize(dq)
    err = (back - absmax).abs()
    # The dynamic map's largest gap is 0.0141 (near ±1): error ≤ half of it times the block scale.
    bound = 0.0071 * dq.scale.repeat_interleave(256)[:1000]
    assert torch.all(err <= bound + 1e-9)
    assert err.max().item() / absmax.mean().item() < 1e-2  # measured 5.3e-3


def test_bits_per_param():
    assert nf4.bits_per_param(64, double_quant=False) == 4.5
    assert round(nf4.bits_per_param(64, double_quant=True), 3) == 4.127
    from qtool.nn.nf4linear import NF4Linear

    layer = NF4Linear.from_weight(torch.randn(512, 512), 64, True)  # B = 4096 = 16 DQ blocks
    assert abs(layer.bits_per_param() - (4.127 + 32 / 512**2)) < 1e-3


def test_nf4linear_forward_matches_dequantized_dense():
    from qtool.nn.nf4linear import NF4Linear

    torch.manual_seed(1)
    lin = torch.nn.Linear(40, 24, bias=True)
    q = NF4Linear.from_weight(lin.weight, 64, double_quant=False, bias=lin.bias)
    codes, absmax = nf4.quantize_nf4(lin.weight, 64)
    assert torch.equal(q.dequantize(), nf4.dequantize_nf4(codes, absmax, 64, (24, 40)))
    x = torch.randn(3, 40)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias), atol=1e-6)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert not [n for n, _ in q.named_parameters()]  # storage only, no dense weight


@pytest.mark.parametrize("double_quant", [True, False])
def test_checkpoint_round_trip_identical_logits(tmp_path, double_quant):
    from qtool.artifact.checkpoint import load_checkpoint, save_checkpoint
    from qtool.methods import quantize_model
    from qtool.nn.nf4linear import NF4Linear
    from qtool.quant.grid import QuantSpec

    model = tiny_llama()
    quantize_model(model, QuantSpec(4, 64), "nf4", double_quant=double_quant, quiet=True)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    info = save_checkpoint(model, None, {"method": "nf4"}, tmp_path / "ck")
    entry = info["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry == {"kind": "nf4", "block_size": 64, "double_quant": double_quant,
                     "in_features": 96, "out_features": 96, "bias": False}
    ck = load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    layers = [m for m in ck.model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14
    with torch.no_grad():
        assert torch.equal(ck.model(ids).logits, ref)
    from qtool.artifact.checkpoint import base_fingerprint

    assert base_fingerprint(ck.model) == info["fingerprint"]


def test_peqa_refuses_nf4_checkpoint(tmp_path):
    from qtool.artifact.checkpoint import save_checkpoint
    from qtool.errors import QtoolError
    from qtool.methods import quantize_model
    from qtool.methods.peqa import check_trainable
    from qtool.quant.grid import QuantSpec

    model = tiny_llama()
    quantize_model(model, QuantSpec(4, 64), "nf4", quiet=True)
    info = save_checkpoint(model, None, {"method": "nf4"}, tmp_path / "ck")
    with pytest.raises(QtoolError, match="kind 'nf4'"):
        check_trainable(info)


def test_cli_quantize_nf4(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", "--method", "nf4", "--group-size", "64", "--double-quant",
                                "--model", tiny_model_dir, "-o", out)
    assert code == 0, err
    assert "4.127 bits/param" in stdout.replace("\n", " ")
    info = json.loads((out / "qtool.json").read_text())
    assert info["method"] == "nf4" and info["group_size"] == 64
    assert info["stats"]["bits_per_param"] == 4.127
    assert {m["kind"] for m in info["modules"].values()} == {"nf4"}


@pytest.mark.parametrize("args,message", [
    (["-g", "100"], "absmax block"),
    (["--bits", "3"], "4-bit data type"),
])
def test_cli_quantize_nf4_bad_input(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "quantize", "--method", "nf4", *args, "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
