"""Bring GPTQ (v1/v2), AWQ (GEMM) and compressed-tensors (pack-quantized) checkpoints into qtool.

The import is lossless: the stored integer codes, scales and zero-points are carried over as
they are (repacked where the layout differs, never re-quantized), so the imported model computes
the same Ŵ as the community checkpoint, and `finetune`, `swap-scales`, `eval` and the kernels work
on it as on any qtool checkpoint.

`as_checkpoint_dir(path)` is the one place a command decides what a model path is: a qtool
checkpoint is returned as it is; a community checkpoint is converted once into the cache
(QTOOL_CACHE/imported/<sha256 of its files and the import version>, written atomically) and that qtool checkpoint
is returned; anything else is returned unchanged for the command to judge.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from qtool.artifact.checkpoint import MANIFEST, save_checkpoint
from qtool.errors import QtoolError
from qtool.interop import awq, gptq
from qtool.interop import compressed_tensors as ct
from qtool.interop.hf_dir import read_config, read_tensors
from qtool.models.cache import cache_dir
from qtool.models.load import hf_dir_fingerprint, quiet_transformers
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import set_module

KINDS = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed-tensors"}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IMPORT_VERSION = "1"  # part of the cache key: bump when a conversion changes, so stale imports are redone


def quantization_config(path: Path) -> dict | None:
    """The community quantization config of an HF directory (config.json, or GPTQ's quantize_config.json)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    qc = read_config(path).get("quantization_config")
    if qc is None and (path / "quantize_config.json").is_file():
        import json

        try:
            qc = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise QtoolError(f"{path / 'quantize_config.json'}: corrupted ({e})") from None
    return qc if isinstance(qc, dict) else None


def community_kind(path: Path) -> str | None:
    """'gptq' | 'awq' | 'compressed-tensors' for a community checkpoint qtool can import, None for
    anything else (a qtool checkpoint, an unquantized model, a file)."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST).is_file():
        return None
    qc = quantization_config(path)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in KINDS:
        raise QtoolError(f"{path}: quantization method {method!r} cannot be imported (qtool reads "
                         f"{', '.join(KINDS)})")
    return KINDS[method]


def as_checkpoint_dir(path: Path | str) -> Path:
    """A qtool checkpoint directory for `path` (see the module docstring)."""
    path = Path(path)
    kind = community_kind(path)
    if kind is None:
        return path
    key = hashlib.sha256(f"{IMPORT_VERSION}|{hf_dir_fingerprint(path)}".encode()).hexdigest()[:32]
    out = cache_dir() / "imported" / key
    if not (out / MANIFEST).is_file():
        import_checkpoint(path, out, overwrite=True)
    return out


def _layer_names(tensors: dict[str, Tensor], suffix: str) -> list[str]:
    return sorted(k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix))


def _take(tensors: dict[str, Tensor], name: str, suffixes: tuple[str, ...]) -> dict[str, Tensor]:
    return {s: tensors.pop(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in tensors}


def _layers(kind: str, qc: dict, tensors: dict[str, Tensor], where: str) -> tuple[dict[str, QuantLinear], dict]:
    """Build one QuantLinear per quantized Linear (consuming its tensors); returns them and the grid."""
    layers: dict[str, QuantLinear] = {}
    if kind == "compressed-tensors":
        w = ct.scheme_of(qc, where)
        bits, g, sym = int(w["num_bits"]), w.get("group_size"), bool(w.get("symmetric", True))
        g = None if w["strategy"] == "channel" else g
        suffix, parts = "weight_packed", (*ct.SUFFIXES, "weight_g_idx")
    elif kind == "gptq":
        bits, g, v1 = gptq.read_config(qc, where)
        sym = bool(qc.get("sym", True))
        suffix, parts = "qweight", ("qweight", "qzeros", "scales", "g_idx")
    else:
        bits, g, sym = 4, awq.read_config(qc, where), False
        suffix, parts = "qweight", ("qweight", "qzeros", "scales")
    if bits not in (2, 3, 4, 8) or (g is not None and g not in (32, 64, 128)):
        raise QtoolError(f"{where}: {bits}-bit, group size {g} is not a grid qtool holds (bits 2/3/4/8; "
                         "groups 32, 64, 128 or per channel)")
    names = _layer_names(tensors, suffix)
    if not names:
        raise QtoolError(f"{where}: no quantized layers ({suffix} tensors) found")
    act = False
    for name in names:
        t = _take(tensors, name, parts)
        perm = None
        if kind == "compressed-tensors":
            codes, scales, zeros, g_idx = ct.read_layer(name, t, w)
            N, K = codes.shape
            if g_idx is not None:
                perm = gptq.perm_from_g_idx(g_idx, g, K, name)
                codes = codes if perm is None else codes[:, perm]
            qweight = None
        elif kind == "gptq":
            qweight, scales, zeros, perm = gptq.read_layer(name, t, bits, g, v1)
            N, K = scales.shape[0], qweight.shape[1] * 32 // bits
        else:
            qweight, scales, zeros = awq.read_layer(name, t, g)
            N, K = scales.shape[0], qweight.shape[1] * 32 // bits
        if scales.dtype not in SCALE_DTYPES:
            raise QtoolError(f"{name}: scales of dtype {scales.dtype} are not supported")
        bias = tensors.pop(f"{name}.bias", None)
        layer = QuantLinear(K, N, bits, g, bias is not None, perm is not None, scales.dtype,
                            bias.dtype if bias is not None else torch.float32)
        if qweight is None:
            from qtool.quant.pack import pack

            qweight = pack(codes, bits)
        if tuple(qweight.shape) != tuple(layer.qweight.shape) or tuple(scales.shape) != tuple(layer.scales.shape):
            raise QtoolError(f"{name}: codes {tuple(qweight.shape)} or scales {tuple(scales.shape)} do not fit a "
                             f"{N}×{K} layer at {bits} bits, group size {g}")
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if perm is not None:
            layer.perm.copy_(perm)
            act = True
        if bias is not None:
            layer.bias.copy_(bias)
        layers[name] = layer.eval()
    return layers, {"bits": bits, "group_size": g, "symmetric": sym, "act_order": act}


def import_checkpoint(src: Path, out: Path, overwrite: bool = False) -> dict:
    """Convert the community checkpoint at `src` into a qtool checkpoint at `out`; returns its manifest."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    kind = community_kind(src)
    if kind is None:
        raise QtoolError(f"{src} is not a GPTQ, AWQ or compressed-tensors checkpoint")
    qc = quantization_config(src)
    quiet_transformers()
    tensors = read_tensors(src)
    layers, grid = _layers(kind, qc, tensors, str(src))
    try:
        config = AutoConfig.from_pretrained(str(src))
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, KeyError) as e:
        raise QtoolError(f"cannot read {src}: {str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, layer in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"{src}: {name} is not a module of {type(model).__name__}") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (layer.out_features,
                                                                                     layer.in_features):
            raise QtoolError(f"{src}: {name} is stored as {layer.out_features}×{layer.in_features}, which does not "
                             f"fit the model's {old}")
        set_module(model, name, layer)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise QtoolError(f"{src}: tensors qtool cannot place: {result.unexpected_keys[:3]}")
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings",
                                                                 False):
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise QtoolError(f"{src}: no data for {leftover[:3]}")
    info = {"method": f"import:{kind}", **grid, "quantize_lm_head": "lm_head" in layers,
            "source": {"name": src.name, "path": str(src.resolve()), "sha256": hf_dir_fingerprint(src), "kind": kind},
            "calibration": None, "stats": {}}
    return save_checkpoint(model.eval(), tok, info, out, overwrite=overwrite)
