"""cProfile of GPTQ on the first BLOCKS blocks of SmolLM2-135M (docs/models.md, "GPTQ: where the time went").

Usage: python scripts/bench/profile_gptq.py [BLOCKS] [WINDOWS] [SEQLEN]   (default 3 8 512)
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from qtool.data import calib
from qtool.methods import quantize_model
from qtool.models.load import load_model
from qtool.quant.grid import QuantSpec


def main() -> None:
    blocks, n, seqlen = (int(a) for a in (sys.argv[1:] + ["3", "8", "512"][len(sys.argv) - 1:])[:3])
    torch.manual_seed(0)
    model, tok, _ = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    ids = calib.build(tok, "bbc", n, seqlen, 0).input_ids
    t = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    quantize_model(model, QuantSpec(4, 128), "gptq", calib=ids, quiet=True)
    prof.disable()
    print(f"gptq on {blocks} blocks, {n} x {seqlen} tokens: {time.perf_counter() - t:.1f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
