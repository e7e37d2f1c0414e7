"""Validation metrics of a tokenized task: mean target NLL, and accuracy for classification.

Classification follows lm-eval's multiple choice: every choice is scored as a
continuation of the same context by its summed log-likelihood; the highest wins (`acc`).
The gold choice's NLL gives the loss, so one pass yields both numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from qtool import dist
from qtool.train.data import IGNORE, Encoded, TokenizedTask, collate, eval_subset
from qtool.train.loss import nll_per_row


@torch.no_grad()
def evaluate(model: nn.Module, tt: TokenizedTask, batch_size: int, device: torch.device,
             limit: int | None = None, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
             ) -> dict[str, float]:
    """{'loss', 'ppl', 'tokens'[, 'accuracy']} on (a fixed subset of) the validation split."""
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    try:
        if tt.choices is None:
            seqs = [tt.validation[i] for i in eval_subset(len(tt.validation), limit)]
            nll, n = _score(model, seqs, tt.pad_id, batch_size, device, ctx)
            loss = float(nll.sum() / n.sum())
            return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(n.sum())}
        items = [tt.val_choice_items[i] for i in eval_subset(len(tt.val_choice_items), limit)]
        C = len(tt.choices)
        seqs = [Encoded(it.context + c, [IGNORE] * len(it.context) + c) for it in items for c in tt.choices]
        nll, n = _score(model, seqs, tt.pad_id, batch_size, device, ctx)
        nll, n = nll.view(len(items), C), n.view(len(items), C)
        gold = torch.tensor([it.gold for it in items])
        pred = nll.argmin(1)  # highest summed log-likelihood
        g_nll, g_n = nll.gather(1, gold[:, None]), n.gather(1, gold[:, None])
        loss = float(g_nll.sum() / g_n.sum())
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(g_n.sum()),
                "accuracy": float((pred == gold).float().mean())}
    finally:
        model.train(was_training)


def _score(model, seqs: list[Encoded], pad_id: int, batch_size: int, device, ctx):
    if dist.world_size() > 1:
        return _score_shared(model, seqs, pad_id, batch_size, device, ctx)
    nlls, counts = [], []
    for b0 in range(0, len(seqs), batch_size):
        batch = collate(seqs[b0:b0 + batch_size], pad_id).to(device)
        with ctx():
            s, n = nll_per_row(model, batch.input_ids, batch.attention_mask, batch.labels)
        nlls.append(s.float().cpu())
        counts.append(n.cpu())
    return torch.cat(nlls).double(), torch.cat(counts).double()


def _score_shared(model, seqs: list[Encoded], pad_id: int, batch_size: int, device, ctx):
    """Data-parallel scoring: each process scores every world-th sequence into its slots of
    zero-filled vectors, and the sum over processes fills them all (adding zeros is exact)."""
    w, r = dist.world_size(), dist.rank()
    nll, cnt = torch.zeros(len(seqs), dtype=torch.float64), torch.zeros(len(seqs), dtype=torch.float64)
    mine = list(range(r, len(seqs), w))
    # Every process runs the same number of forwards (FSDP gathers weights in each one): a
    # process with one sequence fewer scores a repeat of its last one and drops the result.
    per = -(-len(seqs) // w)
    for b0 in range(0, per, batch_size):
        idx = [mine[min(i, len(mine) - 1)] if mine else 0 for i in range(b0, min(b0 + batch_size, per))]
        keep = [i < len(mine) for i in range(b0, min(b0 + batch_size, per))]
        batch = collate([seqs[i] for i in idx], pad_id).to(device)
        with ctx():
            s, n = nll_per_row(model, batch.input_ids, batch.attention_mask, batch.labels)
        s, n = s.float().cpu().double(), n.cpu().double()
        for j, (i, k) in enumerate(zip(idx, keep, strict=True)):
            if k:
                nll[i], cnt[i] = s[j], n[j]
    both = torch.stack([nll, cnt])
    dist.all_reduce_(both)
    return both[0], both[1]
