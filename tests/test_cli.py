"""CLI: each bad input gets a one-line message, exit code 2, and nothing written."""

import json

import pytest

from tests.cli_util import run_cli


def _nothing_written(tmp_path, keep=()):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep) == []


def test_help_lists_the_six_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for cmd in ("quantize", "calibrate", "finetune", "swap-scales", "eval", "bench"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["quantize", "calibrate", "eval", "finetune", "swap-scales"])
def test_each_help_shows_an_example(capsys, cmd):
    code, out, _ = run_cli(capsys, cmd, "--help")
    assert code == 0
    assert f"qtool {cmd}" in out.replace("\n", " ")


@pytest.mark.parametrize("args,message", [
    (["--method", "rtn", "--bits", "5"], "bits must be one of"),
    (["--method", "rtn", "--bits", "4", "-g", "100"], "group size must be one of"),
    (["--method", "rtn", "-g", "big"], "--group-size must be"),
    (["--method", "awq"], "unknown method 'awq'"),
    (["--method", "apiq-bw", "--offload", "disk"], "--offload must be"),
    (["--method", "rtn", "--model", "/nonexistent/model"], "not found"),
    (["--method", "rtn", "--device", "tpu"], "--device must be"),
])
def test_quantize_bad_input(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "quantize", *args, "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert _nothing_written(tmp_path)


def test_quantize_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(d)
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", d, "-o", tmp_path / "out", "-q")
    assert code == 2
    assert "unsupported architecture GPT2LMHeadModel: layer type Conv1D" in err
    assert not (tmp_path / "out").exists()


def test_quantize_existing_output_needs_overwrite(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", tiny_model_dir, "-o", out, "-q")
    assert code == 0, err
    stamp = (out / "qtool.json").read_text()
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", tiny_model_dir, "-o", out, "-q")
    assert code == 2 and "exists (use --overwrite)" in err
    assert (out / "qtool.json").read_text() == stamp


def test_corrupted_checkpoint_exit_2(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", "--method", "rtn", "--model", tiny_model_dir, "-o", out, "-q")[0] == 0
    f = out / "scales.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    code, _, err = run_cli(capsys, "eval", out, "-q", "--seqlen", "16", "--max-windows", "1")
    assert code == 2 and "corrupted or truncated" in err


def test_calibration_from_another_tokenizer_is_refused(capsys, tmp_path, tiny_model_dir):
    from qtool.data import calib

    cs = calib.build(_OtherTokenizer(), "bbc", 2, 16, 0)
    calib.save(cs, tmp_path / "other.safetensors")
    code, _, err = run_cli(capsys, "quantize", "--method", "gptq", "--model", tiny_model_dir,
                           "--calib", tmp_path / "other.safetensors", "-o", tmp_path / "q", "-q")
    assert code == 2 and "different tokenizer" in err
    assert not (tmp_path / "q").exists()


def test_calibrate_quantize_eval_json_on_tiny_model(capsys, tmp_path, tiny_model_dir):
    cal = tmp_path / "calib.safetensors"
    code, _, err = run_cli(capsys, "calibrate", "--model", tiny_model_dir, "-o", cal, "--n", "4", "--seqlen", "32",
                           "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "quantize", "--method", "gptq", "--bits", "3", "-g", "32", "--model",
                           tiny_model_dir, "--calib", cal, "-o", tmp_path / "q", "-q", "--json", tmp_path / "q.json")
    assert code == 0, err
    info = json.loads((tmp_path / "q.json").read_text())
    assert info["calibration"]["n"] == "4" and info["bits"] == 3 and info["group_size"] == 32
    code, out, err = run_cli(capsys, "eval", tmp_path / "q", "--seqlen", "32", "--max-windows", "2", "--baseline",
                             "--json", tmp_path / "e.json", "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["original (fp)", "gptq W3 g32"]
    assert all(r["perplexity"]["tokens_scored"] == 62 for r in res["rows"])


class _OtherTokenizer:
    """A character-level tokenizer: different vocabulary, so a different fingerprint."""

    all_special_tokens: list = []

    def get_vocab(self):
        return {chr(i): i for i in range(32, 127)}

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        import torch

        class _Out:
            input_ids = torch.tensor([[ord(c) % 95 for c in text[:5000]]])

        return _Out()


def test_quantize_dtype_sets_unquantized_tensors_only(capsys, tmp_path, tiny_model_dir):
    from safetensors import safe_open

    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", "--method", "rtn", "--model", tiny_model_dir, "-o", out, "-q",
                           "--dtype", "bfloat16")
    assert code == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype.is_floating_point
        assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "torch.bfloat16"
        assert str(f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype) == "torch.int32"
    with safe_open(str(out / "scales.safetensors"), "pt") as f:
        assert str(f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype) == "torch.float16"
    code, _, err = run_cli(capsys, "eval", out, "--seqlen", "16", "--max-windows", "1", "-q")
    assert code == 0, err


def test_character_level_gguf_tokenizer_is_refused():
    """transformers 5.17 turns Gemma-3's GGUF tokenizer into single characters: refuse, don't measure."""
    from qtool.errors import QtoolError
    from qtool.models.load import PROBE, check_tokenizer

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(range(len(text.split())))}

    check_tokenizer(WordTokenizer(), "ok.gguf")
    with pytest.raises(QtoolError, match=f"{len(PROBE)} tokens for a {len(PROBE)}-character sentence"):
        check_tokenizer(CharTokenizer(), "bad.gguf")
