"""LoRA / DoRA on quantized bases: the wrapper's math, the PEFT-format adapter (PEFT itself
loads it and reproduces qtool's logits), and `qtool finetune --method lora|qlora` + `eval --adapter`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peqa_util import quantized_tiny, saved_tiny_checkpoint
from torch import nn
from typer.testing import CliRunner

from qtool.artifact.adapter import AdapterSpec, check_adapter, read_adapter, save_adapter
from qtool.cli.app import app
from qtool.errors import QtoolError
from qtool.nn.lora import (
    LoraLinear,
    add_lora,
    base_weight,
    lora_parameters,
    lora_tensors,
    remove_lora,
    set_lora_tensors,
    wrap_modules,
)
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear
from qtool.quant.grid import QuantSpec, rtn


def _bases(N: int = 48, K: int = 80):
    torch.manual_seed(1)
    W, b = torch.randn(N, K), torch.randn(N)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    q = QuantLinear.from_quantized(rtn(W, QuantSpec(3, 32)), 3, 32, b)
    nf = NF4Linear.from_weight(W, 64, True, b)
    return {"linear": lin, "int3-g32": q, "nf4": nf}


def _randomize(w: LoraLinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.lora_A.weight.copy_(torch.randn(w.lora_A.weight.shape, generator=g) * 0.2)
        w.lora_B.weight.copy_(torch.randn(w.lora_B.weight.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["linear", "int3-g32", "nf4"])
def test_lora_forward_is_dense_formula(kind):
    base = _bases()[kind]
    x = torch.randn(5, 80)
    w = LoraLinear(base, rank=4, alpha=8, dropout=0.0).eval()
    assert torch.allclose(w(x), base(x), atol=1e-6)  # B = 0: starts exactly at the base
    _randomize(w)
    W = base_weight(base)
    ref = F.linear(x, W + 2.0 * w.lora_B.weight @ w.lora_A.weight, base.bias)
    assert not torch.allclose(ref, base(x), atol=1e-2)
    assert torch.allclose(w(x), ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "int3-g32", "nf4"])
def test_dora_forward_is_paper_formula(kind):
    base = _bases()[kind]
    x = torch.randn(5, 80)
    w = LoraLinear(base, rank=4, alpha=8, dora=True).eval()
    assert torch.allclose(w(x), base(x), atol=1e-5)  # m = ‖Ŵ‖ and B = 0: the base again
    _randomize(w, 3)
    with torch.no_grad():
        w.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 48))
    V = base_weight(base) + 2.0 * w.lora_B.weight @ w.lora_A.weight
    ref = F.linear(x, w.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True), base.bias)
    assert torch.allclose(w(x), ref, atol=1e-4)


def test_only_adapter_gets_gradients_and_base_is_untouched():
    base = _bases()["int3-g32"]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    w = LoraLinear(base, 4, 8, dora=True)
    params = lora_parameters({"x": w})
    _randomize(w)
    w(torch.randn(7, 80)).square().sum().backward()
    assert set(params) == {"x.lora_A.weight", "x.lora_B.weight", "x.lora_magnitude_vector"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_add_and_remove_on_a_quantized_model():
    model, _, _ = quantized_tiny(4, 32)
    ids = torch.randint(0, 256, (2, 12))
    ref = model(ids).logits
    layers = add_lora(model, 8, 16, targets=("q_proj", "down_proj"))
    assert len(layers) == 4 and all(isinstance(m.base, QuantLinear) for m in layers.values())
    # the base is frozen; only the adapters train
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_parameters(layers))
    assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    remove_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with pytest.raises(QtoolError, match="no layer matches"):
        add_lora(model, 8, 16, targets=("nope",))
    with pytest.raises(QtoolError, match="rank"):
        add_lora(model, 0, 16)


def _dequantized_copy(model):
    """An fp copy with every quantized Linear replaced by nn.Linear(Ŵ): what PEFT can wrap."""
    import copy

    from qtool.nn.replace import quantized_linears, set_module

    fp = copy.deepcopy(model)
    for name, q in quantized_linears(fp).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(q.dense_weight(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        set_module(fp, name, lin)
    return fp


@pytest.mark.parametrize("dora", [False, True])
def test_peft_loads_our_adapter_and_reproduces_logits(tmp_path, dora):
    peft = pytest.importorskip("peft")  # a test extra (pyproject [dev]); CI installs it
    model, _, info = quantized_tiny(3, 32)
    fp = _dequantized_copy(model)
    layers = add_lora(model, 4, 8, dora=dora)
    for i, w in enumerate(layers.values()):
        _randomize(w, i)
        if dora:
            with torch.no_grad():
                w.lora_magnitude_vector.mul_(1.1)
    ids = torch.randint(0, 256, (2, 16))
    ours = model(ids).logits
    plain = fp(ids).logits  # before PEFT injects its layers into `fp`
    spec = AdapterSpec(4, 8.0, 0.0, dora, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"))
    out = tmp_path / "adapter"
    save_adapter(out, lora_tensors(layers), spec, info["fingerprint"], init="test", task="unit")
    theirs = peft.PeftModel.from_pretrained(fp, str(out)).eval()(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the output at all

    # and back: our reader takes the directory, and loading it reproduces the logits
    ad = read_adapter(out)
    assert ad.base_fingerprint == info["fingerprint"] and ad.spec.dora == dora and ad.meta["qtool.task"] == "unit"
    remove_lora(model)
    set_lora_tensors(wrap_modules(model, sorted(ad.tensors), 4, 8.0, 0.0, dora), ad.tensors)
    assert torch.equal(model(ids).logits, ours)


def test_we_read_an_adapter_written_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, _, _ = quantized_tiny(4, None)
    fp = _dequantized_copy(model)
    pm = peft.get_peft_model(fp, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                                                 init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    ids = torch.randint(0, 256, (1, 10))
    theirs = pm.eval()(ids).logits
    from qtool.methods.lora import attach_adapter

    attach_adapter(model, tmp_path / "p", fingerprint=None)
    assert (model(ids).logits - theirs).abs().max() < 1e-4


def test_adapter_refusals(tmp_path):
    model, _, info = quantized_tiny(4, 32)
    layers = add_lora(model, 4, 8, targets=("q_proj",))
    spec = AdapterSpec(4, 8.0, targets=("q_proj",))
    out = tmp_path / "a"
    save_adapter(out, lora_tensors(layers), spec, info["fingerprint"])
    with pytest.raises(QtoolError, match="exists"):
        save_adapter(out, lora_tensors(layers), spec, info["fingerprint"])
    ad = read_adapter(out)
    cands = {n: m.base for n, m in layers.items()}
    check_adapter(ad, cands, info["fingerprint"])
    with pytest.raises(QtoolError, match="made for base"):
        check_adapter(ad, cands, "0" * 64)
    with pytest.raises(QtoolError, match="not a linear layer"):
        check_adapter(ad, {}, None)
    other, _, _ = quantized_tiny(4, 32, hidden=32, inter=48)
    with pytest.raises(QtoolError, match="expects"):
        check_adapter(ad, {n: other.get_submodule(n) for n in cands}, None)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(QtoolError, match="not valid JSON"):
        read_adapter(out)
    with pytest.raises(QtoolError, match="not an adapter directory"):
        read_adapter(tmp_path / "missing")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _alpaca(path, n=24):
    from qtool.data.tasks import rotten_tomatoes_reviews

    recs = [{"instruction": "Classify the sentiment.", "input": r.text[:100], "output": r.label}
            for r in rotten_tomatoes_reviews("validation")[:n]]
    path.write_text(json.dumps(recs))
    return path


def test_finetune_lora_cli_writes_peft_adapter_and_eval_scores_it(tmp_path):
    d = tmp_path / "ck"
    info = saved_tiny_checkpoint(d, 4, 32)
    data = _alpaca(tmp_path / "r.json")
    out = tmp_path / "ad"
    r = invoke("finetune", d, "--method", "lora", "--task", "alpaca", "--data", data, "-o", out, "--max-steps", 4,
               "--batch-size", 4, "--seqlen", 384, "--lr", 3e-3, "--rank", 4, "--eval-every", 2, "--device", "cpu",
               "--dora", "--json", tmp_path / "res.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["kept"]["loss"] < res["initial"]["loss"]
    ad = read_adapter(out)
    assert ad.spec.rank == 4 and ad.spec.dora and ad.base_fingerprint == info["fingerprint"]
    assert ad.meta["qtool.method"] == "lora" and ad.meta["qtool.schedule"] == "cosine"
    assert len(ad.tensors) == 14  # 7 linears × 2 blocks
    assert any(p["lora_B.weight"].abs().sum() > 0 for p in ad.tensors.values())  # trained, not the init
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(json.loads(data.read_text())[i]["input"] for i in range(24)))
    r = invoke("eval", d, "--adapter", out, "--corpus", corpus, "--seqlen", 64, "--max-windows", 2, "--device", "cpu",
               "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert len(rows) == 2 and "adapter" in rows[1]["label"]
    assert rows[0]["perplexity"]["ppl"] != rows[1]["perplexity"]["ppl"]


def test_finetune_lora_refusals(tmp_path):
    d = tmp_path / "ck"
    saved_tiny_checkpoint(d, 4, 32)
    data = _alpaca(tmp_path / "r.json", 12)
    r = invoke("finetune", d, "--method", "qlora", "--task", "alpaca", "--data", data)
    assert r.exit_code != 0 and "NF4 base" in str(r.exception)
    r = invoke("finetune", d, "--method", "lora", "--task", "alpaca", "--data", data, "--rank", 0)
    assert "--rank" in str(r.exception)
    r = invoke("finetune", d, "--method", "peqa", "--task", "alpaca", "--data", data, "--dora")
    assert "--dora" in str(r.exception)
    r = invoke("finetune", d, "--method", "lora", "--task", "alpaca", "--data", data, "--optim", "sgd")
    assert "--optim" in str(r.exception)
    r = invoke("finetune", d, "--method", "lora", "--task", "alpaca", "--data", data, "--adapter", tmp_path)
    assert "missing adapter_config.json" in str(r.exception)
    r = invoke("eval", d, "--adapter", tmp_path / "nope", "--merge")
    assert "--merge is refused" in str(r.exception)
    assert not (tmp_path / "alpaca-lora").exists()
