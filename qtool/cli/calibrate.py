"""Build a calibration-set artifact (N windows × seqlen tokens, seeded).

Example: qtool calibrate -o calib.safetensors --n 128 --seqlen 2048
"""

from pathlib import Path
from typing import Annotated

import typer

from qtool.cli import options as o


def calibrate(
    output: Annotated[Path, typer.Option("--output", "-o", help="calibration file to write (.safetensors)")],
    model: o.Model = o.DEFAULT,
    corpus: Annotated[str, typer.Option(help="bbc | wiki | c4 (built-in, train split) or a .txt/.jsonl file "
                                        "or directory")] = "bbc",
    n: Annotated[int, typer.Option("--n", help="number of windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per window (capped by the model's context)")] = 2048,
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    json_out: o.JsonOut = None,
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from qtool.data import calib
    from qtool.models.load import hf_dir_for, resolve_source

    if output.exists() and not overwrite:
        from qtool.errors import QtoolError

        raise QtoolError(f"output {output} exists (use --overwrite)")
    source = resolve_source(model)
    path = hf_dir_for(source)
    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = AutoConfig.from_pretrained(str(path))
    cs = calib.build(tok, corpus, n, seqlen, seed, calib.model_max_seqlen(cfg))
    calib.save(cs, output, overwrite)
    o.console(quiet).print(f"wrote {output}: {cs.input_ids.shape[0]} windows × {cs.input_ids.shape[1]} tokens "
                           f"from {cs.meta['corpus']} (seed {seed})")
    o.write_json(json_out, {"output": str(output), **cs.meta, "fingerprint": cs.fingerprint})
