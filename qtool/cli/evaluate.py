"""Evaluate a checkpoint (or an original model): perplexity, optional generation.

Examples:
  qtool eval smollm2-gptq-w4g128/ --baseline
  qtool eval smollm2-gptq-w4g128/ --seqlen 512 --max-windows 8 --prompt "The BBC reported"
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o


def evaluate(
    model: Annotated[str, typer.Argument(help="qtool checkpoint dir, or an original model (dir, .gguf, name)")]
    = o.DEFAULT,
    corpus: Annotated[str, typer.Option(help="bbc | wiki | c4 (built-in) or a .txt/.jsonl file or directory")] = "bbc",
    split: Annotated[str, typer.Option(help="split of the built-in corpus")] = "test",
    seqlen: Annotated[int, typer.Option(help="window length (capped by the model's context)")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="score only the first N windows")] = None,
    baseline: Annotated[bool, typer.Option(help="also score the original model in the same run")] = False,
    delta: Annotated[list[Path] | None, typer.Option(help="apply a PEQA Δs file in memory (repeatable: "
                                                     "scores each)")] = None,
    adapter: Annotated[list[Path] | None, typer.Option(help="apply a LoRA/DoRA adapter dir (PEFT format; "
                                                       "repeatable: scores each)")] = None,
    merge: Annotated[bool, typer.Option(help="merge the adapter into the weights (refused for quantized bases)")]
    = False,
    prompt: Annotated[str | None, typer.Option(help="generate greedily from this prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate for --prompt")] = 32,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    seed: o.Seed = 0,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from qtool.errors import QtoolError
    from qtool.evaluate import EvalConfig, run

    if merge:
        raise QtoolError("--merge is refused: adding LoRA's dense update to a 2/3/4-bit base and re-quantizing "
                         "rounds most of it away; the adapter is applied beside the base instead")

    dev = o.resolve_device(device)
    o.seed_everything(seed)
    cfg = EvalConfig(model, corpus, split, seqlen, max_windows, baseline, list(delta or []), list(adapter or []),
                     prompt, max_new_tokens, dev, o.resolve_dtype(dtype, dev), quiet)
    results = run(cfg)
    con = o.console(quiet and json_out is not None and str(json_out) == "-")
    for r in results["rows"]:
        ppl = r["perplexity"]
        con.print(f"{r['label']:<28} ppl {ppl['ppl']:10.4f}  ({ppl['tokens_scored']} tokens, "
                  f"{ppl['windows']}×{ppl['seqlen']}, {ppl['seconds']:.1f} s)")
        if "generation" in r:
            con.print(f"  {prompt!r} → {r['generation']!r}")
    con.print(f"corpus {results['corpus']} sha256 {results['corpus_sha256'][:16]}…")
    o.write_json(json_out, results)
