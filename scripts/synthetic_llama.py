"""Write a random-initialised Llama of a real model's shapes as an HF directory of bf16 shards,
for timing runs where the weights' values do not matter (docs/distributed.md, GPU runs).

    python scripts/synthetic_llama.py llama3-8b-synth                  # Llama-3-8B's shapes
    python scripts/synthetic_llama.py tiny-synth --layers 2 --hidden 64 --inter 128 --heads 4 --kv-heads 2 --vocab 49152

Weights are N(0, 0.02) per tensor, drawn and written one shard at a time (peak RAM about one
shard), with the built-in SmolLM2 tokenizer (its ids fit any vocabulary of at least 49,152).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import LlamaConfig

    from qtool.models.load import load_model

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    a.out.mkdir(parents=True, exist_ok=False)
    cfg.save_pretrained(a.out)
    _, tok, _ = load_model("smollm2-135m")
    tok.save_pretrained(a.out)
    gen = torch.Generator().manual_seed(a.seed)
    H, I, hd = a.hidden, a.inter, a.hidden // a.heads
    kv = a.kv_heads * hd

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(a.vocab, H)}]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(H, H), p + "self_attn.k_proj.weight": rand(kv, H),
                       p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, H),
                       p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
                       p + "mlp.down_proj.weight": rand(H, I),
                       p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)})
    shards.append({"model.norm.weight": torch.ones(H, dtype=torch.bfloat16), "lm_head.weight": rand(a.vocab, H)})
    index: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(a.out / name), metadata={"format": "pt"})
        for key, t in shard.items():
            index[key] = name
            total += t.numel() * t.element_size()
    (a.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    print(f"wrote {a.out}: {total / 2**30:.2f} GiB of bf16 weights in {len(shards)} shards")


if __name__ == "__main__":
    main()
