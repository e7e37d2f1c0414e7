"""bitsandbytes NF4 export: transformers + bitsandbytes load what `qtool export --format bnb-nf4`
writes as a pre-quantized load_in_4bit model, and bitsandbytes' own dequantizer gives qtool's Ŵ
bit for bit (reference: bitsandbytes.functional.dequantize_4bit)."""

from __future__ import annotations

import json

import pytest
import torch
from interop_util import rel_max_diff
from peqa_util import byte_tokenizer, tiny_llama

from qtool.artifact.checkpoint import load_checkpoint, save_checkpoint
from qtool.interop.export import export_checkpoint
from qtool.methods import quantize_model
from qtool.nn.replace import nf4_linears
from qtool.quant.grid import QuantSpec
from tests.cli_util import run_cli

bnb = pytest.importorskip("bitsandbytes", reason="needs the `interop` extra (bitsandbytes ≥ 0.45 for CPU 4-bit)")

# bitsandbytes' CPU 4-bit forward computes in bfloat16 (relative precision 2^-8); measured
# 2026-12-07 on CPU: ≤ 3.1e-3 of the largest |logit| on this tiny model.
TOL = 2e-2


@pytest.mark.parametrize("double_quant,block", [(True, 64), (False, 128)])
def test_bnb_export_loads_and_dequantizes_bit_identically(tmp_path, double_quant, block):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=128, inter=256)
    quantize_model(model, QuantSpec(4, block), "nf4", quiet=True, double_quant=double_quant)
    ck = tmp_path / "ck"
    save_checkpoint(model, byte_tokenizer(), {"method": "nf4", "bits": 4, "group_size": block}, ck)
    export_checkpoint(ck, "bnb-nf4", tmp_path / "bnb")
    qc = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_use_double_quant"] == double_quant
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"), device_map="cpu")
    ours = load_checkpoint(ck).model
    for name, layer in nf4_linears(ours).items():
        w = hf.get_submodule(name).weight
        assert isinstance(w, bnb.nn.Params4bit) and w.quant_state.nested == double_quant
        assert w.quant_state.blocksize == block
        # before any forward: bitsandbytes' CPU path may re-lay the weight for its kernel on first use
        assert torch.equal(bnb.functional.dequantize_4bit(w.data, w.quant_state).float(), layer.dequantize())
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_max_diff(hf(ids).logits, ours(ids).logits) < TOL


def test_bnb_refuses_integer_checkpoints(tmp_path, capsys):
    from interop_util import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "ck", 4, 64)
    code, _, err = run_cli(capsys, "export", ck, "-f", "bnb-nf4", "-o", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bnb-nf4 holds NF4" in err
    assert not (tmp_path / "out").exists()
