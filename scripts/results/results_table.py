"""Turn the JSON files written by scripts/results/results_quant.sh into the markdown table of docs/results.md."""

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    fp = json.loads((out / "eval-fp.json").read_text())
    row = fp["rows"][0]["perplexity"]
    print(f"corpus {fp['corpus']} (sha256 {fp['corpus_sha256'][:12]}), seqlen {fp['seqlen']}, "
          f"{row['tokens_scored']} tokens, device {fp['device']}\n")
    print("| method | bits | group | BBC test ppl | quantize time (s) | peak GPU (GB) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp (dequantized GGUF) | 32 | - | {row['ppl']:.3f} | - | - | - |")
    for q in sorted(out.glob("quant-*.json")):
        tag = q.stem.removeprefix("quant-")
        info = json.loads(q.read_text())
        ev = json.loads((out / f"eval-{tag}.json").read_text())["rows"][0]["perplexity"]
        st = info["stats"]
        g = "channel" if info["group_size"] is None else info["group_size"]
        print(f"| {info['method']} | {info['bits']} | {g} | {ev['ppl']:.3f} | {st['seconds']:.1f} | "
              f"{st.get('peak_gpu_gb', float('nan')):.2f} | {st['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
