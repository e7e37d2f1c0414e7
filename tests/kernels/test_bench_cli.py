"""`qtool bench` CLI: thin parsing over qtool.bench (the library call is patched)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qtool.bench import kernels as kb
from qtool.cli.bench import app
from qtool.errors import QtoolError


def test_kernels_passes_parsed_options(monkeypatch) -> None:
    seen = {}

    def fake_run(shapes, Ms, bits_list, groups, dtype, tile_major):
        seen.update(shapes=shapes, Ms=Ms, bits=bits_list, groups=groups, dtype=dtype, tile_major=tile_major)
        return kb.KernelReport("gpu", "t", "tr", 3000.0, [])

    monkeypatch.setattr(kb, "run", fake_run)
    res = CliRunner().invoke(app, ["kernels", "--shapes", "7B.qo", "--m", "1,16", "--bits", "4",
                                   "--groups", "128,ch", "--dtype", "bf16", "--json"])
    assert res.exit_code == 0, res.output
    assert seen == {"shapes": ["7B.qo"], "Ms": (1, 16), "bits": (4,), "groups": (128, None),
                    "dtype": torch.bfloat16, "tile_major": True}
    assert '"copy_gbps": 3000.0' in res.output
    res = CliRunner().invoke(app, ["kernels", "--shapes", "7B.qo", "--row-major", "--json"])
    assert res.exit_code == 0, res.output
    assert seen["tile_major"] is False


def test_unknown_shape_is_a_user_error() -> None:
    res = CliRunner().invoke(app, ["kernels", "--shapes", "nope"])
    assert isinstance(res.exception, QtoolError)


def test_train_not_implemented() -> None:
    res = CliRunner().invoke(app, ["train"])
    assert isinstance(res.exception, QtoolError)


def test_kernels_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(QtoolError):
        kb.run(["7B.qo"], (1,), (4,), (128,))


def test_nf4_weight_bytes() -> None:
    # 0.5 B per weight + 1 B per block of 64 + fp32 per 256 blocks + the fp32 mean.
    N, K = 256, 512
    n_blocks = N * K // 64
    layer = kb.random_nf4_layer(N, K, device="cpu")
    assert kb._layer_bytes(layer) == N * K // 2 + n_blocks + 4 * -(-n_blocks // 256) + 4


def test_decode_passes_layout(monkeypatch) -> None:
    from qtool.bench import decode as db

    seen = {}

    def fake_run(model, bits, g, batches, new_tokens, layers, tile_major, compile, fuse, attention):
        seen.update(model=model, bits=bits, g=g, batches=batches, tile_major=tile_major, compile=compile, fuse=fuse,
                    attention=attention)
        return {"model": model, "gpu": "g", "bits": bits, "group_size": g, "tile_major_layers": 0, "rows": []}

    monkeypatch.setattr(db, "run", fake_run)
    res = CliRunner().invoke(app, ["decode", "--bits", "3", "--group-size", "64", "--batch", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert seen == {"model": "synthetic-7b", "bits": 3, "g": 64, "batches": (1,), "tile_major": True,
                    "compile": True, "fuse": True, "attention": "split-kv"}
    res = CliRunner().invoke(app, ["decode", "--row-major", "--no-compile", "--no-fuse", "--attention", "sdpa"])
    assert res.exit_code == 0, res.output
    assert seen["tile_major"] is False and seen["compile"] is False and seen["fuse"] is False
    assert seen["attention"] == "sdpa"
