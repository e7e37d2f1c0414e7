"""Every kernel family compiles for sm_90 with the tile-major layout, and reading tile-major
codes keeps the same (vectorised) global loads as the row-major layout."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
# a split-K launch finished by its last program (tickets.py): every thread's partial stored
# (barrier), a GPU-scope release fence before the ticket, L1 invalidated after it (acquire),
# a barrier, the partials read from L2 (strong loads), the counter put back to 0
_STRONG = r"LDG\.E(\.\w+)?\.STRONG\.GPU"
TICKET_ORDER = (rf"BAR\.SYNC MEMBAR\.\w+\.GPU ATOMG\.E\.ADD CCTL\.IVALL( BAR\.SYNC)+ {_STRONG}( {_STRONG}| BAR\.SYNC)* "
                r"ATOMG\.E\.EXCH")


def _nvdisasm() -> bool:
    try:
        import triton

        return (pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm").exists() or bool(
            shutil.which("nvdisasm"))
    except ImportError:
        return False


@pytest.mark.skipif(not _nvdisasm(), reason="Triton without its bundled nvdisasm")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_compile_for_sm90(bits: int) -> None:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), str(bits)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    errors = {k: v["error"] for k, v in res.items() if "error" in v}
    assert not errors, errors
    for kernel in ("gemv", "gemv_groups", "gemv_groups/st3", "skinny/tile0", "skinny/tile64"):
        order = res[kernel]["ordering"]
        assert re.search(TICKET_ORDER, order), (kernel, order)
    assert any(op.startswith("LDGSTS") for op in res["gemv_groups/st3"]), res["gemv_groups/st3"]  # pipelined
    for kernel in ("skinny", "dequant"):
        assert res[f"{kernel}/tile64"] == res[f"{kernel}/tile0"], (kernel, res)
    # the codes are read 64 or 128 bits at a time wherever a row's words are contiguous (W2/W4)
    if bits != 3:
        wide = [k for k, v in res.items() if not any(op.endswith((".64", ".128")) for op in v)]
        assert not wide, res


@pytest.mark.skipif(not _nvdisasm(), reason="Triton without its bundled nvdisasm")
def test_gemv_grid_fits_one_wave() -> None:
    """Compiled for sm_90, the GEMV's and the skinny kernel's steady-state grids (after the
    first launch recorded the kernel's registers) fit in one wave of the 132 SMs' resident
    slots and fill most of it; a grid just over the slots (1,024 programs on 924) ran a
    second, nearly empty wave."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), "occupancy"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == 23
    for name in [n for n in res if n.endswith(" h2")]:  # split-K finished by the last program, as above
        v = res[name]
        assert (not v["fused"] and v["splits"][-1] == 1) or re.search(TICKET_ORDER, v.pop("ordering")), (name, v)
        v.pop("ordering", None)
    nf4 = res.pop("nf4 8192x8192 skinny")
    assert nf4["fused"] and nf4["spill"] == 0 and re.search(TICKET_ORDER, nf4["ordering"]), nf4
    assert nf4["programs"] <= 132 * min(8, nf4["resident"]), nf4
    for name, v in res.items():
        # programs_per_sm caps the slots: 16 for the tile-major GEMV classes, the tuned entry's
        # for the skinny kernel and the half2 GEMV, else 8
        slots = 132 * min(v.get("cap", 16 if name.endswith("tile") else 8), v["resident"])
        assert v["spill"] == 0, (name, v)
        assert v["programs"] <= slots, (name, v)
        # filled unless the K tiles ran out (≥ 4 per program) or the row blocks alone fill a wave
        assert v["programs"] >= 0.4 * slots, (name, v)


@pytest.mark.skipif(not _nvdisasm(), reason="Triton without its bundled nvdisasm")
def test_pdl_waits_before_every_load() -> None:
    """Compiled for sm_90 with programmatic dependent launch (pdl.py), each kernel waits for
    its predecessor (ACQBULK) before its first global load and then lets its successor launch
    (PREEXIT); the GEMV's only work before the wait is the L2 prefetch of its codes (PDL 2)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), "pdl"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["h2/2"].startswith("UBLKPF.L2 ACQBULK PREEXIT LDG"), res
    for k in ("h2/1", "gemv/1", "skinny/1", "chunk/1", "merge/1"):
        assert res[k].startswith("ACQBULK PREEXIT LDG"), res
    for k in ("h2/0", "gemv/0", "skinny/0", "chunk/0", "merge/0"):  # without PDL none of it
        assert not re.search(r"UBLKPF|ACQBULK|PREEXIT", res[k]), res
