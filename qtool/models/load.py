"""Load the original (unquantized) model from a built-in name, a .gguf file or an HF directory.

GGUF files are dequantized by transformers (GgufConfig(dequantize=True), offline) and the
dense fp32 result is cached as an HF directory under the user cache dir, keyed by the
file's sha256, so later loads skip the slow GGUF conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.models.builtin import BUILTINS, builtin_gguf
from qtool.models.cache import cache_dir, cached_sha256, sha256_file  # noqa: F401 (also imported from here)


@dataclass
class SourceInfo:
    """Identity of the original model: recorded in every artifact made from it."""

    name: str
    path: str
    sha256: str
    kind: str  # builtin | gguf | hf-dir

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "kind": self.kind}


def hf_dir_fingerprint(path: Path) -> str:
    """sha256 over the weight and config files of an HF directory (names + contents)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in {".safetensors", ".json"} and f.is_file():
            h.update(f.name.encode())
            h.update(cached_sha256(f).encode())
    return h.hexdigest()


def resolve_source(name_or_path: str) -> SourceInfo:
    if name_or_path in BUILTINS:
        path = builtin_gguf(name_or_path)
        return SourceInfo(name_or_path, str(path), cached_sha256(path), "builtin")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(BUILTINS)
        raise QtoolError(f"model '{name_or_path}' not found: give an HF model directory, a .gguf file, "
                         f"or a built-in name ({names})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise QtoolError(f"model file {path} is not a .gguf file")
        return SourceInfo(path.name, str(path), cached_sha256(path), "gguf")
    if not (path / "config.json").is_file():
        raise QtoolError(f"{path} is not a Hugging Face model directory (no config.json)")
    if (path / "qtool.json").is_file():
        raise QtoolError(f"{path} is already a qtool checkpoint; give the original model")
    if "quantization_config" in json.loads((path / "config.json").read_text()):  # GPTQ, AWQ, compressed-tensors...
        raise QtoolError(f"{path} is already quantized; finetune, eval, swap-scales and export take it as it is "
                         "(docs/interop.md); quantize needs the original model")
    return SourceInfo(path.name, str(path), hf_dir_fingerprint(path), "hf-dir")


def _gguf_to_hf_dir(gguf: Path, sha: str) -> Path:
    """Dequantize a GGUF once and cache it as a dense fp32 HF directory; returns the directory."""
    out = cache_dir() / "models" / sha[:32]
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quiet_transformers()

    kwargs = {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_tokenizer(tok, str(gguf))  # before anything is cached
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model that still carries the GGUF quantizer: it is fully dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qtool-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
        (tmp / ".complete").write_text("")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


PROBE = "The government announced new measures on Tuesday to tackle rising inflation."


def check_tokenizer(tok, where: str) -> None:
    """Refuse a tokenizer that splits English into single characters.

    transformers 5.17 converts Gemma-3's GGUF tokenizer character by character (76 tokens for
    PROBE, 12 with 5.23): every perplexity and every fine-tuning run would silently measure a
    different, much harder task. Subword tokenizers stay far below 0.5 tokens per character."""
    import transformers

    n = len(tok(PROBE, add_special_tokens=False)["input_ids"])
    if n > 0.5 * len(PROBE):
        raise QtoolError(f"{where}: the tokenizer splits text into single characters ({n} tokens for a "
                         f"{len(PROBE)}-character sentence) with transformers {transformers.__version__}; "
                         "upgrade transformers (5.23 converts GGUF tokenizers correctly) and delete "
                         f"{cache_dir() / 'models'} if it holds a directory converted by the old version")


def quiet_transformers() -> None:
    """transformers' own tqdm bars and load reports would interleave with qtool's rich output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def hf_dir_for(source: SourceInfo) -> Path:
    if source.kind in ("builtin", "gguf"):
        return _gguf_to_hf_dir(Path(source.path), source.sha256)
    return Path(source.path)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Returns (model, tokenizer, SourceInfo). The model is in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    source = resolve_source(name_or_path)
    path = hf_dir_for(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise QtoolError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if source.kind in ("builtin", "gguf"):  # a directory converted earlier, maybe by a faulty version
        check_tokenizer(tok, str(path))
    check_supported(model)
    model.to(device).eval()
    return model, tok, source


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise QtoolError(f"unsupported architecture {type(model).__name__}: no list of decoder blocks found")


def check_supported(model: nn.Module) -> None:
    """Every weight-bearing module of the blocks must be one qtool quantizes (nn.Linear) or keeps as it
    is (norms: 1-D weights). Anything else (a Conv1D, MoE experts fused into 3-D tensors...) is refused
    here, by architecture and layer type, so that no part of a block is silently left dense."""
    from transformers.pytorch_utils import Conv1D

    arch = type(model).__name__
    for i, block in enumerate(decoder_layers(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, Conv1D | nn.Conv1d | nn.Conv2d):
                raise QtoolError(f"unsupported architecture {arch}: layer type {type(mod).__name__} at "
                                 f"layers.{i}.{name}; qtool quantizes nn.Linear layers only")
        # The highest-dimensional offender first: an MoE block is reported by its fused experts, the
        # bulk of its weights, rather than by its router.
        for dims in (3, 2):
            for name, mod in block.named_modules():
                if isinstance(mod, nn.Linear | nn.Embedding):
                    continue
                for pname, p in mod.named_parameters(recurse=False):
                    if p.dim() >= dims:
                        raise QtoolError(f"unsupported architecture {arch}: layer type {type(mod).__name__} at "
                                         f"layers.{i}.{name} holds a {p.dim()}-D weight ({pname}, shape "
                                         f"{list(p.shape)}) that qtool cannot quantize")
