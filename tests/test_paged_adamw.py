"""PagedAdamW against torch.optim.AdamW (the reference), state round trips, and build_optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.train.optim import OPTIMIZERS, build_optimizer
from qtool.train.paged_adamw import PagedAdamW, Piece, plan_buckets
from qtool.train.state import TrainState, load_state, optimizer_state, restore_optimizer, save_state

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "eps": 1e-8}


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.LayerNorm(8))


def random_grads(model: nn.Module, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(steps)]


def run(model: nn.Module, opt: torch.optim.Optimizer, grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.to(p.device)
        opt.step()
        opt.zero_grad(set_to_none=True)


def named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max abs diff {(p - q).abs().max().item():.3g}"


# Bit-exact (torch.equal), not a tolerance: on CPU PagedAdamW issues the same elementwise ops
# with the same Python-float scalars as torch's single-tensor AdamW, and CPU foreach ops are
# per-tensor loops over those ops, so any difference at all means the math diverged.
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_matches_torch_adamw_bit_exact_on_cpu(staged: bool) -> None:
    ref, paged = small_model(), small_model()
    grads = random_grads(ref, 20)
    run(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **HYPER), grads)
    # 40-element buckets split every weight matrix across buckets and cycle all staging slots.
    opt = PagedAdamW(paged.parameters(), bucket_bytes=40 * 8, stage_cpu_params=staged, **HYPER)
    run(paged, opt, grads)
    assert_same_params(paged, ref)
    assert opt.staging_bytes() == (3 * 40 * 8 if staged else 0)
    for p in paged.parameters():
        st = opt.state[p]
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == 20
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].dtype == torch.float32


def test_low_precision_params_update_in_fp32() -> None:
    # A bf16 param gets the fp32 update of its fp32 value, rounded once per step; the moments stay fp32.
    # Reference: fp32 AdamW on the same (bf16-representable) values, params rounded to bf16 after each step.
    paged = small_model().to(torch.bfloat16)
    ref = small_model().to(torch.bfloat16).float()
    grads = [[g.to(torch.bfloat16) for g in step] for step in random_grads(ref, 5)]
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **HYPER)
    for step_grads in grads:
        run(ref, ref_opt, [[g.float() for g in step_grads]])
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(torch.bfloat16))
    opt = PagedAdamW(paged.parameters(), stage_cpu_params=True, bucket_bytes=40 * 8, **HYPER)
    run(paged, opt, grads)
    for p, q in zip(paged.parameters(), ref.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p, q.to(torch.bfloat16))


def test_plan_buckets_covers_every_element_once() -> None:
    numels = [5, 0, 12, 3, 7]
    buckets = plan_buckets(numels, 4)
    assert all(sum(pc.hi - pc.lo for pc in b) <= 4 for b in buckets)
    assert buckets[0] == [Piece(0, 0, 4, 0)] and buckets[1] == [Piece(0, 4, 5, 0), Piece(2, 0, 3, 1)]
    for index, n in enumerate(numels):
        covered = [i for b in buckets for pc in b if pc.index == index for i in range(pc.lo, pc.hi)]
        assert covered == list(range(n))
    for b in buckets:  # pieces of one bucket do not overlap in its buffer
        ends = [(pc.off, pc.off + pc.hi - pc.lo) for pc in b]
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:], strict=False))


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_resume_through_train_state_equals_uninterrupted_run(tmp_path: Path, staged: bool) -> None:
    grads = random_grads(small_model(), 20)
    full = small_model()
    run(full, PagedAdamW(full.parameters(), stage_cpu_params=staged, **HYPER), grads)

    first = small_model()
    opt = PagedAdamW(first.parameters(), stage_cpu_params=staged, **HYPER)
    run(first, opt, grads[:10])
    params = {n: p.detach().clone() for n, p in named(first).items()}
    save_state(tmp_path / "state.safetensors",
               TrainState(10, params, None, optimizer_state(opt, named(first)), None, [], {}))

    st = load_state(tmp_path / "state.safetensors", list(params))
    resumed = small_model(seed=7)  # different init: everything must come from the saved state
    with torch.no_grad():
        for n, p in named(resumed).items():
            p.copy_(st.params[n])
    opt2 = PagedAdamW(resumed.parameters(), stage_cpu_params=staged, **HYPER)
    restore_optimizer(opt2, named(resumed), st.optim)
    assert all(opt2.state[p]["exp_avg"].dtype == torch.float32 for p in resumed.parameters())
    run(resumed, opt2, grads[10:])
    assert_same_params(resumed, full)


def test_torch_state_dict_round_trip_keeps_moments_on_host() -> None:
    grads = random_grads(small_model(), 12)
    full = small_model()
    run(full, PagedAdamW(full.parameters(), **HYPER), grads)
    first = small_model()
    opt = PagedAdamW(first.parameters(), **HYPER)
    run(first, opt, grads[:6])
    resumed = small_model()
    resumed.load_state_dict(first.state_dict())
    opt2 = PagedAdamW(resumed.parameters(), **HYPER)
    opt2.load_state_dict(opt.state_dict())
    run(resumed, opt2, grads[6:])
    assert_same_params(resumed, full)


def test_load_param_state_rejects_a_wrong_shape() -> None:
    p = nn.Parameter(torch.zeros(3, 4))
    opt = PagedAdamW([p])
    bad = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 3), "exp_avg_sq": torch.zeros(3, 4)}
    with pytest.raises(QtoolError, match="shape"):
        opt.load_param_state(p, bad)


def test_build_optimizer_by_name() -> None:
    model = small_model()
    assert OPTIMIZERS == ("adamw", "paged_adamw")
    plain = build_optimizer("adamw", list(model.parameters()), lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    assert type(plain) is torch.optim.AdamW
    assert plain.defaults["lr"] == 2e-4 and plain.defaults["eps"] == 1e-8
    paged = build_optimizer("paged_adamw", list(model.parameters()), lr=2e-4, betas=(0.9, 0.99), weight_decay=0.1)
    assert type(paged) is PagedAdamW and paged.defaults["betas"] == (0.9, 0.99)


def test_build_optimizer_rejects_unknown_name() -> None:
    with pytest.raises(QtoolError, match=r"unknown optimizer 'sgd'; choose one of: adamw, paged_adamw$"):
        build_optimizer("sgd", list(small_model().parameters()), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_state_stays_in_pinned_host_memory_and_matches_adamw() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(1024, 1024), (1000, 3), (4096,), (777, 513)]  # ~1.5M elements: 12 MiB of moments
    init = [torch.randn(s) * 0.1 for s in shapes]
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(10)]

    params = [nn.Parameter(w.to(dev)) for w in init]
    opt = PagedAdamW(params, bucket_bytes=1 << 20, **HYPER)
    for k, step_grads in enumerate(grads):
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.to(dev)
        if k == 0:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()  # params + grads
        opt.step()
        after = torch.cuda.memory_allocated()
        # The moments alone would be 12 MiB; only the 3 MiB staging pool may remain.
        assert opt.staging_bytes() == 3 << 20
        assert after - before <= opt.staging_bytes(), f"step {k}: {after - before} bytes more than before"
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][key]
            assert t.device.type == "cpu" and t.is_pinned() and t.dtype == torch.float32
        assert opt.state[p]["step"].device.type == "cpu"

    ref = [nn.Parameter(w.to(dev)) for w in init]
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    for step_grads in grads:
        for p, gr in zip(ref, step_grads, strict=True):
            p.grad = gr.to(dev)
        ref_opt.step()
    for p, q in zip(params, ref, strict=True):
        rel = ((p - q).abs().max() / q.abs().max()).item()
        assert rel <= 1e-6, f"relative difference {rel:.3g}"
        # Moments too, so a store that never landed cannot hide behind a small lr.
        m_rel = ((opt.state[p]["exp_avg"] - ref_opt.state[q]["exp_avg"].cpu()).abs().max()
                 / ref_opt.state[q]["exp_avg"].abs().max()).item()
        assert m_rel <= 1e-6, f"exp_avg relative difference {m_rel:.3g}"
