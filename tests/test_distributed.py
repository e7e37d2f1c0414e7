"""Data parallelism on CPU (gloo): two processes started by accelerate's launcher against one.

One launch runs every scenario of tests/dist_worker.py (process start costs seconds); the
one-process references run here meanwhile. docs/distributed.md describes what is checked.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import dist_worker as w
import pytest
import torch
from cli_util import run_cli
from peqa_util import saved_tiny_checkpoint
from safetensors.torch import load_file

from qtool.cli import launch

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process outputs, one-process references, one-process GPTQ result, one-process PEQA step)."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    w.interrupted_peqa(two / "cut1.safetensors")  # a one-process state for the two processes to resume
    cmd = launch.launch_command(2, [])[:-2] + [str(TESTS / "dist_worker.py"), str(two)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        w.peqa(one / "peqa.safetensors")
        w.lora(one / "lora", "lora")
        w.lora(one / "qlora", "qlora")
        gptq = w.gptq_hessians(w.CALIB)
        fsdp = w.fsdp_peqa_grads(shard=False)[0]
    finally:
        log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    return two, one, gptq, fsdp


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


def test_two_processes_train_what_one_does(runs):
    # Exact equality, measured: each process holds one of the one-process run's two
    # micro-batches (same sequences, same shapes), and the all-reduce adds the same two fp32
    # gradients that backward accumulated in one process (a + b = b + a). With more than two
    # shares the summation order would differ and equality would hold to fp32 rounding only.
    two, one, _, _ = runs
    _assert_same(load_file(two / "peqa.safetensors"), load_file(one / "peqa.safetensors"))
    for m in ("lora", "qlora"):
        _assert_same(load_file(two / m / "adapter_model.safetensors"), load_file(one / m / "adapter_model.safetensors"))


def test_only_rank_0_writes(runs):
    two, _, _, _ = runs
    r0, r1 = (json.loads((two / f"writes.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r1["replaced"] == []
    assert set(r0["replaced"]) == {"peqa.train/state.safetensors", "peqa.safetensors", "lora.train/state.safetensors",
                                  "lora", "qlora.train/state.safetensors", "qlora", "cut2.train/state.safetensors",
                                  "cut1.train/state.safetensors", "from1.safetensors",
                                  "peqa-fsdp.train/state.safetensors", "peqa-fsdp.safetensors",
                                  "qlora-fsdp.train/state.safetensors", "qlora-fsdp", "cut2f.train/state.safetensors",
                                  "from1f.safetensors"}
    assert not [p for p in two.rglob("*") if p.name.startswith(".")]  # no temp file left behind


def test_killed_run_resumes_with_another_process_count(runs, tmp_path):
    two, one, _, _ = runs
    straight = load_file(one / "peqa.safetensors")
    _assert_same(load_file(two / "from1.safetensors"), straight)  # killed with 1 process, finished with 2
    w.peqa(tmp_path / "from2.safetensors", state_dir=two / "cut2.train", resume=True)
    _assert_same(load_file(tmp_path / "from2.safetensors"), straight)  # killed with 2, finished with 1


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
        assert err <= rtol, (k, err)


def test_fsdp_training_matches_one_process(runs, tmp_path):
    # Not bit for bit: the gradient-norm clip sums the shards' squared norms in another order, so
    # the clip factor, and through AdamW each update, differs in the last bits. Measured (4 steps):
    # 5.7e-7 (PEQA) and 0 (QLoRA) of the largest value; bound 1e-5.
    two, one, _, _ = runs
    straight = load_file(one / "peqa.safetensors")
    _assert_close(load_file(two / "peqa-fsdp.safetensors"), straight, 1e-5)
    _assert_close(load_file(two / "qlora-fsdp" / "adapter_model.safetensors"),
                  load_file(one / "qlora" / "adapter_model.safetensors"), 1e-5)
    # a one-process state is sharded on resume (killed with 1 process, finished by 2 under FSDP)
    _assert_close(load_file(two / "from1f.safetensors"), straight, 1e-5)
    # the training state holds whole values (gathered from the shards): one process resumes it
    w.peqa(tmp_path / "from2f.safetensors", state_dir=two / "cut2f.train", resume=True)
    _assert_close(load_file(tmp_path / "from2f.safetensors"), straight, 1e-5)


def test_gptq_hessians_shared_by_two_processes(runs):
    two, _, (Hs, state), _ = runs
    H0, H1 = (load_file(two / f"hessians.rank{r}.safetensors") for r in (0, 1))
    assert H0.keys() == Hs.keys() and len(Hs) == 8  # 2 blocks × 4 input groups
    for k in Hs:
        assert torch.equal(H0[k], H1[k])  # every process solves the same H
        # fp32 summation order: one running mean over 6 windows vs two means of 3 merged;
        # measured 1.7e-7 of the largest entry (about one fp32 ulp), bound 1e-6.
        err = (H0[k] - Hs[k]).abs().max() / Hs[k].abs().max()
        assert err < 1e-6, (k, err)
    _assert_same(load_file(two / "gptq.rank0.safetensors"), load_file(two / "gptq.rank1.safetensors"))
    _assert_same(load_file(two / "gptq.rank0.safetensors"), state)


def test_apiq_bw_trains_data_parallel(runs):
    # Each step averages the gradients of one window per process, so two processes take half
    # the steps per epoch of one; the loss is not the one-process loss (docs/distributed.md).
    two, _, _, _ = runs
    _assert_same(load_file(two / "apiq.rank0.safetensors"), load_file(two / "apiq.rank1.safetensors"))
    losses = json.loads((two / "writes.rank0.json").read_text())["apiq"]
    assert len(losses) == 2 and all(after < 0.9 * before for before, after in losses), losses


def test_fsdp_shards_packed_weights_and_computes_the_same_step(runs):
    two, _, _, ref = runs
    held = json.loads((two / "writes.rank0.json").read_text())["fsdp_held"]
    assert 0.45 < held < 0.55  # each of two processes keeps about half the packed bytes
    for r in (0, 1):
        got = load_file(two / f"fsdp.rank{r}.safetensors")
        # Exact, measured: the gathered bytes are the packed weights bit for bit, so forward is
        # the unsharded one; both processes see the same input, and FSDP's mean of two equal
        # fp32 gradients, (g + g) / 2, is g.
        _assert_same(got, ref)


def test_launch_command_passes_the_command_on():
    cmd = launch.launch_command(4, ["finetune", "ck", "--num-processes", "4", "--batch-size", "8",
                                    "--num-processes=4", "-o", "x.safetensors"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[cmd.index("qtool") - 1:] == ["-m", "qtool", "finetune", "ck", "--batch-size", "8", "-o",
                                            "x.safetensors"]


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ck"
    saved_tiny_checkpoint(d, 4, 32)
    return d


def test_finetune_num_processes_relaunches(ckpt, tmp_path, capsys, monkeypatch):
    got = {}

    def fake(n, argv):
        got.update(n=n, argv=argv)
        return 0

    monkeypatch.setattr(launch, "relaunch", fake)
    code, _, err = run_cli(capsys, "finetune", ckpt, "--task", "bbc-news", "--num-processes", 2, "--batch-size", 4,
                           "--device", "cpu")
    assert code == 0, err  # the launcher's exit code
    assert got["n"] == 2 and got["argv"][:2] == ["finetune", str(ckpt)]


@pytest.mark.parametrize("args, message", [
    (["--num-processes", 3, "--batch-size", 4], "does not divide the global batch of 4"),
    (["--num-processes", 0], "must be ≥ 1"),
    (["--fsdp"], "--fsdp shards the model over several processes"),
    (["--fsdp", "--num-processes", 2, "--batch-size", 2, "--optim", "paged_adamw"], "--optim adamw only"),
    (["--fsdp", "--num-processes", 2, "--batch-size", 2, "--method", "lora", "--dora"], "does not support --dora"),
])
def test_finetune_num_processes_refusals(ckpt, capsys, args, message):
    code, _, err = run_cli(capsys, "finetune", ckpt, "--task", "bbc-news", "--device", "cpu", *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_input_is_refused_before_the_processes_start(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(launch, "relaunch", lambda n, argv: started.append(n) or 1)
    code, _, err = run_cli(capsys, "finetune", tmp_path / "missing", "--task", "bbc-news", "--num-processes", 2,
                           "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "not found" in err and not started, err


def test_more_processes_than_gpus_is_refused(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = run_cli(capsys, "finetune", ckpt, "--task", "bbc-news", "--num-processes", 4, "--device", "auto")
    assert code == 2 and err.count("\n") == 1 and "only 2 CUDA GPU(s)" in err, err


def test_python_m_qtool_is_the_cli(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qtool", "finetune", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("qtool", run_name="__main__")
    assert e.value.code == 0 and "--num-processes" in capsys.readouterr().out
