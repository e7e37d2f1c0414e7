"""`qtool bench quantize`: time `qtool quantize` per method on a synthetic model of a real shape.

The model (random bf16 weights, sharded safetensors; qtool.models.synthetic) is written once under
the qtool cache dir and reused. Each method runs in a fresh subprocess, the exact `qtool quantize`
command a user would type, so that its peak RSS is its own (ru_maxrss of that child) and its peak GPU
memory is what the checkpoint's manifest records. With --blocks N the model is cut to N blocks and
the full-model time is projected as fixed + per-block × full blocks (fixed: load, calibration
capture, writing; per-block: the method's own time / N). apiq-bw runs one epoch; 20 epochs are
projected as 20 × its per-block time (an upper bound: the per-block time includes the forward passes
that do not repeat per epoch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qtool.errors import QtoolError

SHAPES = {
    # Llama-3-8B: 32 blocks, hidden 4096, MLP 14336, 32 heads / 8 kv heads, vocab 128256
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    # Llama-3-70B: 80 blocks, hidden 8192, MLP 28672, 64 heads / 8 kv heads (one block, projected)
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256},
    # a CPU smoke test of the command itself
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}
METHODS = ("rtn", "nf4", "gptq", "loftq", "apiq-bw")
# Published figures the results are printed beside (docs/models.md cites their sources).
ANCHORS = [
    "llm-compressor GPTQ W4A16 Llama-3-8B: 745 s, 5.8 GB GPU, whole bf16 model (~16 GB) in CPU RAM",
    "AutoRound Llama-3.1-8B W4G128: 12 min, 18 GB GPU (A100)",
    "qtool before streaming (H100, 2026-12-07, 8B shape): rtn 42.1 GB peak RSS, 52 s wall; "
    "gptq 21.7 s/block, 17.1 GB peak GPU",
]


@dataclass
class MethodResult:
    method: str
    blocks_run: int
    blocks_full: int
    wall_s: float  # the whole command: start, load, quantize, write
    quantize_s: float  # the method itself (manifest stats.seconds)
    per_block_s: float
    projected_full_s: float  # wall_s - quantize_s + per_block_s × blocks_full (× 20 epochs for apiq-bw)
    peak_rss_gb: float
    peak_gpu_gb: float | None
    command: str
    note: str = ""


def model_dir(shape: str, blocks: int | None, seed: int = 0) -> Path:
    """The synthetic model of `shape` cut to `blocks` blocks, written on first use."""
    from qtool.models.cache import cache_dir
    from qtool.models.synthetic import llama_config, write_model

    cfg = dict(SHAPES[shape])
    n = blocks or cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = n
    out = cache_dir() / "bench" / f"llama-{shape}-{n}blocks-seed{seed}"
    if not (out / "config.json").is_file():
        write_model(out, llama_config(**cfg, max_position_embeddings=8192, tie_word_embeddings=False), seed=seed,
                    overwrite=True)
    return out


# Runs one `qtool quantize` and prints its own peak RSS (RUSAGE_CHILDREN of a process with one child).
_RUNNER = """
import resource, subprocess, sys
rc = subprocess.run([sys.executable, "-c", "from qtool.cli.app import main; main()", *sys.argv[1:]]).returncode
print("RSS_GB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2, rc)
"""


def method_args(method: str, calib_n: int, calib_seqlen: int) -> list[str]:
    args = ["--method", method, "--bits", "4"]
    if method == "nf4":
        return args + ["-g", "64"]
    args += ["-g", "128"]
    if method in ("gptq", "apiq-bw"):
        args += ["--calib-n", str(calib_n), "--calib-seqlen", str(calib_seqlen)]
    if method == "apiq-bw":
        args += ["--epochs", "1"]
    if method == "loftq":
        args += ["--loftq-iters", "1"]
    return args


def run_method(model: Path, method: str, blocks_full: int, device: str, calib_n: int, calib_seqlen: int,
               workdir: Path) -> MethodResult:
    out = workdir / method
    args = ["quantize", "--model", str(model), "-o", str(out), "-q", "--overwrite", "--device", device,
            *method_args(method, calib_n, calib_seqlen)]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RSS_GB")), None)
    if line is None or line.split()[2] != "0":
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise QtoolError(f"bench quantize: {method} failed: {err}")
    rss = float(line.split()[1])
    info = json.loads((out / "qtool.json").read_text())
    st = info["stats"]
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    per_block = st["seconds"] / blocks
    fixed = wall - st["seconds"]
    epochs = 20 if method == "apiq-bw" else 1
    projected = fixed + per_block * blocks_full * epochs
    note = "20 epochs projected from 1 (upper bound)" if method == "apiq-bw" else ""
    if method == "loftq":
        note = "--loftq-iters 1 (the default 5 costs about 5x the SVD time)"
    return MethodResult(method, blocks, blocks_full, round(wall, 2), round(st["seconds"], 2), round(per_block, 3),
                        round(projected, 1), round(rss, 3), st.get("peak_gpu_gb"), "qtool " + " ".join(args), note)


def run(shape: str, blocks: int | None, methods: tuple[str, ...], device: str, calib_n: int, calib_seqlen: int
        ) -> dict:
    if shape not in SHAPES:
        raise QtoolError(f"unknown --shape {shape!r}; choose from {', '.join(SHAPES)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise QtoolError(f"bench quantize: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    full = SHAPES[shape]["num_hidden_layers"]
    if shape == "70b" and blocks is None:
        blocks = 1  # a 70B-shaped single block: 1.7 GB of bf16 per block, the whole model is 140 GB
    model = model_dir(shape, blocks)
    results = []
    with tempfile.TemporaryDirectory(prefix="qtool-bench-quantize-") as tmp:
        for m in methods:
            results.append(run_method(model, m, full, device, calib_n, calib_seqlen, Path(tmp)))
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return {"shape": shape, "model": str(model), "model_gb": round(size / 1e9, 2), "blocks_run": blocks or full,
            "blocks_full": full, "device": device, "calibration": f"{calib_n} x {calib_seqlen} tokens",
            "results": [asdict(r) for r in results], "anchors": ANCHORS}
