"""Quantize a model to a packed integer checkpoint directory.

Examples:
  qtool quantize --method rtn --bits 4 -o smollm2-w4/
  qtool quantize --method gptq --bits 3 --group-size 64 --calib calib.safetensors -o w3g64/
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o


def quantize(
    method: Annotated[str, typer.Option(help="rtn | gptq (apiq-bw, apiq-lw, omniquant, loftq, nf4: planned)")],
    bits: Annotated[int, typer.Option(help="2 | 3 | 4 | 8")] = 4,
    group_size: Annotated[str, typer.Option("--group-size", "-g", help="32 | 64 | 128 | channel")] = "128",
    symmetric: Annotated[bool, typer.Option(help="symmetric grid (zero-point 2^(b-1))")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="checkpoint dir "
                                                "(default: ./<model>-<method>-w<bits>g<group>)")] = None,
    model: o.Model = o.DEFAULT,
    calib: Annotated[Path | None, typer.Option(help="calibration file from `qtool calibrate` "
                                               "(default: build one from the BBC train split)")] = None,
    calib_n: Annotated[int, typer.Option(help="windows when building calibration implicitly")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="window length when building calibration")] = 2048,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantize columns by decreasing Hessian diagonal")] = False,
    quantize_lm_head: Annotated[bool, typer.Option(help="also quantize the output head")] = False,
    scale_dtype: Annotated[str, typer.Option(help="storage dtype of scales: float16 | bfloat16 | float32")]
    = "float16",
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the tensors kept unquantized in the checkpoint "
                                       "(embeddings, norms, lm_head): auto = the source's | float32 | bfloat16 | "
                                       "float16; quantization itself always computes in float32")] = "auto",
    device: o.Device = "auto",
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from qtool.pipeline import QuantizeConfig
    from qtool.pipeline import quantize as run
    from qtool.quant.grid import QuantSpec

    spec = QuantSpec(bits, o.parse_group_size(group_size), symmetric)
    dev = o.resolve_device(device)
    sdt = o.resolve_dtype(scale_dtype, dev)
    g = "c" if spec.group_size is None else spec.group_size
    out = output or Path(f"{Path(model).stem}-{method}-w{bits}g{g}")
    o.seed_everything(seed)
    keep_dtype = None if dtype == "auto" else o.resolve_dtype(dtype, dev)
    cfg = QuantizeConfig(model, out, method, spec, calib, calib_n, calib_seqlen, seed, dev, sdt, act_order,
                         quantize_lm_head, overwrite, quiet, keep_dtype)
    info = run(cfg)
    st = info["stats"]
    o.console(quiet).print(f"wrote {out} ({method}, W{bits} g{g}): {len(info['modules'])} layers quantized in "
                           f"{st['seconds']:.1f} s, peak RSS {st['peak_rss_gb']:.2f} GB")
    o.write_json(json_out, {"output": str(out), **info})
