"""The task-delta artifact: a PEQA task is its Δs, one small safetensors file.

Tensors: one per quantized Linear, keyed by the module name (e.g.
`model.layers.0.self_attn.q_proj`), float32 [out_features, n_groups] (n_groups = 1 per
channel). The task's scales are s = s₀ + Δs, rounded to the checkpoint's scale dtype.

Metadata (all strings, as safetensors requires):
  format = pt                  qtool.kind = scale-delta     qtool.format_version = 1
  qtool.base_fingerprint       the checkpoint's `fingerprint` (integer codes + base scales)
  qtool.bits, qtool.group_size ("channel" or an integer), qtool.method (peqa)
  qtool.task, qtool.steps, qtool.lr, qtool.seed
  qtool.metric_name, qtool.metric   final validation metric of the kept Δs (e.g. loss or accuracy)
  qtool.version                 the qtool that wrote it
  qtool.sha256                  content hash of the whole file (qtool/artifact/safetensors_io.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from qtool import __version__
from qtool.artifact import safetensors_io as st
from qtool.artifact.atomic import atomic_file
from qtool.errors import QtoolError

KIND = "scale-delta"
FORMAT_VERSION = "1"
DTYPE = torch.float32


@dataclass
class ScaleDelta:
    tensors: dict[str, Tensor]  # module name -> Δs fp32 [N, G]
    meta: dict[str, str]
    path: Path | None = None

    @property
    def base_fingerprint(self) -> str:
        return self.meta.get("qtool.base_fingerprint", "")

    @property
    def task(self) -> str:
        return self.meta.get("qtool.task", "?")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def grid_of(info: dict) -> tuple[str, str]:
    """(bits, group size) of a checkpoint as metadata strings; "mixed" if layers differ."""
    bits = {m.get("bits") for m in info.get("modules", {}).values()}
    groups = {m.get("group_size") for m in info.get("modules", {}).values()}
    b = str(bits.pop()) if len(bits) == 1 else "mixed"
    g = groups.pop() if len(groups) == 1 else "mixed"
    return b, "channel" if g is None else str(g)


def save_delta(path: Path, tensors: dict[str, Tensor], info: dict, **fields: object) -> int:
    """Write a Δs file for the checkpoint described by `info`; returns its size in bytes.

    `fields` become `qtool.<key>` metadata (task, steps, lr, seed, metric_name, metric, ...)."""
    bits, group = grid_of(info)
    meta = {"format": "pt", "qtool.kind": KIND, "qtool.format_version": FORMAT_VERSION,
            "qtool.base_fingerprint": str(info["fingerprint"]), "qtool.bits": bits, "qtool.group_size": group,
            "qtool.version": __version__}
    meta.update({f"qtool.{k}": str(v) for k, v in fields.items()})
    data = {name: t.detach().to("cpu", DTYPE).contiguous() for name, t in sorted(tensors.items())}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(data, str(tmp), metadata=st.seal_metadata(meta))
        st.seal(tmp)
    return path.stat().st_size


def read_delta(path: Path) -> ScaleDelta:
    path = Path(path)
    tensors, meta = st.load(path, "task delta")
    if meta.get("qtool.kind") != KIND:
        raise QtoolError(f"{path}: not a qtool scale-delta file (qtool.kind={meta.get('qtool.kind')!r})")
    if meta.get("qtool.format_version") != FORMAT_VERSION:
        raise QtoolError(f"{path}: scale-delta format version {meta.get('qtool.format_version')!r} is not "
                         f"supported by qtool {__version__} (reads {FORMAT_VERSION})")
    st.check_seal(path, meta, "train it again with `qtool finetune`")
    return ScaleDelta(tensors, meta, path)


def expected_shape(entry: dict) -> tuple[int, int]:
    K, g = entry["in_features"], entry.get("group_size")
    g = K if g is None else g
    return entry["out_features"], (K + g - 1) // g


def check_delta(delta: ScaleDelta, info: dict, where: str = "the checkpoint") -> None:
    """Refuse a Δs that was not made for this checkpoint, naming the first mismatch."""
    name = delta.path.name if delta.path else "the delta"
    fp = str(info.get("fingerprint", ""))
    if delta.base_fingerprint != fp:
        raise QtoolError(f"{name} was trained on base {delta.base_fingerprint[:12] or '?'}…, but {where} is "
                         f"{fp[:12]}… (task {delta.task!r}; a Δs only fits the checkpoint it was trained on)")
    modules = info.get("modules", {})
    missing = sorted(set(modules) - set(delta.tensors))
    extra = sorted(set(delta.tensors) - set(modules))
    if missing:
        raise QtoolError(f"{name} has no Δs for module {missing[0]} ({len(missing)} missing)")
    if extra:
        raise QtoolError(f"{name} has Δs for module {extra[0]}, which {where} does not quantize")
    for mod, entry in modules.items():
        t = delta.tensors[mod]
        if t.dtype != DTYPE:
            dtype = str(t.dtype).removeprefix("torch.")
            raise QtoolError(f"{name}: Δs of {mod} is {dtype}, expected float32")
        if tuple(t.shape) != expected_shape(entry):
            raise QtoolError(f"{name}: Δs of {mod} has shape {tuple(t.shape)}, "
                             f"expected {expected_shape(entry)}")
        if not torch.isfinite(t).all():
            raise QtoolError(f"{name}: Δs of {mod} holds NaN or infinite values")
