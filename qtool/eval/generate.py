"""Greedy generation, so a person can see the quantized model still talks."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32,
             device: torch.device | str = "cpu") -> str:
    from qtool.nn.qlinear import tile_major_layout

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with tile_major_layout(model):  # decode-speed layout on CUDA; a no-op on the CPU
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
