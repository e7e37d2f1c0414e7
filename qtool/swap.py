"""Switch a quantized model between tasks by replacing its scales (PEQA).

One formula everywhere: s = (s₀ + Δs) rounded to the scale dtype (`combine_scales`), so
a Δs applied in memory (`load_scales`, `qtool eval --delta`) and one swapped into a
checkpoint directory (`qtool swap-scales`) give bit-identical scales.

On disk (docs/methods/peqa.md): the checkpoint keeps its scales in `scales.safetensors`. The first
swap keeps the base scales as `base_scales.safetensors` (a hard link to the original file,
so byte-identical) and records the applied Δs under "scale_delta" in qtool.json; later
swaps start again from the base, and `--base` puts the original file back, so the
directory returns to exactly its original bytes. Every change is built in a staging
directory beside the checkpoint (unchanged files hard-linked, or copied when links are
impossible) and committed with one atomic directory exchange (renameat2 RENAME_EXCHANGE on
Linux), so a reader sees either the old or the new checkpoint, never a half-swapped one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qtool.artifact.checkpoint import dump_manifest as _write_manifest  # the name tests patch
from qtool.artifact.delta import ScaleDelta, check_delta, read_delta
from qtool.errors import QtoolError
from qtool.models.load import sha256_file

MANIFEST = "qtool.json"
SCALES_FILE = "scales.safetensors"
BASE_SCALES_FILE = "base_scales.safetensors"
APPLIED_KEY = "scale_delta"


def combine_scales(s0: Tensor, delta: Tensor) -> Tensor:
    """s = s₀ + Δs, added in fp32 and rounded once to s₀'s dtype (the stored scale dtype)."""
    s = (s0.float() + delta.to(s0.device, torch.float32)).to(s0.dtype)
    if not torch.isfinite(s).all():
        raise QtoolError("s0 + Δs overflows the scale dtype")
    return s


# ---------------------------------------------------------------- in memory


def _quant_linears(model: nn.Module) -> dict:
    from qtool.nn.replace import quant_linears

    return quant_linears(model)


def install_scale_api(model: nn.Module, info: dict, path: Path | None = None) -> nn.Module:
    """Give a loaded checkpoint's model `model.load_scales(path)` and `model.restore_base_scales()`.

    `info` is the checkpoint manifest (its fingerprint validates every Δs); `path` is the
    checkpoint directory, needed when it was loaded with a Δs already swapped in (the base
    scales are then read from base_scales.safetensors)."""
    model._qtool_info = info
    model._qtool_dir = Path(path) if path is not None else None
    model.load_scales = types.MethodType(load_scales, model)
    model.restore_base_scales = types.MethodType(restore_base_scales, model)
    # Capture s0 now, in the stored dtype, before anything (e.g. a cast to bf16 for
    # evaluation) can change the live scales.
    _base_scales(model)
    return model


def _base_scales(model: nn.Module) -> dict[str, Tensor]:
    """The base s₀ of every QuantLinear, captured once (the first time a Δs is applied)."""
    base = getattr(model, "_qtool_base_scales", None)
    if base is not None:
        return base
    info = getattr(model, "_qtool_info", None) or {}
    ckpt = getattr(model, "_qtool_dir", None)
    if info.get(APPLIED_KEY):
        if ckpt is None:
            raise QtoolError("this model was loaded with task scales swapped in; install_scale_api needs its "
                             "directory to find the base scales")
        saved = _read_scales(ckpt / BASE_SCALES_FILE)
        base = {n: saved[f"{n}.scales"] for n in _quant_linears(model)}
    else:
        base = {n: m.scales.detach().to("cpu", copy=True) for n, m in _quant_linears(model).items()}
    model._qtool_base_scales = base
    return base


def load_scales(model: nn.Module, path: Path | str | ScaleDelta, info: dict | None = None) -> ScaleDelta:
    """Apply a task's Δs in memory: every QuantLinear's scales become s₀ + Δs. The integer
    codes are untouched, so switching tasks costs one small copy per layer. Returns the delta."""
    info = info if info is not None else getattr(model, "_qtool_info", None)
    if info is None:
        raise QtoolError("load_scales needs the checkpoint manifest (load the model with load_checkpoint)")
    delta = path if isinstance(path, ScaleDelta) else read_delta(Path(path))
    check_delta(delta, info, "this model")
    layers = _quant_linears(model)
    base = _base_scales(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.scales.copy_(combine_scales(base[name].to(layer.scales.device), delta.tensors[name]))
    model._qtool_applied = delta.task
    return delta


def restore_base_scales(model: nn.Module) -> None:
    """Undo load_scales: put the base s₀ back, bit-exact."""
    base = getattr(model, "_qtool_base_scales", None)
    if base is None:
        return
    with torch.no_grad():
        for name, layer in _quant_linears(model).items():
            layer.scales.copy_(base[name].to(layer.scales.device))
    model._qtool_applied = None


apply_delta = load_scales  # the name `qtool eval --delta` uses


# ---------------------------------------------------------------- on disk


@dataclass
class SwapReport:
    path: Path
    task: str | None  # None after --base
    seconds: float
    linked: int  # files hard-linked from the source
    copied: int  # files copied because hard links were impossible


def _read_scales(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise QtoolError(f"{path}: cannot read scales ({e})") from None


def _read_manifest(model_dir: Path) -> dict:
    from qtool.artifact.checkpoint import read_manifest

    return read_manifest(model_dir)


def _verified(model_dir: Path, info: dict, name: str) -> Path:
    """The file, after checking it against the manifest's sha256 (small files only)."""
    path = model_dir / name
    want = info.get("files", {}).get(name)
    if not path.is_file() or want is None:
        raise QtoolError(f"{model_dir}: {name} is missing")
    if sha256_file(path) != want:
        raise QtoolError(f"{model_dir}: {name} is corrupted (sha256 mismatch with {MANIFEST})")
    return path


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard link (True) or, across file systems / where links are refused, copy (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(src, dst)
        return False


def _exchange(a: Path, b: Path) -> None:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere fall
    back to two renames, leaving a window of microseconds in which `b` is absent."""
    libc_name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if fn is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(b))
    tmp = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.replace(b, tmp)
    os.replace(a, b)
    os.replace(tmp, a)


@contextlib.contextmanager
def _staging(model_dir: Path, out_dir: Path | None, overwrite: bool):
    """Yields an empty staging directory; on success it becomes `out_dir`, or replaces
    `model_dir` in place by an atomic exchange. On failure nothing changes."""
    target = model_dir if out_dir is None else out_dir
    if out_dir is not None:
        if out_dir.resolve() == model_dir.resolve():
            raise QtoolError("-o must differ from MODEL_DIR (omit -o to swap in place)")
        if out_dir.exists() and not overwrite:
            raise QtoolError(f"output {out_dir} exists (use --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.swap-"))
    try:
        yield tmp
        if out_dir is None or out_dir.exists():
            _exchange(tmp, target)  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _populate(src: Path, dst: Path, skip: set[str]) -> tuple[int, int]:
    linked = copied = 0
    for f in sorted(src.iterdir()):
        if f.name in skip or not f.is_file():
            continue
        if _link_or_copy(f, dst / f.name):
            linked += 1
        else:
            copied += 1
    return linked, copied


def swap_scales_dir(model_dir: Path, delta_path: Path, out_dir: Path | None = None,
                    overwrite: bool = False) -> SwapReport:
    """Write s₀ + Δs as the checkpoint's scales (in place, or into a new directory `out_dir`)."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    info = _read_manifest(model_dir)
    delta = read_delta(Path(delta_path))
    check_delta(delta, info, str(model_dir))
    applied = info.get(APPLIED_KEY)
    base_name = BASE_SCALES_FILE if applied else SCALES_FILE
    base_path = _verified(model_dir, info, base_name)
    base = _read_scales(base_path)
    with safe_open(str(base_path), framework="pt") as f:
        scales_meta = dict(f.metadata() or {})
    new = {}
    for mod in info["modules"]:
        s0 = base.get(f"{mod}.scales")
        if s0 is None:
            raise QtoolError(f"{model_dir}: {base_name} has no scales for {mod}")
        new[f"{mod}.scales"] = combine_scales(s0, delta.tensors[mod])
    delta_sha = sha256_file(delta.path)
    with _staging(model_dir, out_dir, overwrite) as tmp:
        linked, copied = _populate(model_dir, tmp, {SCALES_FILE, BASE_SCALES_FILE, MANIFEST})
        if _link_or_copy(base_path, tmp / BASE_SCALES_FILE):
            linked += 1
        else:
            copied += 1
        save_file(new, str(tmp / SCALES_FILE), metadata={**scales_meta, "qtool.task": delta.task})
        files = dict(info["files"])
        files[BASE_SCALES_FILE] = info["files"][base_name]
        files[SCALES_FILE] = sha256_file(tmp / SCALES_FILE)
        out = {k: v for k, v in info.items() if k != APPLIED_KEY}
        out["files"] = dict(sorted(files.items()))
        out[APPLIED_KEY] = {"task": delta.task, "delta_file": delta.path.name, "delta_sha256": delta_sha,
                            "steps": delta.meta.get("qtool.steps"), "metric": delta.meta.get("qtool.metric")}
        _write_manifest(tmp, out)
    return SwapReport(out_dir or model_dir, delta.task, time.perf_counter() - t0, linked, copied)


def restore_base_dir(model_dir: Path, out_dir: Path | None = None, overwrite: bool = False) -> SwapReport:
    """Put the base scales back: the directory returns to its original bytes."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    info = _read_manifest(model_dir)
    if not info.get(APPLIED_KEY):
        raise QtoolError(f"{model_dir} already has its base scales (no task scales were swapped in)")
    base_path = _verified(model_dir, info, BASE_SCALES_FILE)
    with _staging(model_dir, out_dir, overwrite) as tmp:
        linked, copied = _populate(model_dir, tmp, {SCALES_FILE, BASE_SCALES_FILE, MANIFEST})
        if _link_or_copy(base_path, tmp / SCALES_FILE):
            linked += 1
        else:
            copied += 1
        files = dict(info["files"])
        files[SCALES_FILE] = files.pop(BASE_SCALES_FILE)
        out = {k: v for k, v in info.items() if k != APPLIED_KEY}
        out["files"] = dict(sorted(files.items()))
        _write_manifest(tmp, out)
    return SwapReport(out_dir or model_dir, None, time.perf_counter() - t0, linked, copied)
