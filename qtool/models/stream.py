"""Streaming load: the model skeleton on the meta device, one decoder block materialised at a time.

`open_streaming` builds the model from config.json on the meta device (rotary tables and other
non-persistent buffers are real: they are computed, not stored), checks every tensor the model
expects against the safetensors headers of the source (present, same shape: nothing is read yet),
and loads only what lies outside the decoder blocks (embeddings, final norm, output head). A
method then walks the blocks through `Stream.blocks()` (qtool.methods.blocks.iter_blocks): each
block is read from the shards when its turn comes, handed to `on_release` (the checkpoint writer)
when the method is done with it, and replaced by an empty placeholder, so at most one block's
weights are in memory at any time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qtool.errors import QtoolError
from qtool.models.load import (
    check_supported,
    check_tokenizer,
    decoder_layers,
    hf_dir_for,
    quiet_transformers,
    resolve_source,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class ShardReader:
    """Tensors of an HF directory by name, read one at a time from their safetensors shard.

    Reads with plain file reads into a fresh tensor rather than through safetensors' memory map: the
    pages of a mapped file count in the process's resident set while the mapping lives, so reading a
    model through open mappings shows (and, under a memory limit, is charged) the whole model."""

    def __init__(self, path: Path, files: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.weight_map = weight_map(self.path) if files is None else files
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            f = self.path / file
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if not 0 < n < 1 << 30:
                        raise ValueError("bad header length")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise QtoolError(f"{f}: not a safetensors file ({e})") from None
            header.pop("__metadata__", None)
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    def _entry(self, name: str) -> tuple[int, dict]:
        file = self.weight_map[name]
        base, header = self._header(file)
        if name not in header:
            raise QtoolError(f"{self.path / file}: tensor {name}, named in the index, is not in the shard")
        return base, header[name]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return _DTYPES.get(self._entry(name)[1]["dtype"])

    def nbytes(self, name: str) -> int:
        start, end = self._entry(name)[1]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        base, e = self._entry(name)
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise QtoolError(f"{self.path / self.weight_map[name]}: tensor {name} has dtype {e['dtype']}, "
                             "which qtool does not read")
        start, end = e["data_offsets"]
        shape = e["shape"]
        out = torch.empty(shape, dtype=dtype)
        if out.numel() * out.element_size() != end - start:
            raise QtoolError(f"{self.path / self.weight_map[name]}: tensor {name} is {end - start} bytes, "
                             f"not the {out.numel() * out.element_size()} its shape needs")
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        try:
            with open(self.path / self.weight_map[name], "rb") as fh:
                fh.seek(base + start)
                got = fh.readinto(buf) if out.numel() else 0
        except OSError as e:
            raise QtoolError(f"{self.path / self.weight_map[name]}: cannot read {name} ({e})") from None
        if got != end - start:
            raise QtoolError(f"{self.path / self.weight_map[name]}: truncated at tensor {name}")
        return out

    def first_row(self, name: str) -> torch.Tensor:
        """Row 0 of a tensor, read without reading the rest."""
        base, e = self._entry(name)
        dtype = _DTYPES[e["dtype"]]
        shape = e["shape"]
        row = torch.empty(shape[1:], dtype=dtype)
        buf = memoryview(row.view(-1).view(torch.uint8).numpy())
        with open(self.path / self.weight_map[name], "rb") as fh:
            fh.seek(base + e["data_offsets"][0])
            fh.readinto(buf)
        return row

    def close(self) -> None:
        self._headers.clear()


def weight_map(path: Path) -> dict[str, str]:
    """name → shard file of an HF directory (index.json or one model.safetensors), every shard checked
    to exist. One-line errors for a directory without weights and for a shard the index names but
    the directory lacks."""
    index = path / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise QtoolError(f"{index}: not a safetensors index ({e})") from None
        for file in sorted(set(wm.values())):
            if not (path / file).is_file():
                raise QtoolError(f"{path}: shard {file} named in {INDEX} is missing")
        return dict(wm)
    single = path / SINGLE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), SINGLE)
        except (SafetensorError, OSError) as e:
            raise QtoolError(f"{single}: cannot read ({str(e).splitlines()[0]})") from None
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise QtoolError(f"{path} holds only pickle weights (.bin/.pt); qtool reads safetensors only")
    raise QtoolError(f"{path} has no weights ({SINGLE} or {INDEX})")


class Released(nn.Module):
    """Stands where a block was once the method has finished with it and it has been written."""


@dataclass
class Stream:
    """A meta-skeleton model whose decoder blocks are read from the shards one at a time."""

    model: nn.Module
    reader: ShardReader
    layers_prefix: str  # state-dict prefix of the block list, e.g. "model.layers"
    block_dtype: torch.dtype | None = None  # None: the source's dtype (per tensor)
    on_release: Callable[[int, nn.Module], None] | None = None
    loaded: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_prefix)

    def materialise(self, i: int) -> nn.Module:
        block = self.layers[i]
        fill(block, self.reader, f"{self.layers_prefix}.{i}.", self.block_dtype)
        self.loaded.append(i)
        return block

    def release(self, i: int) -> None:
        block = self.layers[i]
        if self.on_release is not None:
            self.on_release(i, block)
        self.layers[i] = Released()
        self.released.append(i)
        del block
        trim_heap()

    def blocks(self) -> Iterator[tuple[int, nn.Module]]:
        for i in range(len(self.layers)):
            yield i, self.materialise(i)
            self.release(i)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and a block's worth of freed
    arrays then stays in the resident set while the next block is read)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def fill(module: nn.Module, reader: ShardReader, prefix: str, dtype: torch.dtype | None,
         skip: Callable[[str], bool] = lambda _n: False) -> None:
    """Replace every meta parameter and persistent buffer of `module` by the tensor in the shards."""
    persistent = set(module.state_dict(keep_vars=True))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type != "meta" or name not in persistent or skip(name):
            continue
        full = prefix + name
        value = reader.get(full)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def source_dtype(reader: ShardReader, names: list[str]) -> torch.dtype:
    """The floating dtype most of the source's tensors are stored in (bf16 for most hub models)."""
    seen: dict[torch.dtype, int] = {}
    for n in names:
        dt = reader.dtype(n)
        if dt is not None and dt.is_floating_point:
            seen[dt] = seen.get(dt, 0) + 1
    return max(seen, key=seen.get) if seen else torch.float32


def layers_prefix(model: nn.Module) -> str:
    target = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise QtoolError(f"unsupported architecture {type(model).__name__}: no list of decoder blocks found")


def meta_model(path: Path) -> nn.Module:
    """The causal LM of config.json on the meta device; one-line error for an unknown architecture."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise QtoolError(f"{path}/config.json: unsupported or unreadable config "
                         f"({str(e).splitlines()[0]})") from None
    archs = ",".join(getattr(config, "architectures", None) or [config.model_type])
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # not done on meta by from_config; tied_keys() needs it
    except (ValueError, KeyError, TypeError) as e:
        raise QtoolError(f"unsupported architecture {archs}: not a causal LM transformers "
                         f"can build ({str(e).splitlines()[0]})") from None
    return model


def check_shapes(model: nn.Module, reader: ShardReader, tied: set[str]) -> None:
    """Every tensor the model expects is in the shards with the shape config.json implies."""
    for name, t in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        if name not in reader:
            raise QtoolError(f"{reader.path}: tensor {name} is missing from the weights")
        shape = reader.shape(name)
        if tuple(shape) != tuple(t.shape):
            raise QtoolError(f"{reader.path}: tensor {name} has shape {list(shape)} but config.json implies "
                             f"{list(t.shape)}")


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (a tied output head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def open_streaming(path: Path, block_dtype: torch.dtype | None = None, rest_dtype: torch.dtype | None = None
                   ) -> Stream:
    """The model with everything outside the blocks loaded and the blocks on meta.

    `block_dtype` / `rest_dtype`: cast blocks / the rest to this dtype when read (None: the source's)."""
    reader = ShardReader(path)
    model = meta_model(path)
    check_supported(model)
    prefix = layers_prefix(model)
    tied = tied_keys(model)
    check_shapes(model, reader, tied)
    fill(model, reader, "", rest_dtype, skip=lambda n: n.startswith(prefix + "."))
    if tied:
        model.tie_weights()  # fill() gave the embedding a new Parameter: point the head at it again
    model.eval()
    return Stream(model, reader, prefix, block_dtype)


def estimate_peak_bytes(stream: Stream, compute_dtype: torch.dtype | None) -> int:
    """Host memory the streamed weights need at most: everything outside the blocks plus the largest
    block twice (the block and, while a Linear is quantized, its fp32 working copies), in the
    dtype they will be held in."""
    reader = stream.reader
    prefix = stream.layers_prefix + "."
    per_block: dict[str, int] = {}
    rest = 0
    for name in reader.weight_map:
        nbytes = reader.nbytes(name)
        if compute_dtype is not None and (dt := reader.dtype(name)) is not None and dt.is_floating_point:
            nbytes = nbytes // (torch.finfo(dt).bits // 8) * (torch.finfo(compute_dtype).bits // 8)
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            per_block[idx] = per_block.get(idx, 0) + nbytes
        else:
            rest += nbytes
    return rest + 2 * max(per_block.values(), default=0)


def open_model_streaming(name_or_path: str, block_dtype: torch.dtype | None = None,
                         rest_dtype: torch.dtype | None = None):
    """Returns (Stream, tokenizer, SourceInfo): the model skeleton with everything outside the decoder
    blocks loaded and the blocks left on the meta device, to be read one at a time
    (qtool.models.stream). Every tensor is checked against config.json before anything is read."""
    from transformers import AutoTokenizer

    quiet_transformers()
    source = resolve_source(name_or_path)
    path = hf_dir_for(source)
    stream = open_streaming(path, block_dtype, rest_dtype)  # weights, shards, shapes, architecture first
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise QtoolError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    if source.kind in ("builtin", "gguf"):  # a directory converted earlier, maybe by a faulty version
        check_tokenizer(tok, str(path))
    return stream, tok, source
