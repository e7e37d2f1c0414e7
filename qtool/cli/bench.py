"""Benchmarks on a CUDA GPU, each against its baseline measured in the same run."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from qtool.errors import QtoolError

app = typer.Typer(no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")]
ShapesOpt = Annotated[str, typer.Option(help="Shape names, comma-separated (qtool.bench.kernels.SHAPES).")]
GroupsOpt = Annotated[str, typer.Option(help="Group sizes, comma-separated; 'ch' = per channel.")]
ModelArg = Annotated[str, typer.Argument(help="'synthetic-7b': Llama-2-7B shapes, random weights.")]


def _csv(value: str, cast=int) -> tuple:
    try:
        return tuple(None if v in ("ch", "channel") else cast(v) for v in value.split(",") if v)
    except ValueError as e:
        raise QtoolError(f"could not parse {value!r}: {e}") from e


def _bits(v: str) -> int | str:
    return v if v == "nf4" else int(v)


@app.command("kernels")
def kernels(
    shapes: ShapesOpt = "",
    m: Annotated[str, typer.Option("--m", help="Token counts M, comma-separated.")] = "1,4,16,64,256,2048",
    bits: Annotated[str, typer.Option(help="Bit-widths, comma-separated (nf4 for QLoRA's NF4).")] = "2,3,4",
    groups: GroupsOpt = "64,128,ch",
    dtype: Annotated[str, typer.Option(help="Activation dtype: fp16 or bf16.")] = "fp16",
    row_major: Annotated[bool, typer.Option("--row-major", help="Time the checkpoint's row-major codes, "
                                            "not the tile-major layout decode uses.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Packed-weight matmul kernels vs fp16 cuBLAS (median times, weights rotated out of L2).

    Examples: qtool bench kernels --shapes 70B.down,7B.down --m 1,16 --bits 4 --groups 128
    """
    from qtool.bench import kernels as kb
    from qtool.bench.report import kernel_table

    names = [s for s in shapes.split(",") if s] or list(kb.SHAPES)
    unknown = [s for s in names if s not in kb.SHAPES]
    if unknown:
        raise QtoolError(f"unknown shape(s) {unknown}; choose from {list(kb.SHAPES)}")
    report = kb.run(names, _csv(m), _csv(bits, _bits), _csv(groups), _dtype(dtype), tile_major=not row_major)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        kernel_table(report)


@app.command("decode")
def decode(
    model: ModelArg = "synthetic-7b",
    bits: Annotated[int, typer.Option(help="Weight bit-width.")] = 4,
    group_size: Annotated[str, typer.Option(help="Group size or 'ch'.")] = "128",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,16",
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per timing.")] = 64,
    layers: Annotated[int, typer.Option(help="Decoder layers of the synthetic model (32 = full 7B).")] = 32,
    row_major: Annotated[bool, typer.Option("--row-major", help="Keep the checkpoint's row-major codes "
                                            "(default: tile-major while decoding).")] = False,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the decoder blocks of "
                                          "both models before the CUDA graph is captured.")] = True,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Concatenate q/k/v and gate/up into one "
                                       "projection each, in both models.")] = True,
    attention: Annotated[str, typer.Option(help="Attention of both models: split-kv (reads the cache up to the "
                                           "position only) or sdpa (torch's, the whole cache under a mask).")]
    = "split-kv",
    as_json: JsonOpt = False,
) -> None:
    """Greedy decode tokens/s, quantized vs fp16, static KV cache, torch.compile and CUDA graphs."""
    from qtool.bench import decode as db
    from qtool.bench.report import decode_table

    g = _csv(group_size)[0]
    report = db.run(model, bits, g, _csv(batch), new_tokens, layers, tile_major=not row_major,
                   compile=compile, fuse=fuse, attention=attention)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        decode_table(report)


@app.command("apiq-block")
def apiq_block(
    method: Annotated[str, typer.Option(help="apiq-bw | apiq-lw | omniquant")] = "apiq-bw",
    bits: Annotated[int, typer.Option(help="Weight bit-width.")] = 2,
    group_size: Annotated[str, typer.Option(help="Group size or 'ch'.")] = "64",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 64,
    windows: Annotated[int, typer.Option(help="Calibration windows measured.")] = 8,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    epochs: Annotated[int, typer.Option(help="Epochs measured.")] = 1,
    offload: Annotated[str, typer.Option(help="Window activations: gpu | cpu (pinned) | auto.")] = "gpu",
    device: Annotated[str, typer.Option(help="cuda | cpu (cpu: only with a small --hidden).")] = "cuda",
    hidden: Annotated[int, typer.Option(help="Hidden size (Llama-2-7B: 4096).")] = 4096,
    intermediate: Annotated[int, typer.Option(help="MLP size (Llama-2-7B: 11008).")] = 11008,
    heads: Annotated[int, typer.Option(help="Attention heads (Llama-2-7B: 32).")] = 32,
) -> None:
    """One Llama-2-7B-shaped block through ApiQ calibration: s/step, peak GPU memory, 7B projection (JSON).

    Examples: qtool bench apiq-block --windows 8 --epochs 1 ; qtool bench apiq-block --offload cpu
    """
    from qtool.bench import apiq_block as ab

    shape = ab.BlockShape(hidden, intermediate, heads)
    report = ab.run(method, bits, _csv(group_size)[0], rank, windows, seqlen, epochs, offload, device, shape)
    typer.echo(json.dumps(report, indent=1))


@app.command("train")
def train(
    model: Annotated[str, typer.Argument(help="Built-in name, HF directory or .gguf file.")] = "smollm2-135m",
    variants: Annotated[str, typer.Option(help="Comma-separated: bf16-lora (baseline), peqa, lora, qlora.")]
    = "bf16-lora,peqa,lora,qlora",
    bits: Annotated[int, typer.Option(help="Integer bit-width for peqa and lora.")] = 4,
    group_size: Annotated[str, typer.Option(help="Group size or 'ch' (PEQA's per-channel).")] = "ch",
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seqlen: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    steps: Annotated[int, typer.Option(help="Timed steps.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 3,
    rank: Annotated[int, typer.Option(help="LoRA rank (all 7 block linears).")] = 64,
    grad_checkpoint: Annotated[bool, typer.Option(help="Recompute activations in backward.")] = False,
    device: Annotated[str, typer.Option(help="cuda | cpu (cpu: a smoke run only).")] = "cuda",
    as_json: JsonOpt = False,
) -> None:
    """Training-step tokens/s and peak memory: PEQA and LoRA on the int base (QLoRA on NF4) vs bf16 LoRA.

    Examples: qtool bench train ; qtool bench train --variants bf16-lora,peqa --batch 8 --seqlen 1024
    """
    from qtool.bench import train as tb

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    bad = [v for v in names if v not in tb.VARIANTS]
    if bad or not names:
        raise QtoolError(f"unknown variant {bad[0] if bad else variants!r}; choose from {', '.join(tb.VARIANTS)}")
    for name, value in (("--batch", batch), ("--seqlen", seqlen), ("--steps", steps), ("--rank", rank)):
        if value < 1:
            raise QtoolError(f"{name} must be ≥ 1, got {value}")
    report = tb.run(model, names, bits, _csv(group_size)[0], batch, seqlen, steps, warmup, rank, device,
                    grad_checkpoint)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        from qtool.bench.report import train_table

        train_table(report)


@app.command("quantize")
def quantize(
    shape: Annotated[str, typer.Option(help="8b (Llama-3-8B shapes) | 70b (one 70B-shaped block, projected) | "
                                       "tiny (CPU smoke test)")] = "8b",
    blocks: Annotated[int | None, typer.Option(help="cut the model to N blocks and project the full time")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated: rtn,nf4,gptq,loftq,apiq-bw")]
    = "rtn,nf4,gptq,loftq,apiq-bw",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    calib_n: Annotated[int, typer.Option(help="calibration windows (gptq, apiq-bw)")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="calibration window length")] = 2048,
    as_json: JsonOpt = False,
) -> None:
    """`qtool quantize` per method on a synthetic model of a real shape: wall time, the method's time,
    per-block time, projected full-model time, peak RSS and peak GPU memory, beside published anchors.

    The random bf16 model is written once under the qtool cache dir (16 GB for 8b). Examples:
      qtool bench quantize --shape 8b --blocks 2 --methods rtn,gptq
      qtool bench quantize --shape 70b --methods rtn,gptq
      qtool bench quantize --shape tiny --device cpu --calib-n 2 --calib-seqlen 32
    """
    from qtool.bench import quantize as bq

    if blocks is not None and blocks < 1:
        raise QtoolError(f"--blocks must be ≥ 1, got {blocks}")
    report = bq.run(shape, blocks, tuple(m for m in methods.split(",") if m), device, calib_n, calib_seqlen)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    typer.echo(f"{report['shape']} shape, {report['blocks_run']} of {report['blocks_full']} blocks "
               f"({report['model_gb']} GB bf16), device {report['device']}, calibration {report['calibration']}")
    typer.echo(f"{'method':<9}{'wall s':>9}{'quant s':>9}{'s/block':>9}{'full s (proj.)':>16}{'RSS GB':>8}"
               f"{'GPU GB':>8}  note")
    for r in report["results"]:
        gpu = "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        typer.echo(f"{r['method']:<9}{r['wall_s']:>9.1f}{r['quantize_s']:>9.1f}{r['per_block_s']:>9.2f}"
                   f"{r['projected_full_s']:>16.0f}{r['peak_rss_gb']:>8.2f}{gpu:>8}  {r['note']}")
    typer.echo("anchors (published):")
    for a in report["anchors"]:
        typer.echo(f"  {a}")


def _dtype(name: str):
    import torch
    table = {"fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise QtoolError(f"dtype must be fp16 or bf16, got {name!r}")
    return table[name]
