"""`qtool eval`: load a checkpoint or an original model and score it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.artifact.checkpoint import MANIFEST, load_checkpoint
from qtool.data.calib import model_max_seqlen
from qtool.data.corpus import corpus_sha256, load_texts
from qtool.errors import QtoolError
from qtool.eval.generate import generate
from qtool.eval.perplexity import perplexity, tokenize_corpus
from qtool.models.load import load_model
from qtool.nn.qlinear import dense_cache
from qtool.nn.replace import cast_float


@dataclass
class EvalConfig:
    model: str
    corpus: str = "bbc"
    split: str = "test"
    seqlen: int = 2048
    max_windows: int | None = None
    baseline: bool = False
    deltas: list[Path] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    prompt: str | None = None
    max_new_tokens: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    quiet: bool = False


def _score(label: str, model, tok, ids, cfg: EvalConfig, seqlen: int) -> dict:
    model = cast_float(model, cfg.dtype).to(cfg.device).eval()
    # Without GPU kernels, unpacking on every call dominates: dequantize once for the run.
    cache = dense_cache(model, cfg.dtype) if cfg.device.type == "cpu" else contextlib.nullcontext()
    with cache:
        res = perplexity(model, tok, [], seqlen, cfg.max_windows, cfg.device, cfg.quiet, ids=ids)
        row = {"label": label, "perplexity": res.to_dict()}
        if cfg.prompt:
            row["generation"] = generate(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.device)
    return row


def run(cfg: EvalConfig) -> dict:
    path = Path(cfg.model)
    is_ckpt = (path / MANIFEST).is_file()
    if cfg.deltas and not is_ckpt:
        raise QtoolError("--delta needs a qtool checkpoint directory as MODEL")
    if cfg.adapters and not is_ckpt:
        raise QtoolError("--adapter needs a qtool checkpoint directory as MODEL")
    if cfg.adapters:
        from qtool.artifact.adapter import read_adapter

        for a in cfg.adapters:  # a bad adapter fails before the model loads
            read_adapter(a)
    rows = []
    if is_ckpt:
        ck = load_checkpoint(path)
        model, tok, info = ck.model, ck.tokenizer, ck.info
        src = info.get("source") or {}  # checkpoints written from an in-memory model have none
        source = src.get("name") if src.get("kind") == "builtin" else src.get("path")
        g = "channel" if info["group_size"] is None else info["group_size"]
        label = f"{info['method']} W{info['bits']} g{g}"
    else:
        model, tok, _ = load_model(cfg.model)
        info, source, label = None, None, "original"
    seqlen = min(cfg.seqlen, model_max_seqlen(model.config))
    corpus_name, texts = load_texts(cfg.corpus, cfg.split)
    ids = tokenize_corpus(tok, texts)
    if cfg.baseline and source is not None:
        base, _, _ = load_model(source)
        rows.append(_score("original (fp)", base, tok, ids, cfg, seqlen))
        del base
    rows.append(_score(label, model, tok, ids, cfg, seqlen))
    if cfg.deltas:
        from qtool.artifact.scales import apply_delta, remove_delta

        for d in cfg.deltas:
            apply_delta(model, d, info, checkpoint_dir=path)
            rows.append(_score(f"{label} + Δs {d.name}", model, tok, ids, cfg, seqlen))
            remove_delta(model)
    if cfg.adapters:
        from qtool.methods.lora import attach_adapter
        from qtool.nn.lora import remove_lora

        for a in cfg.adapters:
            attach_adapter(model, a, info.get("fingerprint"), dropout=0.0)
            rows.append(_score(f"{label} + adapter {Path(a).name}", model, tok, ids, cfg, seqlen))
            remove_lora(model)
    return {"model": str(cfg.model), "corpus": corpus_name, "corpus_sha256": corpus_sha256(texts),
            "split": cfg.split, "seqlen": seqlen, "device": str(cfg.device),
            "dtype": str(cfg.dtype).removeprefix("torch."), "checkpoint": info and {
                k: info.get(k) for k in ("method", "bits", "group_size", "symmetric", "fingerprint", "stats")},
            "rows": rows}
