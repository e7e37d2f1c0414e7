"""A tiny random Llama for unit tests (imported by conftest and by test modules: a module of
its own because `from conftest import ...` is ambiguous with tests/kernels/conftest.py)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 96, inter: int = 160, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
