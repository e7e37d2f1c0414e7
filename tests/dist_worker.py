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
APIQ_EPOCHS = 4


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


def lora(out: Path, method: str, **kw):
    from qtool.methods.lora import RECIPES, LoraOptions, finetune_lora

    model, tok, info = nf4_tiny() if method == "qlora" else quantized_tiny(4, None)
    r = RECIPES[method]
    c = cfg(lr=r["lr"] * 10, schedule=r["schedule"], warmup_ratio=r["warmup_ratio"],
            state_dir=out.with_name(out.name + ".train"), **kw)
    # Dropout 0: with dropout the masks of one process and of two differ (docs/distributed.md).
    return finetune_lora(model, tok, info, lm_task(), c, LoraOptions(rank=4, alpha=8.0, dropout=0.0), out, method)


def interrupted_peqa(out: Path, **kw) -> None:
    """A run killed right after its first periodic save (at step SAVE_EVERY), on every process."""
    from qtool.train import loop

    real = loop.lr_at

    def dying(step, *a):
        if step == SAVE_EVERY:
            raise KeyboardInterrupt
        return real(step, *a)

    loop.lr_at = dying
    try:
        peqa(out, **kw)
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


def apiq_run(calib: torch.Tensor, seed: int = 0) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """ApiQ-bw on a tiny fp model: ([block output MSE before, after calibration] per block, the
    calibrated blocks' state)."""
    from qtool.methods import ApiqOptions, quantize_model
    from qtool.quant.grid import QuantSpec

    model = tiny_llama(0)
    stats = quantize_model(model, QuantSpec(2, 32), "apiq-bw", calib=calib, quiet=True, lora_rank=4, seed=seed,
                           apiq=ApiqOptions(epochs=APIQ_EPOCHS))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers" in k}
    return [[b["loss_before"], b["loss_after"]] for b in stats["blocks"]], state


def fsdp_peqa_grads(shard: bool) -> tuple[dict[str, torch.Tensor], float]:
    """One PEQA forward and backward on a tiny W4 g32 model, with FSDP (each block and the root
    sharded over the processes, packed weights in float storage) or without. Returns the loss,
    logits and Δs gradients (gathered whole), and the share of the packed bytes this process holds."""
    from qtool.methods.peqa import trainable_scales
    from qtool.nn.replace import quant_linears

    model, _, info = quantized_tiny(4, 32)
    trainable_scales(model, info)
    held = 1.0
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from qtool import dist
        from qtool.models.load import decoder_layers
        from qtool.nn.fsdp_storage import SUFFIX, to_float_storage

        packed = to_float_storage(model)
        mesh = init_device_mesh("cpu", (dist.world_size(),))
        for block in decoder_layers(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() * 4 for n, p in model.named_parameters() if n.endswith(SUFFIX))
        held = local / packed
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))  # the same on every process
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()

    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    res = {"loss": out.loss.detach().reshape(1), "logits": out.logits.detach()}
    res.update({f"grad.{n}": whole(m.scale_delta.grad).contiguous() for n, m in quant_linears(model).items()})
    return res, held


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
        peqa(out / "peqa-fsdp.safetensors", fsdp=True)
        lora(out / "qlora-fsdp", "qlora", fsdp=True)
        interrupted_peqa(out / "cut2f.safetensors", fsdp=True)
        peqa(out / "from1f.safetensors", state_dir=out / "cut1.train", resume=True, fsdp=True)
    finally:
        os.replace = real_replace
    Hs, state = gptq_hessians(CALIB)
    save_file(Hs, str(out / f"hessians.rank{r}.safetensors"))
    save_file(state, str(out / f"gptq.rank{r}.safetensors"))
    fsdp, held = fsdp_peqa_grads(shard=True)
    save_file(fsdp, str(out / f"fsdp.rank{r}.safetensors"))
    apiq, state = apiq_run(CALIB)
    save_file(state, str(out / f"apiq.rank{r}.safetensors"))
    (out / f"writes.rank{r}.json").write_text(json.dumps({"world": dist.world_size(), "replaced": replaced,
                                                          "apiq": apiq, "fsdp_held": held}))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
