"""Bad source models: each is one line on stderr, exit 2, and nothing written (no output directory,
no temporary directory beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_util import run_cli


def _tiny(path: Path, shards: bool = True) -> Path:
    from tiny_models import tiny_llama

    from qtool.models.synthetic import tokenizer

    tiny_llama(hidden=64, inter=96, vocab=512).save_pretrained(path, max_shard_size="60KB" if shards else "1GB")
    tokenizer().save_pretrained(path)
    return path


def _refused(capsys, tmp_path: Path, model: Path, *extra: str) -> str:
    out = tmp_path / "out"
    capsys.readouterr()  # what saving the source printed
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", model, "-o", out, "-q", *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return err


def test_directory_without_weights(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    assert "has no weights" in _refused(capsys, tmp_path, d)


def test_pickle_only_directory(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    assert "pickle" in _refused(capsys, tmp_path, d)


def test_shard_missing_from_index(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"shard {shard.name} named in model.safetensors.index.json is missing" in _refused(capsys, tmp_path, d)


def test_index_names_a_tensor_the_shard_lacks(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    wm[name] = next(f for k, f in wm.items() if f != wm[name])
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert f"tensor {name}, named in the index, is not in the shard" in _refused(capsys, tmp_path, d)


def test_shape_disagrees_with_config(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    err = _refused(capsys, tmp_path, d)
    assert "model.layers.0.mlp.gate_proj.weight has shape [96, 64] but config.json implies [128, 64]" in err


def test_tensor_missing_from_weights(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _tiny(tmp_path / "m", shards=False)
    state = load_file(str(d / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert "tensor model.norm.weight is missing from the weights" in _refused(capsys, tmp_path, d)


def test_unknown_architecture(capsys, tmp_path):
    d = _tiny(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "unsupported or unreadable config" in _refused(capsys, tmp_path, d)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_model_too_large_for_the_ram_budget(capsys, tmp_path, method):
    d = _tiny(tmp_path / "m")
    err = _refused(capsys, tmp_path, d, "--max-ram", "0.0001", "--method", method)
    assert "more than --max-ram 0.0001 GB" in err and f"with {method}" in err
