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
class TaskEvalConfig:
    """`qtool eval --tasks`: lm-evaluation-harness tasks instead of perplexity."""

    model: str
    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    baseline: bool = False
    deltas: list[Path] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    max_new_tokens: int | None = None  # generative tasks: replaces the task's own budget


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


def _load(cfg) -> tuple:
    """(model, tokenizer, checkpoint info or None, original model's source or None, label)."""
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
    if not is_ckpt:
        model, tok, _ = load_model(cfg.model)
        return model, tok, None, None, "original"
    ck = load_checkpoint(path)
    info = ck.info
    src = info.get("source") or {}  # checkpoints written from an in-memory model have none
    source = src.get("name") if src.get("kind") == "builtin" else src.get("path")
    g = "channel" if info["group_size"] is None else info["group_size"]
    return ck.model, ck.tokenizer, info, source, f"{info['method']} W{info['bits']} g{g}"


def _variants(model, info, cfg, label: str):
    """Yield (label) with the model as scored: plain, then with each Δs, then each adapter."""
    yield label
    if cfg.deltas:
        from qtool.artifact.scales import apply_delta, remove_delta

        for d in cfg.deltas:
            apply_delta(model, d, info, checkpoint_dir=Path(cfg.model))
            yield f"{label} + Δs {d.name}"
            remove_delta(model)
    if cfg.adapters:
        from qtool.methods.lora import attach_adapter
        from qtool.nn.lora import remove_lora

        for a in cfg.adapters:
            attach_adapter(model, a, info.get("fingerprint"), dropout=0.0)
            yield f"{label} + adapter {Path(a).name}"
            remove_lora(model)


def run_tasks(cfg: TaskEvalConfig) -> dict:
    """Score the model (and the original with --baseline, each Δs, each adapter) on lm-eval tasks."""
    from qtool.eval.harness import QtoolLM
    from qtool.eval.harness import run_tasks as harness_run

    model, tok, info, source, label = _load(cfg)

    def score(lbl: str, m) -> dict:
        m = cast_float(m, cfg.dtype).to(cfg.device).eval()
        # Without GPU kernels, unpacking on every call dominates: dequantize once for the run.
        cache = dense_cache(m, cfg.dtype) if cfg.device.type == "cpu" else contextlib.nullcontext()
        with cache:
            lm = QtoolLM(model=m, tokenizer=tok, batch_size=cfg.batch_size, label=lbl)
            out = harness_run(lm, cfg.tasks, cfg.limit, cfg.num_fewshot, cfg.seed, cfg.max_new_tokens)
        return {"label": lbl, "tasks": out["rows"], "lm_eval": out["raw"]}

    rows = []
    if cfg.baseline and source is not None:
        base, _, _ = load_model(source)
        rows.append(score("original (fp)", base))
        del base
    for lbl in _variants(model, info, cfg, label):
        rows.append(score(lbl, model))
    return {"model": str(cfg.model), "tasks": cfg.tasks, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
            "device": str(cfg.device), "dtype": str(cfg.dtype).removeprefix("torch."),
            "checkpoint": info and {k: info.get(k) for k in ("method", "bits", "group_size", "symmetric",
                                                               "fingerprint")},
            "rows": rows}


def run(cfg: EvalConfig) -> dict:
    model, tok, info, source, label = _load(cfg)
    seqlen = min(cfg.seqlen, model_max_seqlen(model.config))
    corpus_name, texts = load_texts(cfg.corpus, cfg.split)
    ids = tokenize_corpus(tok, texts)
    rows = []
    if cfg.baseline and source is not None:
        base, _, _ = load_model(source)
        rows.append(_score("original (fp)", base, tok, ids, cfg, seqlen))
        del base
    for lbl in _variants(model, info, cfg, label):
        rows.append(_score(lbl, model, tok, ids, cfg, seqlen))
    return {"model": str(cfg.model), "corpus": corpus_name, "corpus_sha256": corpus_sha256(texts),
            "split": cfg.split, "seqlen": seqlen, "device": str(cfg.device),
            "dtype": str(cfg.dtype).removeprefix("torch."), "checkpoint": info and {
                k: info.get(k) for k in ("method", "bits", "group_size", "symmetric", "fingerprint", "stats")},
            "rows": rows}
