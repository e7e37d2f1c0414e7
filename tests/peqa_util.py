"""Tiny offline fixtures for the PEQA tests: a byte-level tokenizer and a random Llama,
quantized in memory with qtool's RTN (no download, a second or less to build)."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens + <pad> + <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(seed: int = 0, vocab: int = 258, layers: int = 2, hidden: int = 64, inter: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=256, eos_token_id=257, bos_token_id=257, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def quantized_tiny(bits: int = 4, group_size: int | None = None, seed: int = 0, **kw):
    """(model, tokenizer, info) with every block Linear a QuantLinear; info as in qtool.json."""
    from qtool.artifact.checkpoint import base_fingerprint, module_entry
    from qtool.methods import quantize_model
    from qtool.nn.replace import quant_linears
    from qtool.quant.grid import QuantSpec

    model = tiny_llama(seed, **kw)
    quantize_model(model, QuantSpec(bits, group_size), "rtn", quiet=True)
    layers = quant_linears(model)
    info = {"method": "rtn", "bits": bits, "group_size": group_size,
            "modules": {n: module_entry(m) for n, m in layers.items()},
            "fingerprint": base_fingerprint(model)}
    return model, byte_tokenizer(), info


def saved_tiny_checkpoint(path: Path, bits: int = 4, group_size: int | None = None, seed: int = 0) -> dict:
    from qtool.artifact.checkpoint import save_checkpoint

    model, tok, info = quantized_tiny(bits, group_size, seed)
    return save_checkpoint(model, tok, {"method": "rtn", "bits": bits, "group_size": group_size}, path)
