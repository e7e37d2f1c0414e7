"""Every supported family, built from transformers' own config class with random weights (no
download) and saved as sharded safetensors, goes through the streamed quantize → eval → finetune
(peqa, lora) → swap-scales, and the quantized model's logits are checked against its own dequantized
reference. MoE families whose experts are fused 3-D tensors are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_util import run_cli

HIDDEN, LAYERS, VOCAB = 64, 2, 512
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 96, "num_hidden_layers": LAYERS,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _configs():
    import transformers as t

    return {
        "llama": t.LlamaConfig(**COMMON),
        "mistral": t.MistralConfig(**COMMON, sliding_window=None),
        "qwen2": t.Qwen2Config(**COMMON),  # q/k/v biases
        "qwen3": t.Qwen3Config(**COMMON, head_dim=16),  # q/k norms
        "gemma2": t.Gemma2Config(**COMMON, head_dim=16),
        "gemma3": t.Gemma3TextConfig(**COMMON, head_dim=16),
        "phi3": t.Phi3Config(**COMMON, pad_token_id=0),  # fused qkv_proj, gate_up_proj
        "olmo2": t.Olmo2Config(**COMMON),
    }


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
LINEARS = {"phi3": 4}  # qkv_proj, o_proj, gate_up_proj, down_proj; the others have 7 per block


def save_family(name: str, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from qtool.models.synthetic import tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[name])
    if name == "qwen2":  # biases start at zero; make them count
        for blk in model.model.layers:
            for lin in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj):
                torch.nn.init.normal_(lin.bias, std=0.5)
    model.save_pretrained(path, max_shard_size="100KB")  # several shards and an index
    tokenizer().save_pretrained(path)
    return path


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)).item()


def check_against_dequantized(source: Path, ckpt: Path) -> float:
    """SQNR of the checkpoint's logits against the source model with every quantized Linear's weight
    replaced by its dequantized Ŵ (and the head, when quantized). Both compute x·Ŵᵀ with the same
    norms and biases, so they differ only by fp32 summation order: 40 dB leaves a margin of several
    orders of magnitude over that while any dropped bias, norm or mis-assigned layer (or an expert left
    dense) costs far more."""
    from transformers import AutoModelForCausalLM

    from qtool.artifact.checkpoint import load_checkpoint
    from qtool.nn.replace import quantized_linears

    ck = load_checkpoint(ckpt, with_tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    layers = quantized_linears(ck.model)
    assert set(layers) == set(ck.info["modules"])
    with torch.no_grad():
        for name, layer in layers.items():
            ref.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
        ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
        a = ref(input_ids=ids).logits.float()
        b = ck.model.float()(input_ids=ids).logits.float()
    return sqnr_db(a, b)


TEXT = ("The government announced new measures on Tuesday to tackle rising inflation. Markets, prices, "
        "football and weather: the quick brown fox jumps over the lazy dog. ") * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A small .txt corpus: the BBC corpus would take longer to tokenize than the whole quantization
    of a tiny model."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "c.txt").write_text(TEXT)
    return d / "c.txt"


def calibration(src: Path, text: Path) -> Path:
    """2 windows × 32 tokens with the tokenizer as the family's directory loads it (transformers maps
    some families to their own tokenizer class, with other special tokens)."""
    from transformers import AutoTokenizer

    from qtool.data import calib

    out = src.parent / "calib.safetensors"
    calib.save(calib.build(AutoTokenizer.from_pretrained(str(src)), str(text), 2, 32, 0), out)
    return out


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    from qtool.data.tasks import rotten_tomatoes_reviews

    recs = [{"instruction": "Classify the sentiment.", "input": r.text[:60], "output": r.label}
            for r in rotten_tomatoes_reviews("validation")[:12]]
    p = tmp_path_factory.mktemp("data") / "r.json"
    p.write_text(json.dumps(recs))
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_eval_finetune_swap(family, tmp_path, capsys, alpaca, corpus):
    text = corpus
    src = save_family(family, tmp_path / family)
    cal = calibration(src, text)
    assert len(list(src.glob("model-*.safetensors"))) > 1
    n_linears = LINEARS.get(family, 7) * LAYERS
    for method, extra in (("rtn", ["-g", "32"]), ("gptq", ["-g", "32", "--calib", cal]),
                          ("nf4", ["-g", "64"])):
        out = tmp_path / f"{family}-{method}"
        code, _, err = run_cli(capsys, "quantize", "--method", method, "--model", src, "-o", out, "-q", *extra)
        assert code == 0, err
        info = json.loads((out / "qtool.json").read_text())
        assert len(info["modules"]) == n_linears, sorted(info["modules"])
        db = check_against_dequantized(src, out)
        assert db > 40, f"{family} {method}: logits vs dequantized reference {db:.1f} dB"
    ck = tmp_path / f"{family}-rtn"
    info = json.loads((ck / "qtool.json").read_text())
    code, _, err = run_cli(capsys, "eval", ck, "--corpus", text, "--seqlen", "16", "--max-windows", "1", "-q")
    assert code == 0, err
    common = ["--task", "alpaca", "--data", alpaca, "--max-steps", "2", "--batch-size", "2", "--seqlen", "256",
              "--device", "cpu", "-q"]
    delta = tmp_path / "peqa.safetensors"
    code, _, err = run_cli(capsys, "finetune", ck, "--method", "peqa", *common, "-o", delta)
    assert code == 0, err
    code, _, err = run_cli(capsys, "finetune", ck, "--method", "lora", "--rank", "4", *common,
                           "-o", tmp_path / "lora")
    assert code == 0, err
    from qtool.artifact.adapter import read_adapter

    assert len(read_adapter(tmp_path / "lora").tensors) == n_linears  # targets follow fused names (phi3)
    code, _, err = run_cli(capsys, "swap-scales", ck, delta, "-o", tmp_path / "swapped", "-q")
    assert code == 0, err
    from qtool.artifact.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "swapped", with_tokenizer=False).info["fingerprint"] == info["fingerprint"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_with_fused_experts_is_refused(family, tmp_path, capsys):
    import transformers as t

    cfg = {"mixtral": lambda: t.MixtralConfig(**COMMON, num_local_experts=4),
           "qwen2_moe": lambda: t.Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=32),
           "qwen3_moe": lambda: t.Qwen3MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=32)}[family]()
    from transformers import AutoModelForCausalLM

    d = tmp_path / family
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    out = tmp_path / "out"
    capsys.readouterr()  # what saving the source printed
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", d, "-o", out, "-q")
    assert code == 2
    assert err.count("\n") == 1 and "unsupported architecture" in err and "Experts" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
