"""LoftQ: the one-matrix math (qtool.quant.loftq), the loftq methods, the PEFT sidecar and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from cli_util import run_cli
from tiny_models import tiny_llama

from qtool.errors import QtoolError
from qtool.quant.grid import QuantSpec
from qtool.quant.loftq import int_quantizer, loftq, low_rank_factors


def matrix(kind: str, seed: int = 0, N: int = 96, K: int = 160) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return 0.02 * torch.randn(N, K, generator=g)
    # low rank plus noise: the case LoftQ is made for (a few directions RTN cannot follow)
    return 0.02 * torch.randn(N, 8, generator=g) @ torch.randn(8, K, generator=g) + 0.002 * torch.randn(N, K,
                                                                                                      generator=g)


def total_error(W, res, scaling):
    return torch.linalg.matrix_norm(W - (res.W_hat + scaling * res.B @ res.A)).item()


def plain_alternation(W, quant, rank, iters):
    """LoftQ as written in the paper, without qtool's keep-if-better rule; errors after each step."""
    L, errors = torch.zeros_like(W), []
    for _ in range(iters):
        _, W_hat = quant(W - L)
        U, S, Vh = torch.linalg.svd(W - W_hat, full_matrices=False)
        L = U[:, :rank] * S[:rank] @ Vh[:rank]
        errors.append(torch.linalg.matrix_norm(W - W_hat - L).item())
    return errors


@pytest.mark.parametrize("kind", ["random", "lowrank"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_non_increasing_and_below_rtn(kind, bits):
    W = matrix(kind)
    quant = int_quantizer(QuantSpec(bits, 32))
    rank, scaling = 16, 16 / 16 * 0.25  # α/r ≠ 1, so a forgotten scaling would show
    res = loftq(W, quant, rank, scaling, iters=5)
    rtn_err = torch.linalg.matrix_norm(W - quant(W)[1]).item()
    assert res.errors[0] == pytest.approx(rtn_err, rel=1e-6)
    assert all(b <= a for a, b in zip(res.errors, res.errors[1:], strict=False)), res.errors
    assert res.errors[-1] < 0.85 * rtn_err  # measured 0.66-0.76 of RTN's error on these matrices
    assert total_error(W, res, scaling) == pytest.approx(res.errors[-1], rel=1e-5)
    # Asking for fewer steps gives the same prefix: the error is non-increasing in T as well.
    by_T = [total_error(W, loftq(W, quant, rank, scaling, T), scaling) for T in range(1, min(res.iters, 3) + 1)]
    assert by_T == pytest.approx(res.errors[1:len(by_T) + 1], rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_follows_plain_alternation_until_it_stops_improving(bits):
    W = matrix("random", seed=1)
    quant = int_quantizer(QuantSpec(bits, 32))
    res = loftq(W, quant, 16, 1.0, iters=8)
    plain = plain_alternation(W, quant, 16, 8)
    assert res.errors[1:] == pytest.approx(plain[: res.iters], rel=1e-5)
    if res.iters < 8:  # stopped: the next plain step was no better
        assert plain[res.iters] >= res.errors[-1] * (1 - 1e-6)
    if bits == 2:  # at 2 bits the plain alternation drifts upward and qtool stops before it does
        assert res.iters < 8 and max(plain) > res.errors[-1]


def test_zero_iterations_is_plain_rtn():
    W = matrix("random")
    quant = int_quantizer(QuantSpec(3, 64))
    res = loftq(W, quant, 8, 2.0, iters=0)
    qw, W_hat = quant(W)
    assert res.iters == 0 and torch.equal(res.W_hat, W_hat) and torch.equal(res.q.codes, qw.codes)
    assert not res.A.any() and not res.B.any()
    assert res.A.shape == (8, 160) and res.B.shape == (96, 8)
    assert res.errors == [pytest.approx(torch.linalg.matrix_norm(W - W_hat).item())]


def test_one_iteration_is_rtn_plus_truncated_svd_split_by_scaling():
    W = matrix("lowrank")
    quant = int_quantizer(QuantSpec(2, 64))
    rank, alpha = 8, 16.0
    scaling = alpha / rank
    res = loftq(W, quant, rank, scaling, iters=1)
    _, W_hat = quant(W)
    assert torch.equal(res.W_hat, W_hat)
    U, S, Vh = torch.linalg.svd(W - W_hat, full_matrices=False)
    L = U[:, :rank] * S[:rank] @ Vh[:rank]
    assert torch.allclose(scaling * res.B @ res.A, L, atol=1e-6)
    # √(S/s) on each side: A·Aᵀ and Bᵀ·B are both diag(S_r)/s, so neither factor dominates training
    assert torch.allclose(res.A @ res.A.T, torch.diag(S[:rank]) / scaling, atol=1e-5)
    assert torch.allclose(res.B.T @ res.B, torch.diag(S[:rank]) / scaling, atol=1e-5)


def test_low_rank_factors_at_full_rank_reconstruct():
    R = matrix("random")
    A, B = low_rank_factors(R, min(R.shape), 0.5)
    assert torch.allclose(0.5 * B @ A, R, atol=1e-6)


@pytest.mark.parametrize("rank,scaling,iters,message", [
    (0, 1.0, 1, "rank must be ≥ 1"),
    (97, 1.0, 1, "exceeds min"),
    (8, 0.0, 1, "scaling"),
    (8, 1.0, -1, "iterations"),
])
def test_bad_arguments(rank, scaling, iters, message):
    with pytest.raises(QtoolError, match=message):
        loftq(matrix("random"), int_quantizer(QuantSpec(4, 32)), rank, scaling, iters)


def test_nf4_base_below_nf4_error():
    from qtool.methods.loftq import nf4_quantizer

    W = matrix("lowrank")
    quant = nf4_quantizer(64, True, None)
    res = loftq(W, quant, 16, 1.0, iters=3)
    assert res.errors[-1] < 0.85 * res.errors[0]
    assert torch.equal(res.W_hat, res.q.dequantize())  # Ŵ is what the kept NF4Linear stores


# ------------------------------------------------------------------ model level


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method,bits", [("loftq", 2), ("loftq", 3), ("loftq-nf4", 4)])
def test_model_closer_to_fp_than_plain_quantization(method, bits):
    from qtool.methods import quantize_model
    from qtool.nn.lora import lora_layers

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny_llama(), ids)
    plain = tiny_llama()
    quantize_model(plain, QuantSpec(bits, 32), "nf4" if method == "loftq-nf4" else "rtn", quiet=True)
    model = tiny_llama()
    stats = quantize_model(model, QuantSpec(bits, 32), method, quiet=True, lora_rank=16, loftq_iters=2)
    assert len(lora_layers(model)) == 14
    assert stats["weight_rel_error_loftq"] < stats["weight_rel_error_quant"]
    assert _rel(_logits(model, ids), ref) < 0.9 * _rel(_logits(plain, ids), ref)


def test_zero_iterations_model_equals_rtn():
    from qtool.methods import quantize_model

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    plain = tiny_llama()
    quantize_model(plain, QuantSpec(3, 32), "rtn", quiet=True)
    model = tiny_llama()
    quantize_model(model, QuantSpec(3, 32), "loftq", quiet=True, lora_rank=8, loftq_iters=0)
    assert torch.equal(_logits(model, ids), _logits(plain, ids))  # PEFT default init: B = 0


def test_cli_writes_checkpoint_and_peft_sidecar(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qtool.artifact.adapter import read_adapter
    from qtool.artifact.checkpoint import load_checkpoint
    from qtool.nn.lora import set_lora_tensors, wrap_modules

    out, out_rtn = tmp_path / "loftq", tmp_path / "rtn"
    code, stdout, err = run_cli(capsys, "quantize", "--method", "loftq", "--bits", "2", "-g", "32", "--rank", "16",
                                "--alpha", "16", "--loftq-iters", "3", "--model", tiny_model_dir, "-o", out, "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--bits", "2", "-g", "32",
                           "--model", tiny_model_dir, "-o", out_rtn, "-q")
    assert code == 0, err
    info = json.loads((out / "qtool.json").read_text())
    assert info["method"] == "loftq" and info["stats"]["loftq_iters"] == 3
    assert {m["kind"] for m in info["modules"].values()} == {"int"}
    adapter = read_adapter(out / "adapter")
    assert adapter.base_fingerprint == info["fingerprint"]
    assert adapter.meta["qtool.init"] == "loftq" and adapter.meta["qtool.loftq_iters"] == "3"
    assert (adapter.spec.rank, adapter.spec.alpha) == (16, 16.0)
    assert set(adapter.tensors) == set(info["modules"])
    assert "adapter" not in json.dumps(info["files"])  # the sidecar leaves the checkpoint's files alone

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    fp = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    ref = _logits(fp, ids)
    ck = load_checkpoint(out, with_tokenizer=False)
    wrapped = wrap_modules(ck.model, sorted(adapter.tensors), adapter.spec.rank, adapter.spec.alpha)
    set_lora_tensors(wrapped, adapter.tensors)
    ours = _logits(ck.model, ids)
    rtn = _logits(load_checkpoint(out_rtn, with_tokenizer=False).model, ids)
    assert _rel(ours, ref) < 0.9 * _rel(rtn, ref)

    # PEFT reads the sidecar as is: on a dense copy whose Linear weights are the checkpoint's Ŵ it
    # computes the same function as qtool's QuantLinear + LoraLinear.
    peft = pytest.importorskip("peft")
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, layer in wrapped.items():
            dense.get_submodule(name).weight.copy_(layer.base.dense_weight())
    peft_model = peft.PeftModel.from_pretrained(dense, str(out / "adapter")).eval()
    assert torch.allclose(_logits(peft_model, ids), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--loftq-iters", "-1"], "--loftq-iters must be ≥ 0"),
    (["--rank", "0"], "--rank must be ≥ 1"),
    (["--alpha", "0"], "--alpha must be > 0"),
])
def test_cli_bad_values(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "quantize", "--method", "loftq", *args, "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_rank_larger_than_a_layer(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "quantize", "--method", "loftq", "--rank", "64", "--model", tiny_model_dir,
                           "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert "exceeds min(out, in) = 48" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
