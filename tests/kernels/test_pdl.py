"""kernels/pdl.py's switch: QTOOL_PDL, on Hopper or later only, never on the CPU."""

from __future__ import annotations

import torch
from qtool_kernels import pdl


def test_pdl_mode(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("QTOOL_PDL", raising=False)
    assert pdl.pdl_mode(cuda) == 2  # the default
    for env, want in [("0", 0), ("1", 1), ("3", 3), ("", 0)]:
        monkeypatch.setenv("QTOOL_PDL", env)
        assert pdl.pdl_mode(cuda) == want
    assert pdl.pdl_mode(torch.device("cpu")) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100: no PDL
    assert pdl.pdl_mode(cuda) == 0
