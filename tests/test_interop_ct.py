"""compressed-tensors export: transformers (+ the compressed-tensors package) loads what
`qtool export --format compressed-tensors` writes, and its logits match qtool's own forward.

Reference: compressed-tensors' pack-quantized compressor (its own unpacker and dequantizer, run by
transformers with CompressedTensorsConfig(dequantize=True)); qtool's forward is the other side.
"""

from __future__ import annotations

import json

import pytest
import torch
from interop_util import rel_max_diff, rtn_checkpoint
from peqa_util import byte_tokenizer, tiny_llama

from qtool.artifact.checkpoint import load_checkpoint
from qtool.interop.export import export_checkpoint
from tests.cli_util import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
ct_pkg = pytest.importorskip("compressed_tensors", reason="needs the `interop` extra (compressed-tensors)")

# Measured 2026-12-07 on CPU (transformers 5.23, compressed-tensors 0.20.1). compressed-tensors
# dequantizes in the scale dtype (fp16), qtool in fp32: the loaded weights are exactly qtool's Ŵ
# rounded once to fp16 (checked bit for bit below), and that rounding alone moves the logits by
# ≤ 4e-4 of the largest |logit| on the tiny models (≤ 1.2e-2 on SmolLM2 at W2, whose activations grow
# large; ≤ 2e-3 at W3/W4/W8). A wrong code, zero-point or scale fails the bit-exact weight check.
TOL = 2e-3


def check_against_transformers(path, qmodel, ids, tol: float) -> None:
    """Load `path` with transformers + compressed-tensors (dequantize=True, CPU): every quantized
    Linear's weight is qtool's Ŵ rounded to the scale dtype, and the logits agree within `tol`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qtool.nn.qlinear import dense_cache
    from qtool.nn.replace import quant_linears

    hf = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=CompressedTensorsConfig(dequantize=True),
                                              dtype=torch.float32)
    layers = quant_linears(qmodel)
    assert layers and all(layer.perm is None for layer in layers.values())
    with torch.no_grad(), dense_cache(qmodel):  # Ŵ dequantized once, for the check and the forward
        for name, layer in layers.items():
            W = hf.get_submodule(name).weight
            assert isinstance(W, torch.nn.Parameter) and W.shape == (layer.out_features, layer.in_features)
            assert torch.equal(W, layer._dense.to(layer.scales.dtype).float()), name
        assert rel_max_diff(hf(ids).logits, qmodel(ids).logits) < tol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose K (128, 256) is a multiple of 128, so g128 is expressible."""
    return tiny_llama(hidden=128, inter=256), byte_tokenizer(), tmp_path_factory.mktemp("ct-tiny")


@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (3, 128, True), (2, None, False)])
def test_tiny_export_loads_in_transformers(tiny, bits, group, sym):
    fp, tok, root = tiny
    ck, qmodel = rtn_checkpoint(fp, tok, root / f"w{bits}-{group}-{sym}", bits, group, sym)
    out = root / f"w{bits}-{group}-{sym}-ct"
    export_checkpoint(ck, "compressed-tensors", out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], w["num_bits"], w["symmetric"], w["group_size"]) == \
        ("compressed-tensors", "pack-quantized", bits, sym, group)
    assert w["strategy"] == ("channel" if group is None else "group") and qc["ignore"] == ["lm_head"]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    check_against_transformers(out, load_checkpoint(ck).model, ids, TOL)


def test_packed_tensors_match_compressed_tensors_unpacker(tiny):
    """weight_packed / weight_zero_point decode, with compressed-tensors' own unpacker, to qtool's codes
    and zero-points (signed storage = unsigned − 2^(b−1))."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    fp, tok, root = tiny
    for bits in (2, 3, 4, 8):
        ck, _ = rtn_checkpoint(fp, tok, root / f"pk{bits}", bits, 64)
        out = root / f"pk{bits}-ct"
        export_checkpoint(ck, "compressed-tensors", out)
        t = load_file(str(out / "model.safetensors"))
        layer = load_checkpoint(ck).model.get_submodule("model.layers.1.mlp.down_proj")
        name = "model.layers.1.mlp.down_proj"
        N, K = layer.out_features, layer.in_features
        assert t[f"{name}.weight_packed"].shape == (N, (K * bits + 31) // 32)
        assert t[f"{name}.weight_shape"].tolist() == [N, K]
        codes = unpack_from_int32(t[f"{name}.weight_packed"], bits, torch.Size([N, K]))
        assert torch.equal(codes.to(torch.int16) + (1 << (bits - 1)), layer.codes().to(torch.int16))
        zp = unpack_from_int32(t[f"{name}.weight_zero_point"], bits, torch.Size([N, K // 64]), packed_dim=0)
        assert torch.equal(zp.to(torch.int16) + (1 << (bits - 1)), layer.zeros.to(torch.int16))
        assert torch.equal(t[f"{name}.weight_scale"], layer.scales)


def test_ragged_groups_refused_in_one_line(tmp_path, capsys):
    """K = 96 is not a multiple of 64: the format cannot hold a short last group."""
    fp, tok = tiny_llama(hidden=64, inter=96), byte_tokenizer()
    ck, _ = rtn_checkpoint(fp, tok, tmp_path / "ck", 4, 64)
    code, _, err = run_cli(capsys, "export", ck, "--format", "compressed-tensors", "-o", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "down_proj" in err and "K = 96" in err and "g32" in err and "per-channel" in err and "gptq" in err
    assert not (tmp_path / "out").exists()
