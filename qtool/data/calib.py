"""The calibration-set artifact: N windows × seqlen token ids, seeded, in safetensors.

Windows are drawn as in GPTQ: tokenize the training texts joined by "\n\n" once, then
take N random start positions (torch.Generator seeded with `seed`). The file records
the tokenizer fingerprint so that a set made with another tokenizer is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qtool.artifact import safetensors_io as st
from qtool.artifact.atomic import atomic_file
from qtool.data.corpus import corpus_sha256, load_texts
from qtool.errors import QtoolError

KIND = "calibration"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and special tokens: equal iff token ids mean the same text."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


@dataclass
class CalibrationSet:
    input_ids: Tensor  # int64 [N, seqlen]
    meta: dict[str, str]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def model_max_seqlen(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


def build(tokenizer, corpus: str = "bbc", n: int = 128, seqlen: int = 2048, seed: int = 0,
          max_seqlen: int | None = None) -> CalibrationSet:
    if n < 1 or seqlen < 8:
        raise QtoolError(f"calibration needs n >= 1 and seqlen >= 8 (got n={n}, seqlen={seqlen})")
    if max_seqlen is not None:
        seqlen = min(seqlen, max_seqlen)
    name, docs = load_texts(corpus, split="train")
    ids = tokenizer("\n\n".join(docs), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise QtoolError(f"corpus {name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    meta = {
        "format": "pt",
        "qtool.kind": KIND,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus": name,
        "corpus_sha256": corpus_sha256(docs),
        "seed": str(seed),
        "n": str(n),
        "seqlen": str(seqlen),
    }
    return CalibrationSet(windows.to(torch.int64), meta)


def save(calib: CalibrationSet, path: Path, overwrite: bool = False) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise QtoolError(f"{path} exists (use --overwrite)")
    with atomic_file(path) as tmp:
        save_file({"input_ids": calib.input_ids.to(torch.int32).contiguous()}, str(tmp),
                  metadata=st.seal_metadata(calib.meta))
        st.seal(tmp)


def load(path: Path, tokenizer=None, vocab_size: int | None = None) -> CalibrationSet:
    """Read a calibration file; with a tokenizer, refuse one made with another tokenizer; with
    the model's vocab_size (its embedding rows), refuse ids outside it."""
    path = Path(path)
    header = st.read_header(path) if path.is_file() else None
    if header is None:
        raise QtoolError(f"calibration file {path} not found")
    if header.metadata.get("qtool.kind") != KIND or set(header.tensors) != {"input_ids"}:
        raise QtoolError(f"{path} is not a qtool calibration file")
    info = header.tensors["input_ids"]
    if info.dtype not in ("I32", "I64") or len(info.shape) != 2 or 0 in info.shape:
        raise QtoolError(f"{path}: input_ids must be a non-empty int32 [N, seqlen] tensor, "
                         f"got {info.dtype} {list(info.shape)}")
    tensors, meta = st.load(path, "calibration file")
    st.check_seal(path, meta, "make it again with `qtool calibrate`")
    ids = tensors["input_ids"].to(torch.int64)
    for key, value in (("n", ids.shape[0]), ("seqlen", ids.shape[1])):
        if meta.get(key) is not None and meta[key] != str(value):
            raise QtoolError(f"{path}: metadata says {key}={meta[key][:20]}, but input_ids has {value}")
    if tokenizer is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise QtoolError(f"{path} was made with a different tokenizer than this model's; "
                         "rebuild it with `qtool calibrate --model ...`")
    if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise QtoolError(f"{path}: token ids outside the model's vocabulary (0..{vocab_size - 1})")
    return CalibrationSet(ids, meta)
