"""Quantize a model to a packed integer checkpoint directory.

Examples:
  qtool quantize --method rtn --bits 4 -o smollm2-w4/
  qtool quantize --method gptq --bits 3 --group-size 64 --calib calib.safetensors -o w3g64/
  qtool quantize --method nf4 --group-size 64 --double-quant -o smollm2-nf4/
  qtool quantize --method loftq --bits 2 --group-size 64 --rank 64 --alpha 16 --loftq-iters 5 -o w2-loftq/
  qtool quantize --method apiq-bw --bits 2 --group-size 64 --calib calib.safetensors -o w2-apiq/
  qtool quantize --method apiq-bw --bits 2 --group-size 64 --calib calib.safetensors -o w2-apiq/ --resume
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o


def quantize(
    method: Annotated[str, typer.Option(help="rtn | gptq | nf4 | loftq | loftq-nf4 | apiq-bw | apiq-lw | "
                                                "omniquant")],
    bits: Annotated[int, typer.Option(help="2 | 3 | 4 | 8 (nf4: 4)")] = 4,
    group_size: Annotated[str | None, typer.Option("--group-size", "-g", help="32 | 64 | 128 | channel "
                                                   "(default 128); nf4: absmax block 32 | 64 | 128 | 256 "
                                                   "(default 64)")] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant",
                                               help="nf4: quantize the absmax constants to 8 bits")] = True,
    symmetric: Annotated[bool, typer.Option(help="symmetric grid (zero-point 2^(b-1))")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="checkpoint dir "
                                                "(default: ./<model>-<method>-w<bits>g<group>)")] = None,
    model: o.Model = o.DEFAULT,
    calib: Annotated[Path | None, typer.Option(help="calibration file from `qtool calibrate` "
                                               "(default: build one from the BBC train split)")] = None,
    calib_n: Annotated[int, typer.Option(help="windows when building calibration implicitly")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="window length when building calibration")] = 2048,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantize columns by decreasing Hessian diagonal")] = False,
    rank: Annotated[int, typer.Option(help="loftq, apiq: LoRA rank r of the adapter written to "
                                      "OUTPUT/adapter/")] = 64,
    alpha: Annotated[float, typer.Option(help="loftq, apiq: LoRA alpha (the adapter is scaled by alpha/r)")] = 16.0,
    loftq_iters: Annotated[int, typer.Option(help="loftq: alternating quantize/SVD steps T (0: plain RTN "
                                             "base, default-init adapter)")] = 5,
    targets: Annotated[str, typer.Option(help="apiq: comma-separated layer names that get LoRA")]
    = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv_proj,gate_up_proj",
    epochs: Annotated[int, typer.Option(help="apiq, omniquant: epochs over the calibration windows per "
                                        "block")] = 20,
    lr_clip: Annotated[float | None, typer.Option(help="apiq, omniquant: learning rate of the clipping "
                                                  "logits (default: apiq 5e-3, omniquant 1e-2)")] = None,
    lr_lora: Annotated[float, typer.Option(help="apiq: learning rate of LoRA A, B")] = 5e-4,
    weight_decay: Annotated[float | None, typer.Option(help="apiq, omniquant: AdamW weight decay "
                                                       "(default: apiq 0.1, omniquant 0)")] = None,
    aug_loss: Annotated[bool, typer.Option(help="apiq, omniquant: also match the fp block run on the "
                                           "quantized inputs")] = False,
    offload: Annotated[str, typer.Option(help="apiq, omniquant: calibration activations on the GPU | in "
                                         "pinned host memory (cpu) | auto")] = "auto",
    resume: Annotated[bool, typer.Option(help="apiq, omniquant: continue an interrupted run from "
                                         "OUTPUT.apiq-state/")] = False,
    quantize_lm_head: Annotated[bool, typer.Option(help="also quantize the output head")] = False,
    scale_dtype: Annotated[str, typer.Option(help="storage dtype of scales: float16 | bfloat16 | float32")]
    = "float16",
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the tensors kept unquantized in the checkpoint "
                                       "(embeddings, norms, lm_head): auto = the source's | float32 | bfloat16 | "
                                       "float16; quantization itself always computes in float32")] = "auto",
    max_ram: Annotated[float | None, typer.Option("--max-ram", help="host memory budget in GB: refuse before any "
                                                  "work when the streamed quantization would need more "
                                                  "(estimate: tensors outside the blocks + one block + "
                                                  "CPU calibration activations)")] = None,
    device: o.Device = "auto",
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from qtool import dist
    from qtool.errors import QtoolError
    from qtool.methods import ApiqOptions, QuantizeOptions
    from qtool.methods.apiq import TRAINED
    from qtool.pipeline import QuantizeConfig
    from qtool.pipeline import quantize as run
    from qtool.quant.grid import QuantSpec

    if rank < 1:
        raise QtoolError(f"--rank must be ≥ 1, got {rank}")
    if not alpha > 0:
        raise QtoolError(f"--alpha must be > 0, got {alpha}")
    if loftq_iters < 0:
        raise QtoolError(f"--loftq-iters must be ≥ 0, got {loftq_iters}")
    nf4_block = None
    if method in ("nf4", "loftq-nf4"):
        nf4_block = o.parse_nf4_block(group_size or "64")
        if bits != 4:
            raise QtoolError(f"nf4 is a 4-bit data type; got --bits {bits}")
        spec = QuantSpec(bits, None, symmetric)  # the grid spec is unused by nf4 (only bits=4 is checked)
        g = nf4_block
    else:
        spec = QuantSpec(bits, o.parse_group_size(group_size or "128"), symmetric)
        g = "c" if spec.group_size is None else spec.group_size
    dev = o.resolve_device(device)
    dist.init(cpu=dev.type == "cpu")  # under `accelerate launch`: calibration shared by the processes
    quiet = quiet or not dist.is_main()
    sdt = o.resolve_dtype(scale_dtype, dev)
    out = output or Path(f"{Path(model).stem}-{method}-w{bits}g{g}")
    o.seed_everything(seed)
    keep_dtype = None if dtype == "auto" else o.resolve_dtype(dtype, dev)
    lora_targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    apiq = ApiqOptions(epochs, lr_clip, lr_lora, weight_decay, aug_loss, offload, None, resume)
    if method in TRAINED:
        apiq = _check_apiq(method, apiq, QuantizeOptions(spec, scale_dtype=sdt, lora_rank=rank, lora_alpha=alpha,
                                                         lora_targets=lora_targets, apiq=apiq), out, overwrite)
    cfg = QuantizeConfig(model, out, method, spec, calib, calib_n, calib_seqlen, seed, dev, sdt, act_order,
                         quantize_lm_head, overwrite, quiet, keep_dtype, double_quant, nf4_block,
                         lora_rank=rank, lora_alpha=alpha, loftq_iters=loftq_iters, lora_targets=lora_targets,
                         apiq=apiq, max_ram_gb=max_ram)
    info = run(cfg)
    if not dist.is_main():  # rank 0 wrote the checkpoint and reports
        dist.shutdown()
        return
    st = info["stats"]
    what = f"block {g}{' + double quant' if double_quant else ''}" if nf4_block else f"W{bits} g{g}"
    bpp = f", {st['bits_per_param']:.3f} bits/param" if "bits_per_param" in st else ""
    o.console(quiet).print(f"wrote {out} ({method}, {what}{bpp}): {len(info['modules'])} layers quantized in "
                           f"{st['seconds']:.1f} s, peak RSS {st['peak_rss_gb']:.2f} GB")
    if "adapter" in info:
        err = (f": weight error {st['weight_rel_error_quant']:.4f} → {st['weight_rel_error_loftq']:.4f}"
               if "weight_rel_error_loftq" in st else "")
        if "block_loss_after" in st:
            err = f": block output MSE {st['block_loss_before']:.4g} → {st['block_loss_after']:.4g}"
        o.console(quiet).print(f"wrote {info['adapter']} (LoRA r {rank}, alpha {alpha:g}, init {method}{err})")
    o.write_json(json_out, {"output": str(out), **info})
    dist.shutdown()


def _check_apiq(method: str, apiq, opts, out: Path, overwrite: bool):
    """Validate the training options before the model loads; put the per-block state beside the output."""
    import dataclasses

    from qtool.errors import QtoolError
    from qtool.methods.apiq import make_config

    make_config(method, opts)  # one-line errors for bad values
    state = out.with_name(out.name + ".apiq-state")
    if state.exists() and not apiq.resume and not overwrite:
        raise QtoolError(f"{state} holds an interrupted run: add --resume to continue it, or --overwrite to "
                         f"start over")
    return dataclasses.replace(apiq, state_dir=state)
