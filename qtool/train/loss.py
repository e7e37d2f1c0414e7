"""Causal-LM negative log-likelihood computed from hidden states in chunks.

Only target positions (labels != IGNORE, shifted by one) get logits, and each chunk's
logits are recomputed in backward (checkpoint) instead of being kept: with a 49k
vocabulary, 8 × 1024 tokens of fp32 logits would be 1.6 GB plus as much again for their
gradient. Prompt tokens of prompt → answer tasks never reach the LM head at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qtool.train.data import IGNORE

CHUNK_TOKENS = 2048


def _decoder(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    return dec if dec is not None else model.model


def _chunk_nll(head: nn.Module, h: Tensor, y: Tensor, softcap: float | None) -> Tensor:
    logits = head(h).float()  # [T, V]
    if softcap:  # Gemma-style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="none")


def nll_per_row(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, Tensor]:
    """(sum of token NLL per row [B] fp32, number of target tokens per row [B])."""
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # [B, L, H]
    target = labels[:, 1:]
    sel = target != IGNORE  # [B, L-1]
    rows = sel.nonzero()[:, 0]
    h = hidden[:, :-1][sel]  # [T, H]
    y = target[sel]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for t0 in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[t0:t0 + chunk_tokens], y[t0:t0 + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(checkpoint(_chunk_nll, head, hc, yc, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_nll(head, hc, yc, softcap))
    nll = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return sums, sel.sum(1)
