"""The LoRA/DoRA adapter artifact, in PEFT's on-disk format so PEFT tooling reads it as is.

A directory with
  adapter_config.json        PEFT's LoraConfig fields (peft_type LORA, r, lora_alpha, lora_dropout,
                             target_modules, use_dora, ...); nothing qtool-specific, so
                             `PeftModel.from_pretrained` accepts it unchanged
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight   [r, in]   fp32
                             base_model.model.<module>.lora_B.weight   [out, r]  fp32
                             base_model.model.<module>.lora_magnitude_vector [out] (DoRA only)
                             metadata: format = pt, qtool.kind = lora-adapter, qtool.format_version,
                             qtool.base_fingerprint (the int/NF4 base it was trained or initialised
                             on), qtool.init (default | apiq-bw | apiq-lw | loftq | trained),
                             and free-form qtool.<field> (task, steps, lr, seed, metric ...),
                             qtool.config_sha256 (sha256 of adapter_config.json's bytes),
                             qtool.sha256 (content hash of the file, checked on read; PEFT
                             ignores metadata other than `format`)
<module> is the Hugging Face module name (`model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from qtool import __version__
from qtool.artifact import safetensors_io as st
from qtool.artifact.atomic import atomic_dir
from qtool.errors import QtoolError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
KIND = "lora-adapter"
FORMAT_VERSION = "1"
PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


@dataclass
class AdapterSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    dora: bool = False
    targets: tuple[str, ...] = ()

    def peft_config(self, base_name: str | None = None) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(self.targets), "use_dora": self.dora,
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "modules_to_save": None, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "layers_pattern": None, "base_model_name_or_path": base_name,
                "revision": None}


@dataclass
class Adapter:
    spec: AdapterSpec
    tensors: dict[str, dict[str, Tensor]]  # module name -> {"lora_A.weight": ..., ...}
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_fingerprint(self) -> str:
        return self.meta.get("qtool.base_fingerprint", "")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.tensors.values() for t in parts.values())


def flat_to_modules(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{'<module>.lora_A.weight': t, ...} (a wrapped model's state-dict names) -> per module."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        for part in PARTS:
            if key.endswith("." + part):
                out.setdefault(key[: -len(part) - 1], {})[part] = t
                break
        else:
            raise QtoolError(f"not a LoRA tensor name: {key}")
    return out


def save_adapter(out_dir: Path, tensors: dict[str, dict[str, Tensor]], spec: AdapterSpec, base_fingerprint: str,
                 init: str = "trained", overwrite: bool = False, base_name: str | None = None,
                 **fields: object) -> int:
    """Write the adapter directory atomically; returns the size of its weights file in bytes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise QtoolError(f"output {out_dir} exists (use --overwrite)")
    data: dict[str, Tensor] = {}
    for module, parts in sorted(tensors.items()):
        missing = {"lora_A.weight", "lora_B.weight"} - set(parts)
        if missing:
            raise QtoolError(f"adapter for {module} lacks {sorted(missing)[0]}")
        for part, t in parts.items():
            data[f"{PREFIX}{module}.{part}"] = t.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": "pt", "qtool.kind": KIND, "qtool.format_version": FORMAT_VERSION,
            "qtool.base_fingerprint": str(base_fingerprint), "qtool.init": init, "qtool.version": __version__}
    meta.update({f"qtool.{k}": str(v) for k, v in fields.items()})
    config = (json.dumps(spec.peft_config(base_name), indent=2) + "\n").encode()
    meta["qtool.config_sha256"] = hashlib.sha256(config).hexdigest()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG).write_bytes(config)
        save_file(data, str(tmp / WEIGHTS), metadata=st.seal_metadata(meta))
        st.seal(tmp / WEIGHTS)
    return (out_dir / WEIGHTS).stat().st_size


def read_adapter(path: Path) -> Adapter:
    """Read and validate an adapter directory (ours or PEFT's own LoRA output)."""
    path = Path(path)
    if not path.is_dir():
        raise QtoolError(f"{path}: not an adapter directory (expected {CONFIG} and {WEIGHTS})")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise QtoolError(f"{path}: missing {name}")
    spec = _read_config(path / CONFIG)
    flat, meta = st.load(path / WEIGHTS, "adapter weights")
    if any(k.startswith("qtool.") for k in meta):  # ours: sealed. PEFT's own carry no qtool metadata.
        if meta.get("qtool.kind") != KIND:
            raise QtoolError(f"{path / WEIGHTS}: not a LoRA adapter (qtool.kind={str(meta.get('qtool.kind'))[:40]!r})")
        st.check_seal(path / WEIGHTS, meta, "make the adapter again (qtool quantize / finetune)")
        if meta.get("qtool.config_sha256") != hashlib.sha256((path / CONFIG).read_bytes()).hexdigest():
            raise QtoolError(f"{path / CONFIG} was changed after qtool wrote it (sha256 differs from "
                             f"{WEIGHTS}'s qtool.config_sha256): make the adapter again")
    bad = [k for k in flat if not k.startswith(PREFIX)]
    if not flat:
        raise QtoolError(f"{path / WEIGHTS}: holds no LoRA tensors")
    if bad:
        raise QtoolError(f"{path / WEIGHTS}: unexpected tensor {bad[0]} (PEFT keys start with {PREFIX})")
    # PEFT may name the adapter inside keys ("lora_A.default.weight") in some versions: accept both.
    flat = {k.removeprefix(PREFIX).replace(".default.", "."): v for k, v in flat.items()}
    tensors = flat_to_modules(flat)
    for module, parts in tensors.items():
        A, B = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if A is None or B is None:
            raise QtoolError(f"{path / WEIGHTS}: {module} lacks lora_A or lora_B")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != spec.rank or B.shape[1] != spec.rank:
            raise QtoolError(f"{path / WEIGHTS}: {module} has A {tuple(A.shape)}, B {tuple(B.shape)}, "
                             f"not rank {spec.rank}")
        m = parts.get("lora_magnitude_vector")
        if spec.dora != (m is not None):
            raise QtoolError(f"{path / WEIGHTS}: {module} magnitude vector does not match use_dora={spec.dora}")
        if m is not None and tuple(m.shape) != (B.shape[0],):
            raise QtoolError(f"{path / WEIGHTS}: {module} magnitude vector has shape {tuple(m.shape)}, "
                             f"expected ({B.shape[0]},)")
        for part, t in parts.items():
            if not t.is_floating_point():
                raise QtoolError(f"{path / WEIGHTS}: {module}.{part} is {str(t.dtype).removeprefix('torch.')}, "
                                 "not a floating-point tensor")
            if not torch.isfinite(t).all():
                raise QtoolError(f"{path / WEIGHTS}: {module}.{part} holds NaN or infinite values")
    return Adapter(spec, tensors, meta, path)


def _read_config(path: Path) -> AdapterSpec:
    """adapter_config.json, field by field: PEFT's LoraConfig subset that qtool implements."""
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise QtoolError(f"{path}: not valid JSON ({str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise QtoolError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        peft_type = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise QtoolError(f"{path}: not a LoRA adapter config (peft_type {str(peft_type)[:40]!r})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        raise QtoolError(f"{path}: rank_pattern, alpha_pattern and use_rslora are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    dropout, dora = cfg.get("lora_dropout", 0.0), cfg.get("use_dora", False)
    targets = cfg.get("target_modules") or []
    if not _is_int(r) or not 1 <= r <= 65536:
        raise QtoolError(f"{path}: r must be an integer in [1, 65536], got {str(r)[:40]}")
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha == 0:
        raise QtoolError(f"{path}: lora_alpha must be a finite non-zero number, got {str(alpha)[:40]}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise QtoolError(f"{path}: lora_dropout must be in [0, 1), got {str(dropout)[:40]}")
    if not isinstance(dora, bool):
        raise QtoolError(f"{path}: use_dora must be true or false, got {str(dora)[:40]}")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise QtoolError(f"{path}: target_modules must be a list of names")
    return AdapterSpec(r, float(alpha), float(dropout), dora, tuple(targets))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_adapter(adapter: Adapter, layers: dict, fingerprint: str | None, where: str = "the model") -> None:
    """Refuse an adapter whose modules or shapes do not fit `layers` (name -> Linear-like), or
    that was made for another base (when both fingerprints are known)."""
    fp = adapter.base_fingerprint
    if fp and fingerprint and fp != fingerprint:
        raise QtoolError(f"{adapter.path}: made for base {fp[:12]}, but {where} is {fingerprint[:12]}")
    for module, parts in adapter.tensors.items():
        layer = layers.get(module)
        if layer is None:
            raise QtoolError(f"{adapter.path}: module {module} is not a linear layer of {where}")
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise QtoolError(f"{adapter.path}: {module} expects {A.shape[1]}→{B.shape[0]}, "
                             f"{where} has {layer.in_features}→{layer.out_features}")
