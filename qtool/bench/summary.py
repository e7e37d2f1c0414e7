"""Markdown tables from the JSON of `qtool bench kernels --json` / `decode --json` (for docs/benchmarks.md).

Run: python -m qtool.bench.summary FILE.json [FILE.json ...]
"""

from __future__ import annotations

import json
import sys


def kernels_md(d: dict) -> str:
    lines = [f"GPU {d['gpu']}, torch {d['torch']}, triton {d['triton']}, "
             f"device-to-device copy {d['copy_gbps']:.0f} GB/s (read + write)", "",
             "| shape | N×K | M | bits | g | path | quant µs | fp16 µs | speedup | weight GB/s | % copy "
             "| fwd+dX / fp16 | graphed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        g = "ch" if r["group_size"] is None else r["group_size"]
        fb = "" if r["fwd_bwd_ratio"] is None else f"{r['fwd_bwd_ratio']:.3f}"
        fg = "" if r.get("fwd_bwd_graph_ratio") is None else f"{r['fwd_bwd_graph_ratio']:.3f}"
        lines.append(f"| {r['shape']} | {r['N']}×{r['K']} | {r['M']} | {r['bits']} | {g} | {r['path']} | "
                     f"{r['quant_us']:.1f} | {r['fp16_us']:.1f} | {r['speedup']:.2f}× | "
                     f"{r['weight_gbps']:.0f} | {100 * r['copy_frac']:.0f}% | {fb} | {fg} |")
    return "\n".join(lines)


def decode_md(d: dict) -> str:
    g = "ch" if d["group_size"] is None else d["group_size"]
    lines = [f"{d['model']} ({d['layers']} layers), {d['gpu']}, torch {d['torch']}, W{d['bits']} g{g}, "
             f"KV length {d['kv_len']}, {d['new_tokens']} greedy steps per timing", "",
             "| batch | fp16 tok/s | quant tok/s | speedup | fp16 ms/step | quant ms/step |",
             "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['batch']} | {r['fp16_tok_s']:.0f} | {r['quant_tok_s']:.0f} | "
                     f"{r['speedup']:.2f}× | {r['fp16_ms']:.2f} | {r['quant_ms']:.2f} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        print(kernels_md(d) if "copy_gbps" in d else decode_md(d))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
