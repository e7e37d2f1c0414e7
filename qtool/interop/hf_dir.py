"""Reading and writing plain Hugging Face model directories (the container of every community format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from qtool.errors import QtoolError

SHARD_BYTES = 2 * 1024**3
# Files of a qtool checkpoint that are not part of the HF model it describes.
QTOOL_FILES = ("qtool.json", "scales.safetensors", "base_scales.safetensors", "model.safetensors.index.json",
               "config.json")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, generation config, chat templates...: everything at the top level of
    `src` that is neither a tensor file nor qtool's own. Returns the names copied."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.name in QTOOL_FILES or f.suffix == ".safetensors" or f.name.startswith("."):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def write_config(src: Path, dst: Path, quantization_config: dict | None) -> dict:
    """config.json of `src` with `quantization_config` set (or removed when None)."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (Path(dst) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def write_tensors(dst: Path, tensors: dict[str, Tensor], limit: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index above `limit` bytes."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(Path(dst) / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(Path(dst) / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (Path(dst) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of an HF directory's safetensors files (the index, when present, names them)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise QtoolError(f"{index}: corrupted index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise QtoolError(f"{path}: no safetensors weights (qtool reads safetensors only, never pickle)")
    out: dict[str, Tensor] = {}
    for name in files:
        f = path / name
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise QtoolError(f"{f}: cannot read ({e})") from None
    return out


def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise QtoolError(f"{path} is not a Hugging Face model directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolError(f"{f}: corrupted ({e})") from None
    if not isinstance(cfg, dict):
        raise QtoolError(f"{f}: not a JSON object")
    return cfg


def exact_cast(t: Tensor, dtype: torch.dtype) -> Tensor | None:
    """`t` in `dtype` when that loses nothing, else None."""
    c = t.to(dtype)
    return c if torch.equal(c.to(t.dtype), t) else None
