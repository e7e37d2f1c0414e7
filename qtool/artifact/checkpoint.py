"""The qtool checkpoint directory: write, verify, load. docs/format.md is the specification.

Layout:
  config.json, tokenizer files      (still a Hugging Face model directory)
  model.safetensors                 packed codes, zero-points, perms, biases + all
                                    non-quantized tensors (sharded as model-0000i-of-0000n
                                    with model.safetensors.index.json above a size)
  scales.safetensors                `<module>.scales` of every quantized Linear: kept in
                                    their own file so a task's scales can be swapped
                                    (PEQA) while the codes stay hard-linked
                                    NF4 layers (kind "nf4") keep codes and absmax constants in
                                    model.safetensors, plus the level table `qtool.nf4_levels`
  qtool.json                        manifest: format version, method, grid, modules,
                                    fingerprints, versions, sha256 of every other file
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qtool import __version__
from qtool.artifact import manifest as mf
from qtool.artifact import safetensors_io as st
from qtool.artifact.atomic import atomic_dir
from qtool.artifact.scales import install_scale_api
from qtool.errors import QtoolError
from qtool.models.cache import sha256_file
from qtool.nn.nf4linear import NF4Linear
from qtool.nn.qlinear import QuantLinear
from qtool.nn.replace import nf4_linears, quant_linears, quantized_linears, set_module
from qtool.quant import nf4

FORMAT = mf.FORMAT
FORMAT_VERSION = mf.FORMAT_VERSION
MANIFEST = mf.MANIFEST
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
SCALES_FILE = "scales.safetensors"
SHARD_BYTES = 2 * 1024**3
QUANT_SUFFIXES = ("qweight", "zeros", "perm", "bias")
NF4_LEVELS_KEY = "qtool.nf4_levels"  # the fixed NF4 table, stored once when any layer is NF4
DQ_MAP_KEY = "qtool.nf4_dq_map"  # the dynamic 8-bit map, stored once when any NF4 layer uses DQ


@dataclass
class Checkpoint:
    model: nn.Module
    tokenizer: object
    info: dict
    path: Path


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"qtool": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def base_fingerprint(model: nn.Module, scales: dict[str, torch.Tensor] | None = None) -> str:
    """Identity of the integer base: codes, zero-points, perms and the base scales (and for NF4
    layers their codes and absmax constants, after those of the integer layers).

    Computed once at quantization and stored; swapping a task's scales does not change it.
    `scales` (module name -> s₀) stands in for the live scales when a task's are swapped in."""
    h = hashlib.sha256()
    for name, layer in sorted(quant_linears(model).items()):
        h.update(name.encode())
        s0 = layer.scales if scales is None else scales[name]
        for t in (layer.qweight, layer.zeros, layer.perm, s0):
            if t is not None:
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, layer in sorted(nf4_linears(model).items()):
        h.update(name.encode())
        for t in (layer.nf4_codes, layer.absmax, layer.absmax_q, layer.absmax_scale, layer.absmax_mean):
            if t is not None:
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_entry(layer: QuantLinear | NF4Linear) -> dict:
    if isinstance(layer, NF4Linear):
        return {"kind": "nf4", "block_size": layer.block_size, "double_quant": layer.double_quant,
                "in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None}
    return {"kind": "int", "bits": layer.bits, "group_size": layer.group_size,
            "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, "act_order": layer.perm is not None,
            "scale_dtype": str(layer.scales.dtype).removeprefix("torch.")}


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias an earlier tensor (tied lm_head): saved once."""
    seen: dict[int, str] = {}
    tied = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if v is None or v.device.type == "meta":
            continue
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            tied.add(k)
        else:
            seen[ptr] = k
    return tied


def write_manifest(directory: Path, info: dict) -> dict:
    """Recompute the sha256 of every file in `directory` and write qtool.json. Returns info."""
    directory = Path(directory)
    info = dict(info)
    info["files"] = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
                     if p.is_file() and p.name != MANIFEST}
    dump_manifest(directory, info)
    return info


def dump_manifest(directory: Path, info: dict) -> None:
    """Write qtool.json as given. One serialisation everywhere, so that restoring a
    manifest (swap-scales --base) reproduces it byte for byte."""
    (Path(directory) / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n")


class CheckpointWriter:
    """Writes a checkpoint piece by piece into a temporary directory that replaces `out_dir` only
    when `finish` has run: a streamed quantization adds each block when it is done with it, so the
    quantized model is never whole in memory. Tensors go to shards of at most `shard_bytes`, each
    written as soon as it is full; the scales are kept until the end (they are small: 2 bytes per
    group) and written to scales.safetensors. The fingerprint is computed from the written files,
    in the order base_fingerprint uses, so it is the same as for a model saved whole."""

    def __init__(self, out_dir: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> None:
        self.out_dir, self.overwrite, self.shard_bytes = Path(out_dir), overwrite, shard_bytes
        if self.out_dir.exists() and not overwrite:
            raise QtoolError(f"output {self.out_dir} exists (use --overwrite)")
        self._ctx = atomic_dir(self.out_dir, overwrite=overwrite)
        self.tmp: Path | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
        self.scales: dict[str, torch.Tensor] = {}
        self.modules: dict[str, dict] = {}
        self.nf4, self.dq = False, False

    def __enter__(self) -> CheckpointWriter:
        self.tmp = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._ctx.__exit__(*exc)

    def add(self, root: nn.Module, prefix: str = "", skip: set[str] | frozenset = frozenset()) -> None:
        """The state dict of `root` (a block, or the model less its blocks) under `prefix`; its quantized
        Linears are recorded in the manifest's modules."""
        layers = quantized_linears(root)
        for k, v in root.state_dict().items():
            if prefix + k in skip or v is None:
                continue
            if k.endswith(".scales") and k.removesuffix(".scales") in layers:
                self.scales[prefix + k] = v.detach().cpu().contiguous()
            else:
                self._put(prefix + k, v.detach().cpu().contiguous())
        for name, m in layers.items():
            self.modules[prefix + name] = module_entry(m)
            if isinstance(m, NF4Linear):
                self.nf4 = True
                self.dq |= m.double_quant

    def _put(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[key] = t
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f".part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(self.tmp / name), metadata={"format": "pt"})
        self.parts.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def _fingerprint(self) -> str:
        """base_fingerprint of the model as written, read back one tensor at a time."""
        from qtool.models.stream import ShardReader

        where = {k: f for f, keys in self.final_parts for k in keys}
        where.update(dict.fromkeys(self.scales, SCALES_FILE))
        # Plain reads, one tensor at a time: a memory map of the shards would put the whole written
        # checkpoint in the resident set.
        reader = ShardReader(self.tmp, where)

        def raw(key: str) -> bytes | None:
            if key not in where:
                return None
            return reader.get(key).contiguous().view(torch.uint8).numpy().tobytes()

        h = hashlib.sha256()
        ints = sorted(n for n, m in self.modules.items() if m["kind"] == "int")
        nf4s = sorted(n for n, m in self.modules.items() if m["kind"] == "nf4")
        for names, parts in ((ints, ("qweight", "zeros", "perm", "scales")),
                             (nf4s, ("nf4_codes", "absmax", "absmax_q", "absmax_scale", "absmax_mean"))):
            for name in names:
                h.update(name.encode())
                for part in parts:
                    b = raw(f"{name}.{part}")
                    if b is not None:
                        h.update(b)
        return h.hexdigest()

    def finish(self, config, tokenizer, info: dict, tied: set[str],
               extra: Callable[[Path, dict], None] | None = None) -> dict:
        """Write the rest (tables, index, scales, config, tokenizer, manifest); the directory is renamed
        into place when the `with` block ends."""
        if not self.modules:
            raise QtoolError("model has no quantized layers to save")
        if self.nf4:
            self._put(NF4_LEVELS_KEY, nf4.nf4_levels())
            if self.dq:
                self._put(DQ_MAP_KEY, nf4.dynamic_map())
        self._flush()
        n = len(self.parts)
        self.final_parts = []
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.parts, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.tmp / tmp_name).rename(self.tmp / name)
            self.final_parts.append((name, keys))
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
        save_file(self.scales, str(self.tmp / SCALES_FILE), metadata={"format": "pt", "qtool.kind": "scales"})
        self.scales = dict.fromkeys(self.scales)  # the tensors themselves are on disk now
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **info,
            "modules": self.modules,
            "tied": sorted(tied),
            "fingerprint": self._fingerprint(),
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        info = write_manifest(self.tmp, info)
        if extra is not None:
            extra(self.tmp, info)
        return info


def save_checkpoint(model: nn.Module, tokenizer, info: dict, out_dir: Path, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES, extra: Callable[[Path, dict], None] | None = None) -> dict:
    """Write a whole quantized model atomically. `info` carries method/grid/source/calibration fields.

    `extra(tmp_dir, info)` writes more into the directory before it is renamed into place (a
    method's LoRA sidecar, which needs the final fingerprint), so both appear or neither."""
    if not quantized_linears(model):
        raise QtoolError("model has no quantized layers to save")
    tied = tied_keys(model)
    with CheckpointWriter(out_dir, overwrite, shard_bytes) as w:
        w.add(model, "", skip=tied)
        return w.finish(model.config, tokenizer, info, tied, extra)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise QtoolError(f"checkpoint {path} not found (expected a directory made by `qtool quantize`)")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise QtoolError(f"{path} is not a qtool checkpoint (no {MANIFEST})")
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise QtoolError(f"{manifest}: {manifest.stat().st_size} bytes, too large for a manifest")
        info = json.loads(manifest.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise QtoolError(f"{manifest}: corrupted manifest ({str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise QtoolError(f"{manifest}: cannot read ({e.strerror or e})") from None
    return mf.validate(info, path)


def verify_files(path: Path, info: dict) -> None:
    """sha256 of every file the manifest lists; every file a loader may read must be listed."""
    mf.check_directory(path, info)
    for name, digest in info["files"].items():
        f = Path(path) / name
        if not f.is_file() or f.is_symlink() and not f.resolve().is_relative_to(Path(path).resolve()):
            raise QtoolError(f"{path}: file {name} listed in {MANIFEST} is missing")
        if sha256_file(f) != digest:
            raise QtoolError(f"{path}: {name} is corrupted or truncated (sha256 mismatch)")


def _shard_names(path: Path, info: dict) -> list[str]:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise QtoolError(f"{index}: not a safetensors index (weight_map)") from None
    for name in names:
        if not isinstance(name, str) or name not in info["files"] or not name.endswith(".safetensors"):
            raise QtoolError(f"{index}: shard {str(name)[:60]!r} is not a file listed in {MANIFEST}")
    return names


def _read_tensors(path: Path, info: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in [*_shard_names(path, info), SCALES_FILE]:
        tensors, _ = st.load(path / name, "checkpoint file")
        clash = set(tensors) & set(out)
        if clash:
            raise QtoolError(f"{path}: tensor {sorted(clash)[0]} is stored twice")
        out.update(tensors)
    return out


def _check_tables(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Pop the stored NF4 tables and refuse a checkpoint whose tables differ from qtool's."""
    for key, table in ((NF4_LEVELS_KEY, nf4.nf4_levels), (DQ_MAP_KEY, nf4.dynamic_map)):
        stored = state.pop(key, None)
        if stored is not None and (stored.shape != table().shape or stored.dtype != table().dtype
                                   or not torch.equal(stored, table())):
            raise QtoolError(f"{path}: {key} differs from the NF4 table this qtool implements")


def build_skeleton(path: Path, info: dict) -> nn.Module:
    """The model on the meta device (buffers such as rotary tables real), QuantLinear in place."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # config.json is covered by the manifest's sha256; this catches what transformers refuses
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 (any refusal by transformers is a bad input here)
        raise QtoolError(f"{path}/config.json: not a usable model config ({_first_line(e)})") from None
    dtype_of = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    for name, m in info["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"{path}: module {name[:80]} of {MANIFEST} is not in the model") from None
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != (m["in_features"],
                                                                                       m["out_features"]):
            raise QtoolError(f"{path}: module {name} is not a {m['in_features']}→{m['out_features']} Linear "
                             "in config.json's model")
        bias_dtype = old.bias.dtype if getattr(old, "bias", None) is not None else torch.float32
        if m["kind"] == "nf4":
            set_module(model, name, NF4Linear(m["in_features"], m["out_features"], m["block_size"],
                                              bool(m["double_quant"]), m["bias"], bias_dtype, device="meta"))
            continue
        layer = QuantLinear(m["in_features"], m["out_features"], m["bits"], m["group_size"], m["bias"],
                            m["act_order"], dtype_of[m["scale_dtype"]], bias_dtype, device="meta")
        set_module(model, name, layer)
    return model


def load_checkpoint(path: Path, device: str | torch.device = "cpu", verify: bool = True,
                    with_tokenizer: bool = True) -> Checkpoint:
    """Load a checkpoint without ever materialising dense fp weights of the quantized layers."""
    path = Path(path)
    info = read_manifest(path)
    if verify:
        verify_files(path, info)
    model = build_skeleton(path, info)
    state = _read_tensors(path, info)
    _check_tables(path, state)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a size mismatch: the tensors are not those of the manifest's model
        raise QtoolError(f"{path}: tensors do not match the model ({_first_line(e).strip()[:160]})") from None
    tied = set(info.get("tied", []))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise QtoolError(f"{path}: tensors do not match the model (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    if tied:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise QtoolError(f"{path}: no data for {leftover[:3]}")
    _check_loaded(path, model, info)
    # Before any cast or move: captures the base scales for model.load_scales / restore.
    install_scale_api(model, info, path)
    if verify and base_fingerprint(model, model._qtool_base_scales) != info["fingerprint"]:
        raise QtoolError(f"{path}: fingerprint in {MANIFEST} does not match the stored codes and base scales")
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 (tokenizer files are covered by the manifest's sha256)
            raise QtoolError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
    return Checkpoint(model, tokenizer, info, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _check_loaded(path: Path, model: nn.Module, info: dict) -> None:
    """Tensors against the manifest: dtypes, value ranges, finiteness (shapes were checked by
    load_state_dict against the layers the manifest built)."""
    dtype_of = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    for name, layer in quant_linears(model).items():
        entry = info["modules"][name]
        want = {"qweight": torch.int32, "zeros": torch.uint8, "scales": dtype_of[entry["scale_dtype"]],
                "perm": torch.int64}
        for key, dtype in want.items():
            t = getattr(layer, key)
            if t is not None and t.dtype != dtype:
                raise QtoolError(f"{path}: {name}.{key} is {str(t.dtype).removeprefix('torch.')}, "
                                 f"expected {str(dtype).removeprefix('torch.')}")
        # the kernels build −(1024 + z) etc. as bit patterns (kernels/_unpack.pairs4_consts):
        # a zero-point outside the b-bit grid would be dequantized wrongly, not refused
        if layer.zeros.numel() and int(layer.zeros.max()) >= 1 << layer.bits:
            raise QtoolError(f"{path}: {name}.zeros holds a zero-point outside the {layer.bits}-bit grid")
        if not torch.isfinite(layer.scales).all():
            raise QtoolError(f"{path}: {name}.scales holds NaN or infinite values")
        if layer.perm is not None and not torch.equal(layer.perm.sort().values, torch.arange(layer.in_features)):
            raise QtoolError(f"{path}: {name}.perm is not a permutation of the {layer.in_features} inputs")
    for name, layer in nf4_linears(model).items():
        for key in ("absmax", "absmax_scale", "absmax_mean"):
            t = getattr(layer, key, None)
            if t is not None and (t.dtype != torch.float32 or not torch.isfinite(t).all()):
                raise QtoolError(f"{path}: {name}.{key} is not finite float32")
        for key in ("nf4_codes", "absmax_q"):
            t = getattr(layer, key, None)
            if t is not None and t.dtype != torch.uint8:
                raise QtoolError(f"{path}: {name}.{key} is not uint8")
    quantized = set(quantized_linears(model))
    params = dict(model.named_parameters())
    for name, t in [*params.items(), *model.named_buffers()]:
        if name.rpartition(".")[0] in quantized:
            continue
        if not t.is_floating_point():
            if name in params:
                raise QtoolError(f"{path}: {name} is {str(t.dtype).removeprefix('torch.')}, not floating point")
            continue
        if not torch.isfinite(t).all():
            raise QtoolError(f"{path}: {name} holds NaN or infinite values")
