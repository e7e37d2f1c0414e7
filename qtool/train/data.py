"""Tokenize a Task for training and evaluation; batch it deterministically.

lm tasks: the documents are joined with "\\n\\n" and tokenized once, then cut into
non-overlapping windows of seqlen tokens (tail dropped), as in the perplexity recipe;
every token is a target. prompt tasks: prompt (+ suffix) and answer are tokenized
separately and concatenated, so the answer's tokens are exactly those that a choice
comparison scores; only answer tokens are targets (labels elsewhere are IGNORE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.data.tasks import EOS, Example, Task
from qtool.errors import QtoolError

IGNORE = -100


@dataclass
class Encoded:
    """One training/eval sequence: ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    input_ids: Tensor  # int64 [B, L]
    attention_mask: Tensor  # int64 [B, L], 0 on right padding
    labels: Tensor  # int64 [B, L], IGNORE on prompt and padding

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class ChoiceItem:
    """A classification example for eval: the context ids and the index of the gold choice."""

    context: list[int]
    gold: int


@dataclass
class TokenizedTask:
    task: Task
    train: list[Encoded]
    validation: list[Encoded]
    choices: list[list[int]] | None  # token ids of each choice continuation
    val_choice_items: list[ChoiceItem] | None
    pad_id: int


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def _answer_ids(tokenizer, answer: str) -> list[int]:
    if answer.endswith(EOS):
        if tokenizer.eos_token_id is None:
            raise QtoolError("the tokenizer has no EOS token, needed to end Alpaca answers")
        return _ids(tokenizer, answer.removesuffix(EOS)) + [tokenizer.eos_token_id]
    return _ids(tokenizer, answer)


def lm_windows(tokenizer, docs: list[str], seqlen: int, what: str) -> list[Encoded]:
    ids = _ids(tokenizer, "\n\n".join(docs), special=True)
    n = len(ids) // seqlen
    if n == 0:
        raise QtoolError(f"{what}: {len(ids)} tokens, fewer than one window of --seqlen {seqlen}")
    return [Encoded(ids[i * seqlen:(i + 1) * seqlen], ids[i * seqlen:(i + 1) * seqlen]) for i in range(n)]


def encode_context(tokenizer, ex: Example, seqlen: int, answer_len: int) -> list[int]:
    """Prompt + suffix ids, with the prompt's end cut for a truncatable example so that
    `answer_len` more tokens fit in seqlen; a non-truncatable one that does not fit is an error."""
    prompt, suffix = _ids(tokenizer, ex.prompt, special=True), _ids(tokenizer, ex.suffix)
    room = seqlen - len(suffix) - answer_len
    if len(prompt) > room:
        if not ex.truncatable or room < 1:
            total = len(prompt) + len(suffix) + answer_len
            raise QtoolError(f"{ex.origin}: example is {total} tokens, longer than --seqlen {seqlen} "
                             "(raise --seqlen or shorten the record)")
        prompt = prompt[:room]
    return prompt + suffix


def encode_example(tokenizer, ex: Example, seqlen: int, reserve: int = 0) -> Encoded:
    answer = _answer_ids(tokenizer, ex.answer)
    if not answer:
        raise QtoolError(f"{ex.origin}: the answer is empty")
    context = encode_context(tokenizer, ex, seqlen, max(len(answer), reserve))
    return Encoded(context + answer, [IGNORE] * len(context) + answer)


def tokenize_task(task: Task, tokenizer, seqlen: int) -> TokenizedTask:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if task.kind == "lm":
        train = lm_windows(tokenizer, task.train, seqlen, f"task {task.name} (train)")
        val = lm_windows(tokenizer, task.validation, seqlen, f"task {task.name} (validation)")
        return TokenizedTask(task, train, val, None, None, pad_id)
    choices = [_ids(tokenizer, c) for c in task.choices] if task.choices else None
    reserve = max(len(c) for c in choices) if choices else 0
    train = [encode_example(tokenizer, ex, seqlen, reserve) for ex in task.train]
    val = [encode_example(tokenizer, ex, seqlen, reserve) for ex in task.validation]
    items = None
    if choices:
        items = []
        for ex in task.validation:
            if ex.answer not in task.choices:
                raise QtoolError(f"{ex.origin}: answer {ex.answer!r} is not one of the task's choices")
            context = encode_context(tokenizer, ex, seqlen, reserve)
            items.append(ChoiceItem(context, task.choices.index(ex.answer)))
    return TokenizedTask(task, train, val, choices, items, pad_id)


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-padded batch; padding is masked out of attention and loss."""
    L = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


class BatchOrder:
    """Which items form global micro-batch number k, reproducibly (so --resume continues
    exactly): epoch e is a permutation drawn from a generator seeded with (seed, e); the
    last incomplete micro-batch of an epoch is dropped."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < batch_size:
            raise QtoolError(f"the training split has {n_items} sequences, "
                             f"fewer than --batch-size {batch_size}")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.per_epoch = n_items // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_items, generator=gen)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()


def eval_subset(n: int, limit: int | None, seed: int = 1234) -> list[int]:
    """A fixed random subset of validation indices (splits are often sorted by label)."""
    if limit is None or limit >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:limit].tolist())
