"""Compile kernel launches for a GPU that is not here (default sm_90, the H100) and read what
the compiler made of them: SASS, registers, spills, shared memory.

CI has no GPU, and device time is scarce; Triton compiles for any target with its bundled
ptxas. Launches are captured from the real entry points (`gemv_matmul` etc. called on CPU
tensors), then specialised exactly as Triton's launcher would specialise them (an int equal
to 1 becomes a constant, multiples of 16 carry divisibility), because the register count —
and so how many programs fit on an SM — depends on that. Dev tooling: imported by
scripts/bench/gemv_occupancy.py and the sm_90 compile test, never on the inference path.
Run with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@dataclass
class Compiled:
    name: str
    grid: tuple
    num_warps: int
    regs: int
    spill_bytes: int  # STACK + LOCAL from the cubin: 0 unless ptxas spilled
    shared: int  # bytes per program: static (cubin) + dynamic (Triton's launch)
    sass: str = field(repr=False)
    ptx: str = field(repr=False)


@contextmanager
def captured(*fns: object, arch: int | None = None) -> Iterator[list[Launch]]:
    """Record the launches of these @triton.jit kernels instead of running them (the caller's
    outputs stay unwritten). With `arch`, each launch is also compiled for it and the launch
    returns what a GPU launch returns as far as callers read it (n_regs, metadata.num_warps,
    metadata.shared), so code that sizes later grids from the compiled kernel runs as on
    the GPU."""
    launches: list[Launch] = []
    saved = [fn.run for fn in fns]

    def recorder(fn: object):
        def run(*args, grid, warmup, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            launches.append(Launch(fn, args, dict(kwargs), tuple(g) + (1,) * (3 - len(g))))
            if arch is None:
                return None
            c = compile_launch(launches[-1], arch)
            return SimpleNamespace(n_regs=c.regs, metadata=SimpleNamespace(num_warps=c.num_warps, shared=c.shared))
        return run

    for fn in fns:
        fn.run = recorder(fn)
    try:
        yield launches
    finally:
        for fn, run in zip(fns, saved, strict=True):
            fn.run = run


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """Compile one captured launch for `arch` as JITFunction.run would (same binder, same
    specialisation and options), without a driver."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton ≥ 3.7
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    key = (fn.__name__, arch, str(spec), str(options))
    if key not in _cache:  # shapes differ only in ints with the same specialisation: one compile
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        use = resource_usage(k.asm["cubin"])
        # static shared memory (cubin) + the dynamic allocation the launcher asks for
        shared = use["SHARED"] + k.metadata.shared
        _cache[key] = (options.num_warps, use["REG"], use["STACK"] + use["LOCAL"], shared, k.asm["sass"],
                       k.asm["ptx"])
    return Compiled(fn.__name__, launch.grid, *_cache[key])


_cache: dict[tuple, tuple] = {}


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the (single) kernel in a cubin, via the cuobjdump
    that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = [li for li in out.splitlines() if "REG:" in li][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def k_loop(sass: str) -> Counter:
    """Opcode counts of the longest backward-branch span of the SASS: the K loop of these
    kernels (predicates and modifiers stripped: `@P0 LDG.E.128` counts as LDG)."""
    lines = [li for li in sass.splitlines() if li.strip()]
    labels: dict[str, int] = {}
    best = (0, 0)
    for i, line in enumerate(lines):
        if m := re.match(r"^\s*(\w+):", line):
            labels[m.group(1)] = i
        m = re.search(r"BRA (\w+);", line)
        if m and m.group(1) in labels and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    body = [li.split("\t", 1)[1].strip() for li in lines[best[0] + 1:best[1] + 1] if "\t" in li]
    return Counter(re.sub(r"^@!?U?P\w+ ", "", o).split()[0].split(".")[0] for o in body)
