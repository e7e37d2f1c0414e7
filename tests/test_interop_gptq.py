"""GPTQ export (gptq_v2, and v1 on request) checked by an unpacker written here from the format's
documentation (GPTQModel's packer: 32/b codes per int32 along K for b = 2/4/8, the 10|1|10|1|10 word
pattern for b = 3; qzeros the same along N; Ŵ[n, k] = scales[g_idx[k], n]·(q[k, n] − z[g_idx[k], n]))."""

from __future__ import annotations

import json

import pytest
import torch
from interop_util import tiny_checkpoint
from safetensors.torch import load_file

from qtool.artifact.checkpoint import load_checkpoint
from qtool.interop.export import export_checkpoint
from tests.cli_util import run_cli


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along R (32 codes per `bits` words) -> int64 codes [R·32/bits, C]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    R, C = w.shape
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = torch.arange(per) * bits
        return ((w.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)).reshape(R * per, C)
    out = []
    for a, b, c in w.reshape(R // 3, 3, C):  # three words hold 32 codes: 10 | 1 | 10 | 1 | 10
        vals = [(a >> (3 * i)) & 7 for i in range(10)]
        vals.append(((a >> 30) & 3) | ((b & 1) << 2))
        vals += [(b >> (3 * i + 1)) & 7 for i in range(10)]
        vals.append(((b >> 31) & 1) | ((c & 3) << 1))
        vals += [(c >> (3 * i + 2)) & 7 for i in range(10)]
        out.append(torch.stack(vals))
    return torch.cat(out)


def _dequant(t: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    q = _unpack_words(t[f"{name}.qweight"], bits)  # [K, N]
    z = _unpack_words(t[f"{name}.qzeros"].t().contiguous(), bits).t()  # [G, N]
    if v1:
        z = z + 1
    g_idx = t[f"{name}.g_idx"].long()
    s = t[f"{name}.scales"].float()
    return (s[g_idx] * (q - z[g_idx]).float()).t()  # [N, K]


@pytest.mark.parametrize("bits,group,sym,act,inter", [(2, 64, False, False, 256), (3, 128, False, True, 256),
                                                       (4, 32, True, False, 256), (8, None, False, False, 256),
                                                       (3, None, True, False, 256), (4, 128, False, False, 160)])
def test_gptq_export_decodes_to_qtool_weights(tmp_path, bits, group, sym, act, inter):
    """inter = 160: down_proj has K = 160, a short last group of 32 at g128, which g_idx expresses."""
    ck = tiny_checkpoint(tmp_path / "ck", bits, group, sym, act, inter=inter)
    export_checkpoint(ck, "gptq", tmp_path / "gptq")
    qc = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and qc["bits"] == bits and qc["desc_act"] == act
    assert qc["group_size"] == (-1 if group is None else group) and qc["sym"] == sym
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"] == qc
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, layer in load_checkpoint(ck).model.named_modules():
        if type(layer).__name__ != "QuantLinear":
            continue
        assert t[f"{name}.qweight"].shape == (layer.in_features * bits // 32, layer.out_features)
        assert t[f"{name}.scales"].dtype == torch.float16
        torch.testing.assert_close(_dequant(t, name, bits, False), layer.dense_weight(), rtol=0, atol=1e-6)


def test_gptq_v1_stores_z_minus_one_and_refuses_zero(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "sym", 4, 64, symmetric=True)  # z = 8 everywhere
    export_checkpoint(ck, "gptq", tmp_path / "v1", gptq_v1=True)
    t = load_file(str(tmp_path / "v1" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert (_unpack_words(t[f"{name}.qzeros"].t().contiguous(), 4) == 7).all()
    layer = load_checkpoint(ck).model.get_submodule(name)
    torch.testing.assert_close(_dequant(t, name, 4, True), layer.dense_weight(), rtol=0, atol=1e-6)

    def zero_point_zero(model):  # a group whose minimum is ≥ 0 gets z = 0 from an asymmetric grid
        model.get_submodule(name).zeros[3, 0] = 0

    asym = tiny_checkpoint(tmp_path / "asym", 2, 64, edit=zero_point_zero)
    code, _, err = run_cli(capsys, "export", asym, "-f", "gptq", "--gptq-v1", "-o", tmp_path / "v1a")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "overflow" in err and "gptq_v2" in err
    assert not (tmp_path / "v1a").exists()
