"""Built-in fine-tuning sets made from the offline benchmark data (qtool.data.benchmarks).

`commonsense` (ApiQ Table 8's protocol on the data that ships): each of the eight
commonsense tasks' available set is split into two disjoint halves by a seeded hash of
(seed, task, position, id): bucket 0 is the task's test half, bucket 1 its train half.
Fine-tuning uses the union of the train halves (1/20 of it, by another hash, held out for
validation); the test halves are scored with lm-eval as `<task>_heldout`, never trained on.
Each item trains as prompt → answer: the task's lm-eval query, then " " + the gold choice
(WinoGrande: the gold option's context, then the shared continuation), loss on the answer.

`alpaca`: an instruction set in the Stanford Alpaca layout, built from real question/answer
data (Stanford Alpaca itself is not on the package registry): GSM8K test (1,319 grade-school
word problems, worked answers), MATH test (5,000 competition problems, worked solutions) and
NQ-open (1,000 Google-search questions, short answers). Every answer ends "The answer is X."
so a generation is scored by exact match of X. Split by sha256(item id) % 10: 0 test (scored
by `qtool eval --tasks alpaca`, greedy generation), 1 validation (loss during training),
2-9 train. Items whose question + worked answer exceed ALPACA_MAX_CHARS are left out (591 of
7,319, mostly long MATH solutions), so every item fits the default --seqlen. MBPP is left out:
scoring code needs running it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from qtool.data import benchmarks as bm

SPLIT_SEED = 0


def _hash(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def commonsense_halves(task: str, seed: int = SPLIT_SEED) -> tuple[list[bm.Doc], list[bm.Doc]]:
    """(train half, test half) of one commonsense task, disjoint, fixed by `seed`."""
    if task not in bm.COMMONSENSE:
        raise ValueError(f"{task} is not one of the commonsense tasks {bm.COMMONSENSE}")
    train, test = [], []
    for i, d in enumerate(bm.load_docs(task)):
        (test if _hash(f"{seed}/{task}/{i}/{d.id}") % 2 == 0 else train).append(d)
    return train, test


def doc_pair(d: bm.Doc) -> tuple[str, str]:
    """The gold answer of a document as (prompt, answer) for training."""
    if d.continuation:
        return d.choices[d.gold], " " + d.continuation
    return d.query, " " + d.choices[d.gold]


def commonsense_train(seed: int = SPLIT_SEED) -> tuple[list[tuple[str, bm.Doc]], list[tuple[str, bm.Doc]]]:
    """(train, validation) as (task, doc) pairs: the train halves, 1/20 of them held out."""
    train, val = [], []
    for task in bm.COMMONSENSE:
        half, _ = commonsense_halves(task, seed)
        for d in half:
            (val if _hash(f"val/{task}/{d.id}") % 20 == 0 else train).append((task, d))
    return train, val


@dataclass(frozen=True)
class AlpacaItem:
    instruction: str
    input: str
    output: str
    answers: tuple[str, ...]
    id: str

    @property
    def split(self) -> str:
        b = _hash(self.id) % 10
        return "test" if b == 0 else "validation" if b == 1 else "train"


# Items longer than this (instruction + output, characters) are left out, so that every item
# fits finetune's default --seqlen 1024 (at most ~900 SmolLM2 tokens with the template).
ALPACA_MAX_CHARS = 1300


def alpaca_items(split: str | None = None) -> list[AlpacaItem]:
    out = []
    for qa in bm.gsm8k() + bm.math_problems() + bm.nq_open():
        item = AlpacaItem(qa.question, "", qa.solution, qa.answers, qa.id)
        if len(item.instruction) + len(item.output) > ALPACA_MAX_CHARS:
            continue
        if split is None or item.split == split:
            out.append(item)
    return out
