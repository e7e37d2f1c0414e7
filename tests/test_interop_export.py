"""`qtool export` options and refusals: --delta writes the task's scales (s₀ + Δs, as swap-scales
does), --adapter copies a PEFT adapter that vLLM's LoRA loader accepts, and a delta or adapter for
another base, DoRA, modules_to_save, an unknown format: one line, exit 2, nothing written."""

from __future__ import annotations

import json

import torch
from interop_util import tiny_checkpoint
from safetensors.torch import load_file, save_file

from qtool.artifact.adapter import AdapterSpec, save_adapter
from qtool.artifact.delta import save_delta
from qtool.artifact.scales import combine_scales
from tests.cli_util import run_cli

Q = "model.layers.0.self_attn.q_proj"


def _delta(path, info, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in info["modules"].items():
        G = -(-m["in_features"] // (m["group_size"] or m["in_features"]))
        tensors[name] = torch.randn(m["out_features"], G, generator=g) * 1e-3
    save_delta(path, tensors, info, task="t", steps=1)
    return tensors


def _adapter(path, info, dora=False, fingerprint=None):
    m = info["modules"][Q]
    parts = {"lora_A.weight": torch.randn(4, m["in_features"]), "lora_B.weight": torch.zeros(m["out_features"], 4)}
    if dora:
        parts["lora_magnitude_vector"] = torch.ones(m["out_features"])
    save_adapter(path, {Q: parts}, AdapterSpec(4, 8.0, dora=dora, targets=("q_proj",)),
                 fingerprint or info["fingerprint"])


def test_delta_and_adapter_export(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ck", 4, 64)
    info = json.loads((ck / "qtool.json").read_text())
    delta = _delta(tmp_path / "t.safetensors", info)
    _adapter(tmp_path / "ad", info)
    code, out, err = run_cli(capsys, "export", ck, "-f", "compressed-tensors", "--delta", tmp_path / "t.safetensors",
                             "--adapter", tmp_path / "ad", "-o", tmp_path / "out")
    assert code == 0, err
    assert "with task 't'" in out and "vLLM" in out
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    s0 = load_file(str(ck / "scales.safetensors"))[f"{Q}.scales"]
    assert torch.equal(t[f"{Q}.weight_scale"], combine_scales(s0, delta[Q]))
    assert not torch.equal(t[f"{Q}.weight_scale"], s0)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
    assert not (tmp_path / "out" / "qtool.json").exists() and not (tmp_path / "out" / "scales.safetensors").exists()


def test_refusals_write_nothing(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ck", 4, 64)
    other = tiny_checkpoint(tmp_path / "other", 4, 64, seed=1)
    info = json.loads((ck / "qtool.json").read_text())
    other_info = json.loads((other / "qtool.json").read_text())
    _delta(tmp_path / "other.safetensors", other_info)
    _adapter(tmp_path / "other-ad", info, fingerprint=other_info["fingerprint"])
    _adapter(tmp_path / "dora", info, dora=True)
    _adapter(tmp_path / "mts", info)
    cfg = json.loads((tmp_path / "mts" / "adapter_config.json").read_text())
    (tmp_path / "mts" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    # as PEFT would write it: no qtool content hash (qtool never writes modules_to_save itself)
    weights = tmp_path / "mts" / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    cases = [(("--delta", tmp_path / "other.safetensors"), "trained on base"),
             (("--adapter", tmp_path / "other-ad"), "made for base"),
             (("--adapter", tmp_path / "dora"), "DoRA"),
             (("--adapter", tmp_path / "mts"), "modules_to_save"),
             (("-f", "gguf"), "unknown --format")]
    for extra, words in cases:
        code, _, err = run_cli(capsys, "export", ck, "-f", "gptq", *extra, "-o", tmp_path / "out")
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (extra, err)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
