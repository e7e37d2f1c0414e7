"""Markdown table of `qtool eval --tasks ... --json` files: one column per scored model (a file's
stem, plus the row's label when the file scored several: base, + Δs, + adapter), acc and
acc_norm (and exact_match, perplexity) per task, in percent with the standard error.

Usage: python scripts/results/eval_table.py zero-shot/fp.json zero-shot/rtn-w4.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    names = []
    for stem, res in runs:
        for row in res["rows"]:
            name = stem if len(res["rows"]) == 1 else f"{stem} [{row['label']}]"
            names.append(name)
            for t in row["tasks"]:
                for m in ("acc", "acc_norm", "exact_match", "perplexity"):
                    if m in t:
                        err = t.get(f"{m}_stderr")
                        scale = 1 if m == "perplexity" else 100
                        text = f"{t[m] * scale:.1f}" + (f" ± {err * scale:.1f}" if isinstance(err, float) else "")
                        cells.setdefault((t["task"], m), {})[name] = text
    print("| task | metric | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (task, m), row in cells.items():
        print(f"| {task} | {m} | " + " | ".join(row.get(n, "") for n in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
