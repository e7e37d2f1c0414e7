"""swap-scales on disk and load_scales in memory: bit-exact round trips, validation, atomicity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from peqa_util import saved_tiny_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from qtool import swap
from qtool.artifact import safetensors_io as st
from qtool.artifact.checkpoint import load_checkpoint, read_manifest
from qtool.artifact.delta import expected_shape, read_delta, save_delta
from qtool.artifact.scales import apply_delta, remove_delta
from qtool.errors import QtoolError
from qtool.nn.replace import quant_linears


def snapshot(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def random_delta(info: dict, path: Path, seed: int, task: str = "t", scale: float = 5e-4) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: scale * torch.randn(expected_shape(e), generator=gen) for n, e in info["modules"].items()}
    save_delta(path, tensors, info, task=task, steps=1, lr=1e-5, seed=seed, metric_name="loss", metric=1.0)
    return path


def scales_of(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "scales.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def ckpt(tmp_path) -> tuple[Path, dict]:
    d = tmp_path / "ck"
    info = saved_tiny_checkpoint(d, 4, None)
    return d, info


def test_swap_and_revert_in_place_bit_exact(ckpt, tmp_path):
    d, info = ckpt
    before = snapshot(d)
    a = random_delta(info, tmp_path / "a.safetensors", 1, "task-a")
    b = random_delta(info, tmp_path / "b.safetensors", 2, "task-b")
    rep = swap.swap_scales_dir(d, a)
    assert rep.task == "task-a" and rep.seconds < 5
    s0 = read_base_scales(before, d)
    da = read_delta(a)
    got = scales_of(d)
    for name in info["modules"]:
        assert torch.equal(got[f"{name}.scales"], swap.combine_scales(s0[f"{name}.scales"], da.tensors[name]))
    assert read_manifest(d)["scale_delta"]["task"] == "task-a"
    load_checkpoint(d)  # still verifies (sha256 of every file) and loads
    swap.swap_scales_dir(d, b)  # A -> B starts from the base, not from A's scales
    db = read_delta(b)
    got = scales_of(d)
    for name in info["modules"]:
        assert torch.equal(got[f"{name}.scales"], swap.combine_scales(s0[f"{name}.scales"], db.tensors[name]))
    swap.restore_base_dir(d)
    assert snapshot(d) == before  # every file, qtool.json included, back to its original bytes
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".ck")]  # no staging left behind


def read_base_scales(before: dict, d: Path) -> dict[str, torch.Tensor]:
    """The base scales, from base_scales.safetensors (byte-identical to the original file)."""
    digest = hashlib.sha256((d / "base_scales.safetensors").read_bytes()).hexdigest()
    assert digest == before["scales.safetensors"]
    with safe_open(str(d / "base_scales.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_swap_to_new_dir_hardlinks_codes(ckpt, tmp_path):
    d, info = ckpt
    before = snapshot(d)
    a = random_delta(info, tmp_path / "a.safetensors", 1)
    out = tmp_path / "ck-a"
    rep = swap.swap_scales_dir(d, a, out)
    assert snapshot(d) == before  # the source is untouched
    assert os.stat(out / "model.safetensors").st_ino == os.stat(d / "model.safetensors").st_ino
    assert rep.linked >= 4 and rep.copied == 0
    with pytest.raises(QtoolError, match="exists"):
        swap.swap_scales_dir(d, a, out)
    # the swapped directory and an in-memory load_scales give the same scales and outputs
    on_disk = load_checkpoint(out).model
    ck = load_checkpoint(d)
    swap.install_scale_api(ck.model, ck.info, d)
    ck.model.load_scales(a)
    x = torch.randint(0, 256, (1, 12))
    for name, layer in quant_linears(ck.model).items():
        assert torch.equal(layer.scales, quant_linears(on_disk)[name].scales)
    with torch.no_grad():
        assert torch.equal(ck.model(x).logits, on_disk(x).logits)
    # and the new directory reverts to the base too
    swap.restore_base_dir(out)
    assert snapshot(out) == before


def test_in_memory_task_switch_and_restore(ckpt, tmp_path):
    d, info = ckpt
    a = random_delta(info, tmp_path / "a.safetensors", 1)
    b = random_delta(info, tmp_path / "b.safetensors", 2)
    ck = load_checkpoint(d)
    model = ck.model
    codes = {n: m.qweight.clone() for n, m in quant_linears(model).items()}
    base = {n: m.scales.clone() for n, m in quant_linears(model).items()}
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        y0 = model(x).logits
        apply_delta(model, a, ck.info)
        ya = model(x).logits
        apply_delta(model, b, ck.info)
        yb = model(x).logits
        apply_delta(model, a, ck.info)
        assert torch.equal(model(x).logits, ya)  # switching back is exact: always s0 + Δs
        remove_delta(model)
        assert torch.equal(model(x).logits, y0)
    assert not torch.equal(ya, y0) and not torch.equal(ya, yb)
    for n, m in quant_linears(model).items():
        assert torch.equal(m.qweight, codes[n]) and torch.equal(m.scales, base[n])


def test_loading_a_swapped_checkpoint_finds_base_scales(ckpt, tmp_path):
    d, info = ckpt
    a = random_delta(info, tmp_path / "a.safetensors", 1)
    b = random_delta(info, tmp_path / "b.safetensors", 2)
    ref = load_checkpoint(d)
    apply_delta(ref.model, b, ref.info)
    swap.swap_scales_dir(d, a)
    ck = load_checkpoint(d)
    apply_delta(ck.model, b, ck.info, checkpoint_dir=d)  # B on a dir holding A: from the base, not A
    for n, m in quant_linears(ck.model).items():
        assert torch.equal(m.scales, quant_linears(ref.model)[n].scales)


def test_refuses_delta_for_another_base(ckpt, tmp_path):
    d, info = ckpt
    other = saved_tiny_checkpoint(tmp_path / "other", 4, None, seed=5)
    foreign = random_delta(other, tmp_path / "foreign.safetensors", 1, "foreign-task")
    before = snapshot(d)
    with pytest.raises(QtoolError, match=r"foreign\.safetensors was trained on base .*foreign-task"):
        swap.swap_scales_dir(d, foreign)
    assert snapshot(d) == before
    ck = load_checkpoint(d)
    with pytest.raises(QtoolError, match="trained on base"):
        apply_delta(ck.model, foreign, ck.info)


def test_refuses_wrong_names_shapes_dtypes(ckpt, tmp_path):
    d, info = ckpt
    good = read_delta(random_delta(info, tmp_path / "a.safetensors", 1))
    name = sorted(info["modules"])[0]
    cases = {
        "missing": ({k: v for k, v in good.tensors.items() if k != name}, f"no Δs for module {name}"),
        "extra": ({**good.tensors, "model.layers.9.mlp.up_proj": torch.zeros(3, 1)}, "does not quantize"),
        "shape": ({**good.tensors, name: torch.zeros(3, 2)}, f"{name} has shape"),
        "dtype": ({**good.tensors, name: good.tensors[name].half()}, f"{name} is float16, expected float32"),
        "nan": ({**good.tensors, name: torch.full_like(good.tensors[name], float("nan"))}, "NaN"),
    }
    before = snapshot(d)
    for case, (tensors, msg) in cases.items():
        p = tmp_path / f"{case}.safetensors"
        save_file(tensors, str(p), metadata=st.seal_metadata(good.meta))
        st.seal(p)  # a well-formed file whose content is wrong, not a damaged one
        with pytest.raises(QtoolError, match=msg):
            swap.swap_scales_dir(d, p)
    assert snapshot(d) == before
    p = tmp_path / "notdelta.safetensors"
    save_file({"x": torch.zeros(1)}, str(p), metadata={"format": "pt"})
    with pytest.raises(QtoolError, match="not a qtool scale-delta"):
        swap.swap_scales_dir(d, p)


def test_failed_swap_leaves_directory_untouched(ckpt, tmp_path, monkeypatch):
    d, info = ckpt
    a = random_delta(info, tmp_path / "a.safetensors", 1)
    before = snapshot(d)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(swap, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        swap.swap_scales_dir(d, a)
    assert snapshot(d) == before
    assert sorted(p.name for p in d.parent.iterdir()) == ["a.safetensors", "ck"]


def test_base_without_swap_is_an_error(ckpt):
    d, _ = ckpt
    with pytest.raises(QtoolError, match="already has its base scales"):
        swap.restore_base_dir(d)


def test_exchange_fallback_without_renameat2(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    monkeypatch.setattr(swap.ctypes.util, "find_library", lambda name: None)
    swap._exchange(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


def test_cli_swap_and_base(ckpt, tmp_path):
    from typer.testing import CliRunner

    from qtool.cli.app import app

    d, info = ckpt
    before = snapshot(d)
    a = random_delta(info, tmp_path / "a.safetensors", 1, "task-a")
    r = CliRunner().invoke(app, ["swap-scales", str(d), str(a)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())  # rich wraps lines at the terminal width
    assert "swapped in task 'task-a' in" in out and " s (5 files hard-linked" in out
    r = CliRunner().invoke(app, ["swap-scales", str(d), "--base"])
    assert r.exit_code == 0 and "restored the base scales" in " ".join(r.output.split())
    assert snapshot(d) == before
    r = CliRunner().invoke(app, ["swap-scales", str(d)])
    assert isinstance(r.exception, QtoolError) and "either a Δs file or --base" in str(r.exception)
