"""Checkpoint artifact: write, load (meta skeleton), verify, refuse corruption."""

import json

import pytest
import torch

from qtool.artifact.checkpoint import load_checkpoint, save_checkpoint
from qtool.errors import QtoolError
from qtool.methods import quantize_model
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import quant_linears
from qtool.quant.grid import QuantSpec
from tests.conftest import tiny_llama


def _quantized(spec=QuantSpec(4, 32), method="rtn", **kw):
    model = tiny_llama()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, spec, method, calib=ids if method == "gptq" else None, quiet=True, **kw)
    return model, ids


@pytest.mark.parametrize("spec,kw", [(QuantSpec(4, 32), {}), (QuantSpec(3, None), {}),
                                     (QuantSpec(2, 64, True), {"act_order": True})])
def test_save_load_reproduces_logits(tmp_path, spec, kw):
    model, ids = _quantized(spec, "gptq" if kw else "rtn", **kw)
    with torch.no_grad():
        ref = model(ids).logits
    info = save_checkpoint(model, None, {"method": "rtn", "bits": spec.bits, "group_size": spec.group_size,
                                         "source": {}}, tmp_path / "ck")
    assert (tmp_path / "ck" / "qtool.json").is_file()
    assert set(info["files"]) >= {"model.safetensors", "scales.safetensors", "config.json"}
    ck = load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    layers = quant_linears(ck.model)
    assert len(layers) == 14 and all(isinstance(m, QuantLinear) for m in layers.values())
    with torch.no_grad():
        out = ck.model(ids).logits
    assert torch.equal(out, ref)
    assert ck.info["fingerprint"] == info["fingerprint"]


def test_tied_embedding_saved_once_and_retied(tmp_path):
    model, ids = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    assert ck.model.lm_head.weight.data_ptr() == ck.model.model.embed_tokens.weight.data_ptr()


def test_existing_output_needs_overwrite(tmp_path):
    model, _ = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    before = (tmp_path / "ck" / "qtool.json").read_text()
    with pytest.raises(QtoolError, match="exists"):
        save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    assert (tmp_path / "ck" / "qtool.json").read_text() == before
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    model, _ = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(QtoolError, match="corrupted"):
        load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(QtoolError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "ck", with_tokenizer=False)


def test_missing_file_and_unknown_version_are_refused(tmp_path):
    model, _ = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    mf = tmp_path / "ck" / "qtool.json"
    info = json.loads(mf.read_text())
    mf.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(QtoolError, match="format version 99"):
        load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    mf.write_text(json.dumps(info))
    (tmp_path / "ck" / "scales.safetensors").unlink()
    with pytest.raises(QtoolError, match="missing"):
        load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    with pytest.raises(QtoolError, match="not a qtool checkpoint"):
        load_checkpoint(tmp_path, with_tokenizer=False)


def test_sharded_checkpoint_round_trips(tmp_path):
    model, ids = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck", shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(ck.model(ids).logits, model(ids).logits)


def test_scales_live_in_their_own_file(tmp_path):
    from safetensors import safe_open

    model, _ = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "scales.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        main = set(f.keys())
    assert keys == {f"{n}.scales" for n in quant_linears(model)}
    assert not any(k.endswith(".scales") for k in main)
    assert {f"{n}.qweight" for n in quant_linears(model)} <= main


def test_lm_head_quantized_on_request(tmp_path):
    model, ids = _quantized(quantize_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck", with_tokenizer=False)
    assert isinstance(ck.model.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(ck.model(ids).logits, model(ids).logits)


def test_zero_point_outside_the_grid_is_refused(tmp_path):
    """A zero-point ≥ 2^b (a file edited by hand, with the manifest check skipped) is refused
    at load: the kernels assume z is on the b-bit grid."""
    from safetensors.torch import load_file, save_file

    model, _ = _quantized()
    save_checkpoint(model, None, {"source": {}}, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    state = load_file(f)
    key = next(k for k in state if k.endswith(".zeros"))
    state[key][0, 0] = 16
    save_file(state, f)
    with pytest.raises(QtoolError, match="outside the 4-bit grid"):
        load_checkpoint(tmp_path / "ck", verify=False, with_tokenizer=False)
    state[key][0, 0] = 15
    save_file(state, f)
    load_checkpoint(tmp_path / "ck", verify=False, with_tokenizer=False)
