"""Shared fixtures: a tiny random Llama (unit tests) and the real default model (end to end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Keep the GGUF conversion cache across the test run but out of the user's home when asked.
    if "QTOOL_CACHE" not in os.environ and os.environ.get("CI"):
        os.environ["QTOOL_CACHE"] = str(tmp_path_factory.mktemp("qtool-cache"))
    yield


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny random Llama saved as an HF directory, with a small byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    tok_model = Tokenizer(models.BPE(unk_token="<unk>"))
    tok_model.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"])
    tok_model.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_model, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
