"""Random-weight models of any transformers architecture, written as sharded safetensors one block
at a time (never whole in memory): the memory test and `qtool bench quantize` use them to have a
model of a real shape without a download.

Weights: N(0, 0.02) for matrices (transformers' initializer_range; cut from one pool of draws, see
_random), ones for norm weights, zeros for biases; the output is deterministic for a seed. The
tokenizer is a small byte-level BPE trained here on a fixed text: enough for calibration windows and
for a checkpoint to be a complete HF directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qtool.artifact.atomic import atomic_dir

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
              "rope_theta": 500000.0, "tie_word_embeddings": False}


def tokenizer(vocab: int = 384):
    """A byte-level BPE tokenizer trained on a fixed text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ("The government announced new measures on Tuesday to tackle rising inflation. "
            "the quick brown fox jumps over the lazy dog; markets, prices, football and weather. ")
    tok.train_from_iterator([text] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


POOL = (1 << 24) - 1  # odd: a row of any power-of-two length starts at a new place in the pool


def _pool(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(POOL, generator=gen) * 0.02).to(dtype)


def _random(shape: tuple[int, ...], name: str, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Matrices are cut from one pool of N(0, 0.02) draws at a random offset, wrapping around: drawing
    billions of normals takes minutes on a CPU, copying them takes seconds. The pool's odd length keeps
    rows distinct (a row of a power-of-two length K repeats only after POOL rows)."""
    dtype = pool.dtype
    if len(shape) == 1:
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        # Norm weights: ones (Gemma's (1 + w) norms then scale by 2: harmless for random weights).
        return torch.ones(shape, dtype=dtype)
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(n, dtype=dtype)
    pos = int(torch.randint(0, POOL, (1,), generator=gen))
    done = 0
    while done < n:
        k = min(n - done, POOL - pos)
        out[done:done + k] = pool[pos:pos + k]
        done += k
        pos = 0
    return out.view(shape)


def write_model(out: Path, config, seed: int = 0, dtype: torch.dtype = torch.bfloat16, with_tokenizer: bool = True,
                overwrite: bool = False) -> Path:
    """Write a random model of `config` (a transformers PretrainedConfig) to `out`: one shard for the
    tensors outside the blocks, one per block, an index, config.json and a tokenizer. Peak memory is
    one block (plus its fp32 draw of one tensor)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qtool.models.stream import layers_prefix, tied_keys

    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    tied = tied_keys(model)
    prefix = layers_prefix(model) + "."
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    groups: dict[str, list[str]] = {}
    for k in shapes:
        idx = k[len(prefix):].split(".", 1)[0] if k.startswith(prefix) else "rest"
        groups.setdefault(idx, []).append(k)
    gen = torch.Generator().manual_seed(seed)
    pool = _pool(dtype, gen)
    n = len(groups)
    weight_map = {}
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        for i, (_, names) in enumerate(groups.items(), 1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: _random(shapes[k], k, pool, gen) for k in names}, str(tmp / file),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        total = sum(_nbytes(s, dtype) for s in shapes.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.save_pretrained(tmp)
        if with_tokenizer:
            tokenizer().save_pretrained(tmp)
    return Path(out)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.finfo(dtype).bits // 8


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA3_8B, **overrides})
