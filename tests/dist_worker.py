"""Data-parallel scenarios on tiny random models, run by tests/test_distributed.py.

Imported by the test (each scenario run in one process, as the reference), and run as a
script under accelerate's launcher with two CPU processes (gloo), which is the point: one
launch (process start of torch + transformers costs seconds) does every scenario in turn.
Each launched process writes only the harness files named `*.rank<R>.*` itself; everything
else under OUT comes from qtool, and `os.replace` (the last step of every qtool atomic write)
is logged per process so that the test can check that only rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from peqa_util import byte_tokenizer, quantized_tiny, tiny_llama
from safetensors.torch import save_file

from qtool.data.tasks import Task
from qtool.train import TrainConfig

TEXT = "the cat sat on the mat. " * 8
STEPS, SAVE_EVERY = 4, 2
CALIB = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(5))


def lm_task() -> Task:
    docs = [TEXT + f"line {i}." for i in range(40)]
    return Task("toy-lm", "lm", docs[:36], docs[36:])


def cfg(**kw) -> TrainConfig:
    # Global batch 4 = micro-batch 2 × accumulation 2: two micro-batches in one process,
    # one micro-batch of 2 in each of two processes.
    base = dict(lr=3e-3, max_steps=STEPS, batch_size=2, grad_accum=2, seqlen=32, eval_samples=8, quiet=True,
                device="cpu", keep="last", eval_every=SAVE_EVERY, save_every=SAVE_EVERY)
    base.update(kw)
    return TrainConfig(**base)


def peqa(out: Path, **kw):
    from qtool.methods.peqa import finetune_peqa

    model, tok, info = quantized_tiny(4, None)
    state = kw.pop("state_dir", out.with_name(out.stem + ".train"))
    return finetune_peqa(model, tok, info, lm_task(), cfg(state_dir=state, **kw), out)


def nf4_tiny():
    from qtool.artifact.checkpoint import base_fingerprint, module_entry
    from qtool.methods import quantize_model
    from qtool.nn.replace import quantized_linears
    from qtool.quant.grid import QuantSpec

    model = tiny_llama(0)
    quantize_model(model, QuantSpec(4, 64), "nf4", quiet=True)
    info = {"method": "nf4", "modules": {n: module_entry(m) for n, m in quantized_linears(model).items()},
            "fingerprint": base_fingerprint(model)}
    return model, byte_tokenizer(), info


def lora(out: Path, method: str):
    from qtool.methods.lora import RECIPES, LoraOptions, finetune_lora

    model, tok, info = nf4_tiny() if method == "qlora" else quantized_tiny(4, None)
    r = RECIPES[method]
    c = cfg(lr=r["lr"] * 10, schedule=r["schedule"], warmup_ratio=r["warmup_ratio"],
            state_dir=out.with_name(out.name + ".train"))
    # Dropout 0: with dropout the masks of one process and of two differ (docs/distributed.md).
    return finetune_lora(model, tok, info, lm_task(), c, LoraOptions(rank=4, alpha=8.0, dropout=0.0), out, method)


def interrupted_peqa(out: Path) -> None:
    """A run killed right after its first periodic save (at step SAVE_EVERY), on every process."""
    from qtool.train import loop

    real = loop.lr_at

    def dying(step, *a):
        if step == SAVE_EVERY:
            raise KeyboardInterrupt
        return real(step, *a)

    loop.lr_at = dying
    try:
        peqa(out)
    except KeyboardInterrupt:
        pass
    finally:
        loop.lr_at = real


def gptq_hessians(calib: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """GPTQ on a tiny fp model: (the Hessian each layer group was solved with, the quantized state)."""
    from qtool.methods import gptq as gptq_method
    from qtool.methods import quantize_model
    from qtool.quant.grid import QuantSpec

    Hs: dict[str, torch.Tensor] = {}
    real = gptq_method.gptq

    def recording(W, H, *a):
        Hs[f"H.{len(Hs)}"] = H.clone()
        return real(W, H, *a)

    gptq_method.gptq = recording
    try:
        model = tiny_llama(0)
        quantize_model(model, QuantSpec(4, 32), "gptq", calib=calib, quiet=True)
    finally:
        gptq_method.gptq = real
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers" in k}
    return Hs, state


def main(out: Path) -> None:
    from qtool import dist

    dist.init(cpu=True)
    r = dist.rank()
    replaced: list[str] = []
    real_replace = os.replace

    def logged(src, dst, *a, **kw):
        replaced.append(str(Path(dst).relative_to(out)))
        return real_replace(src, dst, *a, **kw)

    os.replace = logged
    try:
        peqa(out / "peqa.safetensors")
        lora(out / "lora", "lora")
        lora(out / "qlora", "qlora")
        interrupted_peqa(out / "cut2.safetensors")
        peqa(out / "from1.safetensors", state_dir=out / "cut1.train", resume=True)
    finally:
        os.replace = real_replace
    Hs, state = gptq_hessians(CALIB)
    save_file(Hs, str(out / f"hessians.rank{r}.safetensors"))
    save_file(state, str(out / f"gptq.rank{r}.safetensors"))
    (out / f"writes.rank{r}.json").write_text(json.dumps({"world": dist.world_size(), "replaced": replaced}))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
