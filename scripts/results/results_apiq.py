"""Turn the JSON files of scripts/results/results_apiq.sh into OUTDIR/results.md and OUTDIR/results.json."""

import json
import sys
from pathlib import Path

ORDER = ["rtn", "gptq", "loftq", "omniquant", "apiq-lw", "apiq-bw"]


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def rows(out: Path) -> tuple[dict, list[dict]]:
    fp = _load(out / "eval-fp.json")
    table = []
    for q in out.glob("quant-*.json"):
        tag = q.stem.removeprefix("quant-")
        info, ev = _load(q), _load(out / f"eval-{tag}.json")
        if ev is None:
            continue
        st = info["stats"]
        scored = [r["perplexity"]["ppl"] for r in ev["rows"]]
        table.append({
            "method": info["method"], "bits": info["bits"], "group_size": info["group_size"],
            "ppl_base": scored[0], "ppl_with_adapter": scored[1] if len(scored) > 1 else None,
            "seconds": st["seconds"], "peak_gpu_gb": st.get("peak_gpu_gb"), "peak_rss_gb": st["peak_rss_gb"],
            "block_loss_before": st.get("block_loss_before"), "block_loss_after": st.get("block_loss_after"),
            "nan_restarts": st.get("nan_restarts"), "epochs": st.get("epochs"), "device": st.get("device"),
        })
    table.sort(key=lambda r: (-r["bits"], r["group_size"] or 0, ORDER.index(r["method"])
                              if r["method"] in ORDER else 99))
    return fp, table


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main(out: Path) -> None:
    fp, table = rows(out)
    lines = []
    if fp is not None:
        row = fp["rows"][0]["perplexity"]
        lines += [f"corpus {fp['corpus']} (sha256 {fp['corpus_sha256'][:12]}), seqlen {fp['seqlen']}, "
                  f"{row['tokens_scored']} tokens, device {fp['device']}", ""]
    lines += ["| method | W | g | BBC test ppl (base) | + LoRA init | block MSE before → after | "
              "quantize time (s) | peak GPU (GB) | peak RSS (GB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    if fp is not None:
        lines.append(f"| fp | 32 | - | {fp['rows'][0]['perplexity']['ppl']:.3f} | - | - | - | - | - |")
    for r in table:
        mse = (f"{r['block_loss_before']:.4g} → {r['block_loss_after']:.4g}"
               if r["block_loss_after"] is not None else "-")
        lines.append(f"| {r['method']} | {r['bits']} | {r['group_size'] or 'channel'} | {r['ppl_base']:.3f} | "
                     f"{_f(r['ppl_with_adapter'], '.3f')} | {mse} | {r['seconds']:.1f} | "
                     f"{_f(r['peak_gpu_gb'], '.2f')} | {r['peak_rss_gb']:.2f} |")
    bench = {p.stem.removeprefix("bench-7b-"): _load(p) for p in sorted(out.glob("bench-7b-*.json"))}
    for name, b in bench.items():
        if b is None:
            continue
        m, p = b["measured"], b["projected_7b"]
        lines.append(f"\n7B block ({name}, {b['gpu']}): {m['seconds_per_step']:.3f} s/step at {m['seqlen']} tokens, "
                     f"peak GPU {m['peak_gpu_gb_block_only']} GB for the block; projected 7B "
                     f"({p['blocks']} blocks × {p['windows']} windows × {p['epochs']} epochs): {p['hours']} h, "
                     f"peak GPU {p['peak_gpu_gb_activations_on_gpu']} GB (activations on GPU) or "
                     f"{p['peak_gpu_gb_activations_offloaded']} GB + {p['host_gb_activations_offloaded']} GB "
                     f"pinned host memory (offloaded)")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"fp": fp and fp["rows"][0]["perplexity"], "rows": table,
                                                  "bench_7b": bench}, indent=1) + "\n")
    print(text, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
