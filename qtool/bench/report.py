"""Rich tables for the bench commands."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qtool.bench.kernels import KernelReport, fmt_group, fmt_opt


def kernel_table(report: KernelReport, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{report.gpu} · torch {report.torch} · triton {report.triton} · "
                    f"copy {report.copy_gbps:.0f} GB/s (read+write)")
    for col in ("shape", "N×K", "M", "bits", "g", "path", "quant µs", "fp16 µs", "speedup",
                "weight GB/s", "% copy", "fwd+dX / fp16", "graphed"):
        t.add_column(col, justify="right")
    for r in report.rows:
        t.add_row(r.shape, f"{r.N}×{r.K}", str(r.M), str(r.bits), fmt_group(r.group_size), r.path,
                  f"{r.quant_us:.1f}", f"{r.fp16_us:.1f}", f"{r.speedup:.2f}×", f"{r.weight_gbps:.0f}",
                  f"{100 * r.copy_frac:.0f}%", fmt_opt(r.fwd_bwd_ratio), fmt_opt(r.fwd_bwd_graph_ratio))
    console.print(t)


def decode_table(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    g = fmt_group(report["group_size"])
    layout = f" · {report['tile_major_layers']} layers tile-major" if report.get("tile_major_layers") else ""
    compiled = " · torch.compile" if report.get("compiled") else ""
    compiled += " · fused qkv, gate/up" if report.get("fused") else ""
    compiled += f" · {report['attention']} attention" if report.get("attention") else ""
    t = Table(title=f"{report['model']} · {report['gpu']} · W{report['bits']} g{g}{layout}{compiled}")
    for col in ("batch", "fp16 tok/s", "quant tok/s", "speedup", "fp16 ms/step", "quant ms/step"):
        t.add_column(col, justify="right")
    for r in report["rows"]:
        t.add_row(str(r["batch"]), f"{r['fp16_tok_s']:.0f}", f"{r['quant_tok_s']:.0f}",
                  f"{r['speedup']:.2f}×", f"{r['fp16_ms']:.2f}", f"{r['quant_ms']:.2f}")
    console.print(t)


def train_table(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    g = fmt_group(report["group_size"])
    t = Table(title=f"{report['model']} · {report['device']} · batch {report['batch']} × {report['seqlen']} · "
                    f"W{report['bits']} g{g} (qlora: NF4)")
    for col in ("variant", "trainable", "tokens/s", "vs bf16 LoRA", "ms/step", "peak GB"):
        t.add_column(col, justify="right")
    for r in report["rows"]:
        t.add_row(r["variant"], f"{r['trainable']:,}", f"{r['tokens_per_s']:,.0f}", fmt_opt(r["vs_bf16_lora"]),
                  f"{r['ms_per_step']:.1f}", "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}")
    console.print(t)
