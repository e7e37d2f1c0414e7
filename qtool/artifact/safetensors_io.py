"""Reading safetensors files that may be damaged or hostile, and sealing the ones qtool writes.

`read_header` parses the 8-byte length and the JSON header itself and checks every tensor's
dtype, shape and byte range against the file size *before* anything is allocated, so a header
that declares a 1 TB tensor, overlapping ranges or a truncated body is refused with one line
instead of reaching the safetensors library (which would try to map or allocate it).

`seal` / `check_seal`: a content hash of the whole file in its own metadata. The key
`qtool.sha256` holds the sha256 of the file's bytes with that value replaced by 64 zeros, so
any changed byte, header or body, is detected; no second file is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from qtool.errors import QtoolError

SEAL_KEY = "qtool.sha256"
_PLACEHOLDER = "0" * 64
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIM = 1 << 40
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
TORCH_DTYPE = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
               "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
               "F64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_len: int
    file_size: int


def _bad(path: Path, why: str) -> QtoolError:
    return QtoolError(f"{path}: not a valid safetensors file ({why})")


def read_header(path: Path) -> Header:
    """Parse and check the header of `path` without reading the tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise QtoolError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"header is not JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ is not a map of strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_len)
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items())
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise _bad(path, f"tensor {_short(name)} starts at byte {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise _bad(path, f"tensors cover {pos} of {data_len} data bytes")
    return Header(tensors, meta, n, size)


def _short(name: str) -> str:
    return repr(name[:60] + ("…" if len(name) > 60 else ""))


def _tensor_info(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"entry {_short(name)} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _bad(path, f"tensor {_short(name)} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < MAX_DIM for d in shape):
        raise _bad(path, f"tensor {_short(name)} has an invalid shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise _bad(path, f"tensor {_short(name)} has byte range {str(offsets)[:40]} outside the {data_len}-byte body")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise _bad(path, f"tensor {_short(name)} declares {numel} x {dtype} but spans {offsets[1] - offsets[0]} bytes")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load(path: Path, what: str = "file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, after `read_header` has checked it."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"{what} {path} not found")
    header = read_header(path)
    for name, t in header.tensors.items():
        if t.dtype not in TORCH_DTYPE:
            raise _bad(path, f"tensor {_short(name)} has dtype {t.dtype}, which qtool never writes")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(header.metadata)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QtoolError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _digest(path: Path, value_at: int) -> str:
    """sha256 of the file with the 64 characters at `value_at` read as zeros."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(value_at))
        f.seek(64, os.SEEK_CUR)
        h.update(_PLACEHOLDER.encode())
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _seal_offset(path: Path, header: Header, value: str) -> int:
    """Byte offset of the seal value inside the header (it appears exactly once)."""
    with open(path, "rb") as f:
        raw = f.read(8 + header.header_len)
    needle = f'"{SEAL_KEY}":"{value}"'.encode()
    at = raw.find(needle)
    if at < 0 or raw.find(needle, at + 1) >= 0:
        raise _bad(path, f"{SEAL_KEY} is not stored as one plain JSON string")
    return at + len(needle) - 65


def seal_metadata(meta: dict[str, str]) -> dict[str, str]:
    """`meta` with a placeholder seal; pass it to save_file, then call `seal` on the file."""
    return {**meta, SEAL_KEY: _PLACEHOLDER}


def seal(path: Path) -> str:
    """Write the content hash into a file saved with `seal_metadata`. Returns the hash."""
    path = Path(path)
    header = read_header(path)
    at = _seal_offset(path, header, _PLACEHOLDER)
    digest = _digest(path, at)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())
    return digest


def check_seal(path: Path, meta: dict[str, str], remake: str) -> None:
    """Refuse a file whose content hash is missing or does not match its bytes.

    `remake` says how to make the file again (a missing seal means an older qtool wrote it)."""
    path = Path(path)
    value = meta.get(SEAL_KEY)
    if value is None:
        raise QtoolError(f"{path}: no content hash ({SEAL_KEY}; written by an older qtool?): {remake}")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise QtoolError(f"{path}: malformed content hash {SEAL_KEY}")
    header = read_header(path)
    if _digest(path, _seal_offset(path, header, value)) != value:
        raise QtoolError(f"{path} is corrupted (content hash mismatch): {remake}")
