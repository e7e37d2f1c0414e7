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
import ctypes  # noqa: F401 (tests patch swap.ctypes.util)
import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from qtool.artifact import safetensors_io as st
from qtool.artifact.atomic import atomic_dir, dir_lock, exchange
from qtool.artifact.checkpoint import dump_manifest as _write_manifest  # the name tests patch
from qtool.artifact.delta import check_delta, read_delta
from qtool.artifact.scales import (  # noqa: F401 (combine_scales, install_scale_api: the API's old home)
    APPLIED_KEY,
    BASE_SCALES_FILE,
    SCALES_FILE,
    _read_scales,
    combine_scales,
    install_scale_api,
    load_scales,
    restore_base_scales,
)
from qtool.errors import QtoolError
from qtool.models.cache import sha256_file

MANIFEST = "qtool.json"


# ---------------------------------------------------------------- on disk


@dataclass
class SwapReport:
    path: Path
    task: str | None  # None after --base
    seconds: float
    linked: int  # files hard-linked from the source
    copied: int  # files copied because hard links were impossible


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


_exchange = exchange  # the name tests call


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
    # In place, the staged directory replaces model_dir by one atomic exchange (atomic_dir).
    with atomic_dir(target, overwrite=True) as tmp:
        yield tmp


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
    """Write s₀ + Δs as the checkpoint's scales (in place, or into a new directory `out_dir`).

    Holds the checkpoint's lock (atomic.dir_lock) throughout: a second swap-scales on the
    same directory waits for this one, then starts from what it wrote."""
    _read_manifest(Path(model_dir))  # a missing or foreign directory fails before any wait
    with dir_lock(Path(model_dir), "swapping the scales of"):
        return _swap_scales_dir(model_dir, delta_path, out_dir, overwrite)


def _swap_scales_dir(model_dir: Path, delta_path: Path, out_dir: Path | None, overwrite: bool) -> SwapReport:
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    info = _read_manifest(model_dir)
    delta = read_delta(Path(delta_path))
    check_delta(delta, info, str(model_dir))
    applied = info.get(APPLIED_KEY)
    base_name = BASE_SCALES_FILE if applied else SCALES_FILE
    base_path = _verified(model_dir, info, base_name)
    base, scales_meta = st.load(base_path, "scales file")
    new = {}
    for mod in info["modules"]:
        s0 = base.get(f"{mod}.scales")
        if s0 is None:
            raise QtoolError(f"{model_dir}: {base_name} has no scales for {mod}")
        if not s0.is_floating_point() or s0.shape != delta.tensors[mod].shape or not torch.isfinite(s0).all():
            raise QtoolError(f"{model_dir}: {base_name} holds bad scales for {mod} (dtype, shape or NaN)")
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
    """Put the base scales back: the directory returns to its original bytes (under the lock)."""
    _read_manifest(Path(model_dir))
    with dir_lock(Path(model_dir), "swapping the scales of"):
        return _restore_base_dir(model_dir, out_dir, overwrite)


def _restore_base_dir(model_dir: Path, out_dir: Path | None, overwrite: bool) -> SwapReport:
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
