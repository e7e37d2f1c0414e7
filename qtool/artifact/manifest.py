"""qtool.json, checked field by field before anything else in a checkpoint is read.

The manifest is not hashed (swap-scales rewrites it), so every field that loading uses is
checked for type and range here, and `files` must cover every file loading reads. Free-form
fields (source, calibration, stats, versions, created) only need the right type: they label
results and never decide how tensors are read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from qtool.errors import QtoolError

FORMAT = "qtool-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "qtool.json"
SUPPORTED_BITS = (2, 3, 4, 8)  # qtool.quant.grid.SUPPORTED_BITS
INT_GROUPS = (32, 64, 128)  # qtool.quant.grid.SUPPORTED_GROUPS
NF4_BLOCKS = (32, 64, 128, 256)  # qtool.quant.nf4.BLOCK_SIZES
SCALE_DTYPES = ("float16", "bfloat16", "float32")
MAX_FEATURES = 1 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
INT_KEYS = {"kind", "bits", "group_size", "in_features", "out_features", "bias", "act_order", "scale_dtype"}
NF4_KEYS = {"kind", "block_size", "double_quant", "in_features", "out_features", "bias"}
# files that a Hugging Face loader may read from the directory: each must be covered by `files`
_READ_BY_LOADERS = re.compile(r".*\.(json|safetensors|model|txt|jinja|bin|py|tiktoken)")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: object) -> str:
    s = repr(x)
    return s if len(s) <= 40 else s[:40] + "…"


def validate(info: object, path: Path) -> dict:
    """Refuse a manifest with a missing, ill-typed or out-of-range field (one line, QtoolError)."""
    mf = Path(path) / MANIFEST

    def bad(why: str) -> QtoolError:
        return QtoolError(f"{mf}: {why}")

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    if info.get("format") != FORMAT:
        raise bad("not a qtool checkpoint manifest")
    if info.get("format_version") != FORMAT_VERSION or not _is_int(info.get("format_version")):
        from qtool import __version__

        raise QtoolError(f"{path}: checkpoint format version {_short(info.get('format_version'))} is not "
                         f"supported by qtool {__version__} (reads version {FORMAT_VERSION})")
    for key in ("modules", "fingerprint", "files"):
        if key not in info:
            raise bad(f"missing field {key!r}")
    types = {"method": str, "symmetric": bool, "act_order": bool, "quantize_lm_head": bool, "source": dict,
             "calibration": (dict, type(None)), "stats": dict, "tied": list, "versions": dict, "created": str,
             "fingerprint": str, "modules": dict, "files": dict, "scale_delta": (dict, type(None)),
             "adapter": str}
    for key, want in types.items():
        if key in info and not isinstance(info[key], want):
            raise bad(f"field {key!r} has the wrong type ({type(info[key]).__name__})")
    if "bits" in info and (not _is_int(info["bits"]) or info["bits"] not in SUPPORTED_BITS):
        raise bad(f"bits must be one of {SUPPORTED_BITS}, got {_short(info['bits'])}")
    g = info.get("group_size")
    if g is not None and (not _is_int(g) or g not in INT_GROUPS + NF4_BLOCKS):
        raise bad(f"group_size must be null or one of {sorted(set(INT_GROUPS + NF4_BLOCKS))}, got {_short(g)}")
    if not _SHA.fullmatch(info["fingerprint"]):
        raise bad("fingerprint is not a sha256 hex digest")
    if not all(isinstance(t, str) for t in info.get("tied", [])):
        raise bad("tied must be a list of tensor names")
    if not all(isinstance(v, str) for v in info.get("versions", {}).values()):
        raise bad("versions must map names to strings")
    _check_stats(info.get("stats", {}), bad)
    _check_files(info["files"], bad)
    _check_modules(info["modules"], bad)
    int_modules = [m for m in info["modules"].values() if m["kind"] == "int"]
    for key in ("bits", "group_size"):
        values = {m[key] for m in int_modules}
        if key in info and len(values) == 1 and len(int_modules) == len(info["modules"]) and info[key] not in values:
            raise bad(f"{key} {_short(info[key])} disagrees with its modules' {values.pop()}")
    sd = info.get("scale_delta")
    if sd:
        for key in ("task", "delta_file", "delta_sha256"):
            if not isinstance(sd.get(key), str):
                raise bad(f"scale_delta.{key} must be a string")
        if not all(sd.get(k) is None or isinstance(sd.get(k), str) for k in ("steps", "metric")):
            raise bad("scale_delta.steps and .metric must be strings")
    return info


def _check_stats(stats: dict, bad) -> None:
    """Numbers in stats must be finite JSON numbers (they are printed and compared)."""
    stack = [stats]
    while stack:
        node = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad("stats holds a non-finite number")
            if isinstance(v, dict | list):
                stack.append(v)


def _check_files(files: dict, bad) -> None:
    for name, digest in files.items():
        if not _FILE.fullmatch(name) or name in (".", "..", MANIFEST):
            raise bad(f"files lists {_short(name)}, not a plain file name of the checkpoint")
        if not isinstance(digest, str) or not _SHA.fullmatch(digest):
            raise bad(f"files[{_short(name)}] is not a sha256 hex digest")
    for need in ("config.json", "scales.safetensors"):
        if need not in files:
            raise bad(f"files does not cover {need}")
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        raise bad("files covers neither model.safetensors nor model.safetensors.index.json")


def _check_modules(modules: dict, bad) -> None:
    if not modules:
        raise bad("modules is empty")
    for name, m in modules.items():
        where = f"modules[{_short(name)}]"
        if not isinstance(m, dict):
            raise bad(f"{where} is not an object")
        kind = m.get("kind")
        keys = INT_KEYS if kind == "int" else NF4_KEYS if kind == "nf4" else None
        if keys is None:
            raise bad(f"{where} has kind {_short(kind)}, not supported by this qtool")
        if set(m) != keys:
            odd = sorted(set(m) ^ keys)[0]
            raise bad(f"{where} has {'an unknown' if odd in m else 'no'} field {_short(odd)}")
        for key in ("in_features", "out_features"):
            if not _is_int(m[key]) or not 1 <= m[key] <= MAX_FEATURES:
                raise bad(f"{where}.{key} must be an integer in [1, {MAX_FEATURES}], got {_short(m[key])}")
        for key in ("bias", "act_order", "double_quant"):
            if key in m and not isinstance(m[key], bool):
                raise bad(f"{where}.{key} must be true or false, got {_short(m[key])}")
        if kind == "int":
            if not _is_int(m["bits"]) or m["bits"] not in SUPPORTED_BITS:
                raise bad(f"{where}.bits must be one of {SUPPORTED_BITS}, got {_short(m['bits'])}")
            if m["group_size"] is not None and (not _is_int(m["group_size"]) or m["group_size"] not in INT_GROUPS):
                raise bad(f"{where}.group_size must be null or one of {INT_GROUPS}, got {_short(m['group_size'])}")
            if m["scale_dtype"] not in SCALE_DTYPES:
                raise bad(f"{where}.scale_dtype must be one of {SCALE_DTYPES}, got {_short(m['scale_dtype'])}")
        elif not _is_int(m["block_size"]) or m["block_size"] not in NF4_BLOCKS:
            raise bad(f"{where}.block_size must be one of {NF4_BLOCKS}, got {_short(m['block_size'])}")


def check_directory(path: Path, info: dict) -> None:
    """Every file a loader may read must be covered by `files` (so its sha256 is checked)."""
    listed = set(info["files"])
    for p in sorted(Path(path).iterdir()):
        if p.name.startswith(".") or p.name == MANIFEST or not p.is_file():
            continue
        if p.name not in listed and _READ_BY_LOADERS.fullmatch(p.name):
            raise QtoolError(f"{path}: {p.name} is not covered by the sha256 list in {MANIFEST}")
