"""GPTQ on one layer: lower output error than RTN on correlated inputs; damping; act-order."""

import pytest
import torch

from qtool.errors import QtoolError
from qtool.quant.gptq import accumulate_hessian, gptq, inverse_cholesky
from qtool.quant.grid import QuantSpec, dequantize, rtn


def _layer(seed=0, N=64, K=256, T=2048):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) / K**0.5
    X = torch.randn(T, K, generator=gen) @ mix + 0.05 * torch.randn(T, K, generator=gen)  # correlated
    W = torch.randn(N, K, generator=gen)
    H, _ = accumulate_hessian(torch.zeros(K, K), 0, X)
    return W, X, H


def _out_err(W, W_hat, X):
    return ((X @ (W - W_hat).T) ** 2).mean().item()


@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(3, 64), QuantSpec(2, 64), QuantSpec(4, None),
                                  QuantSpec(4, 32, True)])
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    W, X, H = _layer()
    r = rtn(W, spec)
    q, stats = gptq(W, H, spec)
    e_rtn = _out_err(W, dequantize(r.codes, r.scale, r.zero, spec.group_size), X)
    e_gptq = _out_err(W, dequantize(q.codes, q.scale, q.zero, spec.group_size), X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert stats["damp"] == 0.01


def test_act_order_permutes_columns_consistently():
    W, X, H = _layer(1, K=192)  # K not a multiple of 128: a short last group
    spec = QuantSpec(4, 64)
    q, _ = gptq(W, H, spec, act_order=True)
    assert q.perm is not None and sorted(q.perm.tolist()) == list(range(192))
    W_hat_perm = dequantize(q.codes, q.scale, q.zero, 64)
    W_hat = W_hat_perm[:, torch.argsort(q.perm)]
    r = rtn(W, spec)
    assert _out_err(W, W_hat, X) < _out_err(W, dequantize(r.codes, r.scale, r.zero, 64), X)
    # forward with permuted inputs equals forward with un-permuted weights
    x = torch.randn(3, 192)
    assert torch.allclose(x[:, q.perm] @ W_hat_perm.T, x @ W_hat.T, atol=1e-4)


def test_damping_rises_when_cholesky_fails():
    K = 16
    v = torch.randn(K, 1)
    H = v @ v.T - 0.1 * torch.eye(K)  # indefinite: 1% of mean(diag) damping cannot fix it
    _, damp = inverse_cholesky(H, 0.01)
    assert damp > 0.01


def test_hopeless_hessian_is_a_clear_error():
    H = -torch.eye(8)
    with pytest.raises(QtoolError, match="not positive definite"):
        inverse_cholesky(H, 0.01, max_tries=2)


def test_dead_inputs_get_zero_weight():
    W, X, H = _layer(2, K=128)
    H[5, :] = 0
    H[:, 5] = 0
    q, _ = gptq(W, H, QuantSpec(4, 128))
    assert dequantize(q.codes, q.scale, q.zero, 128)[:, 5].abs().max() < 1e-6
