"""Writes that survive a kill, a concurrent writer and a full disk.

Each write runs in a forked child (the parent has already paid for the imports), which is
SIGKILLed either at a chosen write step (every os.replace / link / mkdir / fsync / unlink /
rmtree / safetensors save / file open for writing, before and after it) or after a random
delay. After each kill the previous artifact must still load (with every sha256 verified),
or the new one must be complete; nothing but hidden, pid-named temporaries may be left beside
it, and the next write removes those. QTOOL_KILL_SEED reproduces the random choices.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peqa_util import quantized_tiny, saved_tiny_checkpoint

from qtool import swap
from qtool.artifact import adapter as adapter_mod
from qtool.artifact import checkpoint as checkpoint_mod
from qtool.artifact import delta as delta_mod
from qtool.artifact.checkpoint import load_checkpoint, save_checkpoint
from qtool.artifact.delta import expected_shape, save_delta
from qtool.train import state as state_mod
from qtool.train.state import TrainState, load_state, save_state

SEED = int(os.environ.get("QTOOL_KILL_SEED", random.SystemRandom().randrange(1 << 31)))
CHILD_SECONDS = 120
STALE = re.compile(r"\.[^/]+\.((tmp|old|swap)-\d+-.*|\d+\..*\.tmp)")


def _hook_writes(kill_at: int | None, counter: list[int]) -> None:
    """In the child: count write steps, SIGKILL ourselves at step `kill_at`."""
    def step() -> None:
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name: str, writes=lambda *a, **k: True) -> None:
        orig = getattr(owner, name)

        def hooked(*args, **kwargs):
            if not writes(*args, **kwargs):
                return orig(*args, **kwargs)
            step()
            result = orig(*args, **kwargs)
            step()
            return result

        setattr(owner, name, hooked)

    for name in ("replace", "rename", "link", "mkdir", "fsync", "unlink"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    wrap(builtins, "open", lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    for mod in (safetensors.torch, checkpoint_mod, delta_mod, adapter_mod, state_mod, swap):
        if hasattr(mod, "save_file"):
            wrap(mod, "save_file")


def in_child(fn, kill_at: int | None = None, delay: float | None = None, env: dict | None = None,
             fsize: int | None = None, stderr: Path | None = None) -> tuple[int, str]:
    """Run fn() in a forked child. Returns (exit status or -signal, what the child reported)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.environ.update(env or {})
            if stderr is not None:
                sys.stderr = open(stderr, "w")  # noqa: SIM115 (the child exits without closing)
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            counter = [0]
            _hook_writes(kill_at, counter)
            fn()
            os.write(w, f"steps {counter[0]}".encode())
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            os.write(w, f"{type(e).__name__}: {e}".encode()[:4000])
            code = 3
        finally:
            if stderr is not None:
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + CHILD_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # a hung child fails the test instead of the suite
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child over {CHILD_SECONDS} s")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode(errors="replace")
    return (os.waitstatus_to_exitcode(status), said)


def _steps(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    code, said = in_child(fn)
    assert code == 0 and said.startswith("steps"), said
    return int(said.split()[1]), time.perf_counter() - t0


def _kill_points(n_steps: int, duration: float, rng: random.Random, n_steps_sample: int, n_random: int):
    steps = sorted(rng.sample(range(1, n_steps + 1), min(n_steps, n_steps_sample)))
    return [("step", s, None) for s in steps] + [("delay", None, rng.uniform(0, duration)) for _ in range(n_random)]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _only_stale_temporaries(path: Path, others: set[str]) -> None:
    left = [n for n in _siblings(path) if n not in others]
    assert all(STALE.fullmatch(n) and n.startswith(f".{path.name}.") for n in left), left


@pytest.fixture
def rng() -> random.Random:
    print(f"kill seed {SEED} (QTOOL_KILL_SEED={SEED} reproduces it)")
    return random.Random(SEED)


def test_killed_checkpoint_overwrite_keeps_old_or_new(tmp_path, rng):
    """quantize --overwrite (save_checkpoint into an existing directory) killed anywhere."""
    out = tmp_path / "ck"
    old = saved_tiny_checkpoint(out, 4, None, seed=0)["fingerprint"]
    model, tok, _ = quantized_tiny(4, None, seed=1)
    from qtool.artifact.checkpoint import base_fingerprint

    new = base_fingerprint(model)

    def write() -> None:
        save_checkpoint(model, tok, {"method": "rtn", "bits": 4, "group_size": None}, out, overwrite=True)

    n, seconds = _steps(write)
    shutil.rmtree(out)
    saved_tiny_checkpoint(out, 4, None, seed=0)
    outcomes = {"old": 0, "new": 0}
    for _how, step, delay in _kill_points(n, seconds, rng, 10, 5):
        in_child(write, kill_at=step, delay=delay)
        fp = load_checkpoint(out, with_tokenizer=False).info["fingerprint"]  # verifies every sha256
        assert fp in (old, new), (step, delay)
        outcomes["old" if fp == old else "new"] += 1
        _only_stale_temporaries(out, set())
    assert outcomes["old"] > 0  # kills did land mid-write
    write()  # the next write removes what killed writers left
    assert _siblings(out) == []
    print(f"checkpoint overwrite: {n} write steps; after kills {outcomes}")


def test_killed_swap_scales_keeps_old_or_new(tmp_path, rng):
    ck = tmp_path / "ck"
    info = saved_tiny_checkpoint(ck, 4, None)
    gen = torch.Generator().manual_seed(0)
    d = tmp_path / "t.safetensors"
    save_delta(d, {n: 1e-3 * torch.randn(expected_shape(e), generator=gen) for n, e in info["modules"].items()},
               info, task="t", steps=1, lr=1e-5, seed=0, metric_name="loss", metric=1.0)
    n, seconds = _steps(lambda: swap.swap_scales_dir(ck, d))
    swap.restore_base_dir(ck)
    outcomes = {"base": 0, "task": 0}
    for _how, step, delay in _kill_points(n, seconds, rng, 10, 5):
        in_child(lambda: swap.swap_scales_dir(ck, d), kill_at=step, delay=delay)
        ckpt = load_checkpoint(ck, with_tokenizer=False)
        applied = ckpt.info.get("scale_delta")
        outcomes["task" if applied else "base"] += 1
        _only_stale_temporaries(ck, {"t.safetensors"})
        if applied:
            swap.restore_base_dir(ck)
    assert outcomes["base"] > 0
    swap.swap_scales_dir(ck, d)
    assert _siblings(ck) == ["t.safetensors"]
    print(f"swap-scales: {n} write steps; after kills {outcomes}")


def test_killed_state_save_keeps_old_or_new(tmp_path, rng):
    path = tmp_path / "state.safetensors"
    params = {"p": torch.randn(64, 64)}

    def state(step: int) -> TrainState:
        return TrainState(step, {k: v + step for k, v in params.items()}, None, {}, torch.get_rng_state(), [],
                          {"lr": 1.0}, [], None, step, float(step))

    save_state(path, state(1))
    n, seconds = _steps(lambda: save_state(path, state(2)))
    save_state(path, state(1))
    seen = set()
    for _how, step, delay in _kill_points(n, seconds, rng, n, 4):
        in_child(lambda: save_state(path, state(2)), kill_at=step, delay=delay)
        got = load_state(path, ["p"])
        assert got.step in (1, 2) and torch.equal(got.params["p"], params["p"] + got.step)
        seen.add(got.step)
        _only_stale_temporaries(path, set())
        save_state(path, state(1)) if got.step == 2 else None
    assert 1 in seen
    save_state(path, state(3))
    assert _siblings(path) == []


def _wait_for(log: Path, line: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not (log.exists() and line in log.read_text().splitlines()):
        assert time.monotonic() < deadline, f"no {line!r} in {limit} s"
        time.sleep(0.02)


def test_concurrent_swaps_never_interleave(tmp_path):
    ck = tmp_path / "ck"
    info = saved_tiny_checkpoint(ck, 4, None)
    deltas = []
    for i, task in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(i)
        p = tmp_path / f"{task}.safetensors"
        save_delta(p, {n: 1e-3 * torch.randn(expected_shape(e), generator=gen) for n, e in info["modules"].items()},
                   info, task=task, steps=1, lr=1e-5, seed=i, metric_name="loss", metric=1.0)
        deltas.append(p)
    log = tmp_path / "log"
    release = tmp_path / "release"

    def slow_swap(delta: Path, tag: str, hold: float):
        def run() -> None:
            real = swap._write_manifest

            def logged(directory, out):
                with open(log, "a") as f:
                    f.write(f"start {tag}\n")
                time.sleep(hold)  # the window in which an unlocked second writer would interleave
                if tag == "a2":  # hold the lock until the parent has seen the second writer give up
                    _wait_for(release, "go")
                real(directory, out)
                with open(log, "a") as f:
                    f.write(f"end {tag}\n")

            swap._write_manifest = logged
            swap.swap_scales_dir(ck, delta)
        return run

    pid_a = os.fork()
    if pid_a == 0:
        code = 0
        try:
            slow_swap(deltas[0], "a", 1.0)()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _wait_for(log, "start a")  # A holds the lock now
    code_b, said = in_child(slow_swap(deltas[1], "b", 0.0))
    _, status = os.waitpid(pid_a, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and code_b == 0, said
    assert log.read_text().split("\n")[:4] == ["start a", "end a", "start b", "end b"]
    ckpt = load_checkpoint(ck, with_tokenizer=False)
    assert ckpt.info["scale_delta"]["task"] == "b"
    # a second writer that may not wait: one line, exit 2, the first one's result intact
    pid_a = os.fork()
    if pid_a == 0:
        code = 0
        try:
            slow_swap(deltas[0], "a2", 0.0)()
        except BaseException as e:  # noqa: BLE001
            (tmp_path / "a2-error").write_text(repr(e))
            code = 3
        os._exit(code)
    _wait_for(log, "start a2")
    from qtool.cli.app import main

    err = tmp_path / "err"

    def cli() -> None:
        sys.argv = ["qtool", "swap-scales", str(ck), str(deltas[1])]
        main()

    code_b, _ = in_child(cli, env={"QTOOL_LOCK_TIMEOUT": "0.3"}, stderr=err)
    release.write_text("go\n")
    _, status = os.waitpid(pid_a, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "a2-error").read_text()
    lines = err.read_text().splitlines()
    assert code_b == 2 and len(lines) == 1 and "another qtool is swapping the scales of" in lines[0], (
        lines, log.read_text())
    assert load_checkpoint(ck, with_tokenizer=False).info["scale_delta"]["task"] == "a"


QTOOL = Path(sys.executable).parent / "qtool"


def _limited(fsize: int):
    def preexec() -> None:  # in the subprocess: writes past `fsize` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return preexec


@pytest.mark.skipif(not QTOOL.exists(), reason="qtool is not installed next to this Python")
def test_full_disk_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir):
    """A full disk, simulated by RLIMIT_FSIZE in real subprocesses (the installed script)."""
    out = tmp_path / "q"
    ck = tmp_path / "ck"
    info = saved_tiny_checkpoint(ck, 4, 32)
    gen = torch.Generator().manual_seed(0)
    d = tmp_path / "t.safetensors"
    save_delta(d, {n: 1e-3 * torch.randn(expected_shape(e), generator=gen) for n, e in info["modules"].items()},
               info, task="t", steps=1, lr=1e-5, seed=0, metric_name="loss", metric=1.0)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    runs = [subprocess.Popen([str(QTOOL), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_limited(limit), cwd=tmp_path)
            for args, limit in ((["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "-o", str(out),
                                  "-q"], 16 * 1024),
                                (["swap-scales", str(ck), str(d)], 1024))]
    for p in runs:
        _, err = p.communicate(timeout=300)
        lines = err.splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "nothing was written" in lines[0], (p.args, err[-800:])
    assert "File too large (EFBIG)" in err
    assert not out.exists() and not [n for n in _siblings(out) if n.startswith(".q.")]
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # in place: untouched
    assert not [n for n in _siblings(ck) if n.startswith(".ck.")]
    assert json.loads((ck / "qtool.json").read_text()).get("scale_delta") is None
