"""Uniform integer grid (METHODS.md §1)."""

import pytest
import torch

from qtool.errors import QtoolError
from qtool.quant.grid import QuantSpec, choose_qparams, dequantize, quantize, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_within_half_step(bits, group, symmetric):
    torch.manual_seed(bits)
    W = torch.randn(24, 576)  # 576 = 4.5 groups of 128: the last group is short
    spec = QuantSpec(bits, group, symmetric)
    qw = rtn(W, spec, torch.float32)
    assert qw.codes.max() <= 2**bits - 1
    W_hat = dequantize(qw.codes, qw.scale, qw.zero, group)
    g = 576 if group is None else group
    step = qw.scale.float().repeat_interleave(g, 1)[:, :576]
    # RTN never errs by more than half a step inside the representable range.
    assert ((W - W_hat).abs() <= step / 2 + 1e-6).all()


def test_asymmetric_formula_matches_spec():
    W = torch.tensor([[-1.0, 0.6, 2.0, 0.0]])
    spec = QuantSpec(2, None)
    s, z = choose_qparams(W, spec)
    assert torch.allclose(s, torch.tensor([[1.0]]))  # (2 − (−1)) / 3
    assert z.item() == 1  # round(1 / 1)
    q = quantize(W, s, z, spec)
    assert q.tolist() == [[0, 2, 3, 1]]  # round(W/s) + z, clamped


def test_symmetric_zero_point_is_midpoint():
    spec = QuantSpec(4, 32, symmetric=True)
    s, z = choose_qparams(torch.randn(3, 64), spec)
    assert (z == 8).all()


def test_padded_last_group_uses_only_real_columns():
    # The last group (columns 128..191 of K=192, g=128) must get its own range, not one
    # diluted by padding beyond a zero that is always in range anyway.
    W = torch.zeros(1, 192)
    W[0, 128:] = torch.linspace(0.0, 0.01, 64)
    W[0, :128] = torch.linspace(-5.0, 5.0, 128)
    s, _ = choose_qparams(W, QuantSpec(4, 128))
    assert s.shape == (1, 2)
    assert s[0, 1] == pytest.approx(0.01 / 15, rel=1e-5)


def test_constant_group_has_positive_scale():
    s, z = choose_qparams(torch.zeros(2, 64), QuantSpec(3, 32))
    assert (s > 0).all()
    q = quantize(torch.zeros(2, 64), s, z, QuantSpec(3, 32))
    assert torch.equal(dequantize(q, s, z, 32), torch.zeros(2, 64))


@pytest.mark.parametrize("bad", [{"bits": 5}, {"bits": 4, "group_size": 100}])
def test_bad_spec_is_a_user_error(bad):
    with pytest.raises(QtoolError):
        QuantSpec(**bad)
