"""`--num-processes N`: run the same command again under accelerate's launcher, N processes.

The command line is passed on unchanged but for --num-processes, as
`python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m qtool ARGS`.
`--multi_gpu` selects accelerate's torchrun launcher, which starts N local processes on
CUDA and on CPU alike (with accelerate 1.x, `--cpu --num_processes N` starts one process
unless MPI is set up); each process then joins the group with gloo on CPU and NCCL on CUDA
(qtool.dist). Docs: docs/distributed.md.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

from qtool import dist
from qtool.errors import QtoolError

FLAG = "--num-processes"


def strip_flag(argv: list[str]) -> list[str]:
    """`argv` without --num-processes and its value (either spelling: `--num-processes 2`, `=2`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == FLAG:
            skip = True
        elif not a.startswith(FLAG + "="):
            out.append(a)
    return out


def check(num_processes: int, global_batch: int, device: str) -> None:
    """The refusals, before any process starts: each one line, exit 2."""
    if num_processes < 1:
        raise QtoolError(f"{FLAG} must be ≥ 1, got {num_processes}")
    if num_processes > 1 and dist.launched():
        raise QtoolError(f"{FLAG}: this process was already started by a launcher; give the process "
                         "count to one of them")
    if global_batch % num_processes:
        raise QtoolError(f"{FLAG} {num_processes} does not divide the global batch of {global_batch} "
                         "sequences (--batch-size × --grad-accum)")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda and num_processes > torch.cuda.device_count():
        raise QtoolError(f"{FLAG} {num_processes}: only {torch.cuda.device_count()} CUDA GPU(s) here "
                         "(one process per GPU)")


def _free_port() -> int:
    # Not the launcher's default 29500: two runs on one host would collide there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "--quiet",
            "-m", "qtool", *strip_flag(argv)]


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run `qtool ARGV` in `num_processes` processes; returns the launcher's exit code."""
    return subprocess.run(launch_command(num_processes, argv), check=False).returncode
