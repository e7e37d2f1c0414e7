"""Perplexity by the GPTQ/AWQ/OmniQuant recipe (METHODS.md §7).

Join the texts with "\n\n", tokenize once, cut into non-overlapping windows of
`seqlen` tokens, drop the tail, ppl = exp(mean token NLL over all windows). The
logits are never materialised for a whole window: the final hidden states are
pushed through the output head in chunks of `chunk` tokens (Gemma-3's 262k vocab
would need 1 GB of fp32 logits per 1,024 tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.methods.progress import progress_bar


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_corpus(tokenizer, texts: list[str]) -> Tensor:
    return tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]


def chunked_nll_sum(model: nn.Module, hidden: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Σ NLL of labels [T] given final hidden states [T, H], chunk tokens at a time."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i : i + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += F.cross_entropy(logits, labels[i : i + chunk], reduction="sum").double()
    return total


def final_hidden(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Last hidden states (after the final norm), without computing logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], seqlen: int = 2048, max_windows: int | None = None,
               device: torch.device | str = "cpu", quiet: bool = False, chunk: int = 1024,
               ids: Tensor | None = None) -> PerplexityResult:
    t0 = time.perf_counter()
    if ids is None:
        ids = tokenize_corpus(tokenizer, texts)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        from qtool.errors import QtoolError

        raise QtoolError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nll = torch.zeros((), dtype=torch.float64)
    with progress_bar(quiet) as bar:
        task = bar.add_task("perplexity", total=n)
        for w in range(n):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
            h = final_hidden(model, x)[0, :-1]
            nll += chunked_nll_sum(model, h, x[0, 1:], chunk).cpu()
            bar.update(task, advance=1, info=f"ppl {math.exp(nll.item() / ((w + 1) * (seqlen - 1))):.3f}")
    tokens = n * (seqlen - 1)
    mean = nll.item() / tokens
    return PerplexityResult(math.exp(mean), mean, tokens, n, seqlen, time.perf_counter() - t0)

