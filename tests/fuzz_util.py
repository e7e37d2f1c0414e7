"""Mutations of artifact files for the reader fuzz (tests/test_fuzz_artifacts.py).

Every mutator takes the seed file's bytes and a seeded random.Random and returns new bytes;
each is a distinct kind of damage, so the report can count outcomes per kind.
"""

from __future__ import annotations

import json
import random
import struct

from qtool.artifact import safetensors_io as st

DTYPES = list(st.DTYPE_BYTES)


def split(data: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def truncations(data: bytes, rng: random.Random, k: int) -> list[tuple[str, bytes]]:
    """Cut inside the length prefix, inside the header, at its end, inside each tensor, and the last byte."""
    n, header, _ = split(data)
    cuts = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, len(data) - 1}
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            b, e = entry["data_offsets"]
            if e > b:
                cuts.add(8 + n + (b + e) // 2)
    cuts |= {rng.randrange(len(data)) for _ in range(k)}
    return [("truncate", data[:c]) for c in sorted(cuts) if c < len(data)]


def flips(data: bytes, rng: random.Random, k: int, region: str) -> list[tuple[str, bytes]]:
    n = struct.unpack("<Q", data[:8])[0]
    lo, hi = (0, 8 + n) if region == "header" else (8 + n, len(data))
    out = []
    for _ in range(k):
        if hi <= lo:
            break
        pos = rng.randrange(lo, hi)
        b = bytearray(data)
        b[pos] ^= rng.randrange(1, 256)
        out.append((f"flip-{region}", bytes(b)))
    return out


def header_edits(data: bytes, rng: random.Random, tensors: int = 4) -> list[tuple[str, bytes]]:
    """Well-formed JSON headers that say something wrong about the tensors."""
    n, header, body = split(data)
    names = [k for k in header if k != "__metadata__"]
    out = []

    def edit(kind: str, fn) -> None:
        h = json.loads(json.dumps(header))
        fn(h)
        out.append((kind, join(h, body)))

    for name in names[:tensors]:
        e = header[name]
        same = [d for d in DTYPES if st.DTYPE_BYTES[d] == st.DTYPE_BYTES[e["dtype"]] and d != e["dtype"]]
        other = [d for d in DTYPES if st.DTYPE_BYTES[d] != st.DTYPE_BYTES[e["dtype"]]]
        edit("dtype-same-size", lambda h, name=name, d=rng.choice(same): h[name].update(dtype=d))
        edit("dtype-other-size", lambda h, name=name, d=rng.choice(other): h[name].update(dtype=d))
        edit("dtype-unknown", lambda h, name=name: h[name].update(dtype="Q4"))
        edit("shape-reversed", lambda h, name=name: h[name].update(shape=h[name]["shape"][::-1] + [1]))
        edit("shape-flat", lambda h, name=name: h[name].update(shape=[max(1, _numel(h[name]["shape"]))]))
        edit("shape-wrong", lambda h, name=name: h[name].update(shape=[d + 1 for d in h[name]["shape"]]))
        edit("shape-negative", lambda h, name=name: h[name].update(shape=[-1, 4]))
        edit("shape-float", lambda h, name=name: h[name].update(shape=[2.5]))
        edit("shape-1TB", lambda h, name=name: h[name].update(shape=[1 << 20, 1 << 18], dtype="F32"))
        if e["data_offsets"][0] > 0:
            edit("offsets-overlap", lambda h, name=name: h[name].update(data_offsets=[0, h[name]["data_offsets"][1]]))
        edit("offsets-past-end", lambda h, name=name: h[name].update(
            data_offsets=[h[name]["data_offsets"][0], h[name]["data_offsets"][1] + 4096]))
        edit("offsets-huge", lambda h, name=name: h[name].update(data_offsets=[0, 1 << 62]))
        edit("entry-missing-key", lambda h, name=name: h[name].pop("shape"))
        edit("entry-extra-key", lambda h, name=name: h[name].update(extra=1))
        edit("entry-not-object", lambda h, name=name: h.update({name: [1, 2]}))
        edit("tensor-renamed", lambda h, name=name: h.update({"../../etc/passwd": h.pop(name)}))
    edit("metadata-not-strings", lambda h: h.update(__metadata__={"format": 1}))
    edit("metadata-list", lambda h: h.update(__metadata__=["a"]))
    edit("metadata-dropped", lambda h: h.pop("__metadata__", None))
    edit("entry-null", lambda h: (h.clear(), h.update({"x": None})))
    out.append(("header-len-huge", struct.pack("<Q", 1 << 60) + data[8:]))
    out.append(("header-len-zero", struct.pack("<Q", 0) + data[8:]))
    out.append(("header-len-short", struct.pack("<Q", max(0, n - 8)) + data[8:]))
    out.append(("header-len-long", struct.pack("<Q", n + 8) + data[8:]))
    out.append(("header-deep-json", struct.pack("<Q", 20000) + b"[" * 20000))
    huge = b"9" * 5000  # more digits than Python's int parser allows
    out.append(("header-huge-int", _raw_header(b'{"a":{"dtype":"F32","shape":[' + huge + b'],"data_offsets":[0,0]}}')))
    out.append(("header-not-utf8", _raw_header(b'{"\xff\xfe":1}')))
    return out


def _raw_header(raw: bytes) -> bytes:
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def garbage(rng: random.Random, data: bytes) -> list[tuple[str, bytes]]:
    out = [("empty", b""), ("one-byte", b"\x00"), ("eight-zero-bytes", b"\x00" * 8)]
    for size in (16, 100, len(data)):
        out.append(("random-bytes", rng.randbytes(size)))
    out.append(("random-body-valid-prefix", data[:8] + rng.randbytes(len(data) - 8)))
    out.append(("json-instead", b'{"format": "pt"}'))
    out.append(("doubled", data + data))
    out.append(("appended-byte", data + b"\x00"))
    return out


def reseal(data: bytes) -> bytes | None:
    """The mutated bytes with a fresh, matching content hash (None if the header no longer parses
    as one): what a deliberate edit, not damage, looks like, so semantic checks are exercised."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        try:
            n, header, body = split(data)
            meta = header.get("__metadata__")
            if not isinstance(meta, dict) or st.SEAL_KEY not in meta:
                return None
            meta[st.SEAL_KEY] = "0" * 64
            p.write_bytes(join(header, body))
            st.seal(p)
        except Exception:  # noqa: BLE001 (not resealable: the plain mutation is tested instead)
            return None
        return p.read_bytes()


def manifest_edits(info: dict, rng: random.Random) -> list[tuple[str, object]]:
    """Manifests (as JSON values) with missing, extra, ill-typed and out-of-range fields."""
    out: list[tuple[str, object]] = []

    def edit(kind: str, fn) -> None:
        m = json.loads(json.dumps(info))
        fn(m)
        out.append((kind, m))

    wrong = [None, 1, -1, 1.5, 10**30, 1e308, "x", "", [], [1], {}, {"a": 1}, True]
    for key in list(info):
        edit("field-missing", lambda m, key=key: m.pop(key))
        for v in rng.sample(wrong, 4):
            edit("field-ill-typed", lambda m, key=key, v=v: m.update({key: v}))
    edit("bits-1e30", lambda m: m.update(bits=10**30))
    edit("bits-float", lambda m: m.update(bits=4.0))
    edit("stats-list", lambda m: m.update(stats=[1, 2]))
    edit("stats-nan", lambda m: m.update(stats={"seconds": float("nan")}))
    edit("fingerprint-int", lambda m: m.update(fingerprint=12345))
    edit("fingerprint-other", lambda m: m.update(fingerprint="0" * 64))
    edit("files-list", lambda m: m.update(files=list(m["files"])))
    edit("files-path-escape", lambda m: m["files"].update({"../../etc/passwd": "0" * 64}))
    edit("files-absolute", lambda m: m["files"].update({"/etc/passwd": "0" * 64}))
    edit("files-manifest-itself", lambda m: m["files"].update({"qtool.json": "0" * 64}))
    edit("files-digest-int", lambda m: m["files"].update({"config.json": 5}))
    edit("files-dropped-weights", lambda m: m["files"].pop("model.safetensors"))
    edit("files-dropped-scales", lambda m: m["files"].pop("scales.safetensors"))
    edit("format-version-2", lambda m: m.update(format_version=2))
    edit("format-version-str", lambda m: m.update(format_version="1"))
    edit("extra-top-field", lambda m: m.update(note="harmless"))
    edit("modules-empty", lambda m: m.update(modules={}))
    edit("modules-list", lambda m: m.update(modules=[]))
    edit("scale-delta-bad", lambda m: m.update(scale_delta={"task": 1}))
    mod = sorted(info["modules"])[0]
    entry = info["modules"][mod]
    for key in entry:
        edit("module-field-missing", lambda m, key=key: m["modules"][mod].pop(key))
        for v in rng.sample(wrong, 3):
            edit("module-field-ill-typed", lambda m, key=key, v=v: m["modules"][mod].update({key: v}))
    for key, v in (("bits", 10**30), ("bits", 8), ("bits", 3), ("group_size", 64), ("group_size", 7),
                   ("in_features", 10**12), ("in_features", 0), ("out_features", entry["out_features"] + 1),
                   ("kind", "nf4"), ("kind", "awq"), ("scale_dtype", "bfloat16"), ("scale_dtype", "int8"),
                   ("act_order", True), ("bias", True), ("extra", 1)):
        edit(f"module-{key}={str(v)[:12]}", lambda m, key=key, v=v: m["modules"][mod].update({key: v}))
    edit("module-unknown-name", lambda m: m["modules"].update({"model.nope.q_proj": entry}))
    edit("module-path-name", lambda m: m["modules"].update({"../../etc/passwd": m["modules"].pop(mod)}))
    edit("module-dropped", lambda m: m["modules"].pop(mod))
    return out
