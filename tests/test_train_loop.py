"""The shared training loop, driven through PEQA's parameter choice on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from peqa_util import quantized_tiny

from qtool.data.tasks import Example, Task
from qtool.errors import QtoolError
from qtool.methods.peqa import remove_scale_deltas, trainable_scales
from qtool.nn.replace import quant_linears
from qtool.train import TrainConfig, train
from qtool.train import loop as loop_mod
from qtool.train.data import IGNORE, BatchOrder, tokenize_task
from qtool.train.evaluate import evaluate
from qtool.train.loop import lr_at

TEXT = "the cat sat on the mat. " * 8


def lm_task() -> Task:
    docs = [TEXT + f"line {i}." for i in range(40)]
    return Task("toy-lm", "lm", docs[:36], docs[36:])


def choice_task() -> Task:
    def ex(i: int) -> Example:
        good = i % 2 == 0
        weather = "sunny" if good else "rainy"
        return Example(f"item {i} is {weather}\nmood:", " yes" if good else " no", f"toy:{i}")

    train, val = [ex(i) for i in range(64)], [ex(i) for i in range(64, 80)]
    return Task("toy-cls", "prompt", train, val, (" no", " yes"))


def cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, max_steps=4, batch_size=4, seqlen=32, eval_samples=8, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    assert lr_at(0, 100, 3) == pytest.approx(1 / 3)
    assert lr_at(2, 100, 3) == pytest.approx(1.0)
    assert lr_at(3, 100, 3) == pytest.approx(1.0)
    assert lr_at(99, 100, 3) < 0.001
    assert lr_at(0, 10, 0) == pytest.approx(1.0)


def test_batch_order_is_reproducible_and_covers_epoch():
    a, b = BatchOrder(10, 3, seed=7), BatchOrder(10, 3, seed=7)
    assert [a.indices(k) for k in range(6)] == [b.indices(k) for k in range(6)]
    first_epoch = sum((a.indices(k) for k in range(3)), [])
    assert len(set(first_epoch)) == 9
    assert a.indices(3) != a.indices(0) or a.indices(4) != a.indices(1)  # the next epoch reshuffles


def test_peqa_lowers_loss_and_touches_only_scales():
    model, tok, info = quantized_tiny(4, None)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    params = trainable_scales(model, info)
    assert set(params) == set(quant_linears(model))
    n_train = sum(p.numel() for p in params.values())
    assert n_train == sum(m.out_features for m in quant_linears(model).values())  # per channel: one per row
    res = train(model, tok, lm_task(), params, cfg(max_steps=30, eval_every=10, lr=1e-2))
    assert res.final["loss"] < res.initial["loss"] - 0.05
    assert res.best["loss"] <= res.final["loss"]
    assert res.tokens == 30 * 4 * 32 and res.tokens_per_s > 0
    assert [h["step"] for h in res.history] == [0, 10, 20, 30]
    remove_scale_deltas(model)
    for k, v in model.state_dict().items():  # codes, zeros, base scales, embeddings, norms: unchanged
        assert torch.equal(v, frozen[k]), k
    assert any(t.abs().max() > 0 for t in res.params.values())


def test_grad_accumulation_matches_larger_batch():
    outs = []
    for bs, acc in ((4, 1), (2, 2)):
        model, tok, info = quantized_tiny(4, 32)
        params = trainable_scales(model, info)
        config = cfg(max_steps=2, batch_size=bs, grad_accum=acc, keep="last")
        res = train(model, tok, lm_task(), params, config)
        outs.append(res.params)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_same_result():
    outs = []
    for gc in (False, True):
        model, tok, info = quantized_tiny(4, None)
        params = trainable_scales(model, info)
        res = train(model, tok, lm_task(), params, cfg(max_steps=2, grad_checkpoint=gc, keep="last"))
        outs.append(res.params)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-8)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    def run(**kw):
        model, tok, info = quantized_tiny(4, None)
        params = trainable_scales(model, info)
        return train(model, tok, lm_task(), params, cfg(max_steps=6, keep="last", eval_every=3, **kw))

    straight = run()
    real_save = loop_mod.save_state
    calls = []

    def interrupted_save(path, state):
        real_save(path, state)
        calls.append(state.step)
        raise KeyboardInterrupt  # the process dies right after the first periodic save

    monkeypatch.setattr(loop_mod, "save_state", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run(save_every=3, state_dir=tmp_path)
    assert calls == [3]
    monkeypatch.setattr(loop_mod, "save_state", real_save)
    resumed = run(save_every=3, state_dir=tmp_path, resume=True)
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k]), k
    assert [h["step"] for h in resumed.history] == [0, 3, 6]
    assert resumed.tokens == straight.tokens
    assert (tmp_path / "state.safetensors").is_file()
    with pytest.raises(QtoolError, match="lr"):
        run(save_every=3, state_dir=tmp_path, resume=True, lr=1e-4)


def test_prompt_task_loss_on_answer_only_and_accuracy():
    model, tok, info = quantized_tiny(4, None)
    tt = tokenize_task(choice_task(), tok, 64)
    e = tt.train[0]
    targets = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE]
    assert tok.decode(targets) == " yes"
    assert e.labels[: len(e.input_ids) - 4] == [IGNORE] * (len(e.input_ids) - 4)
    m = evaluate(model, tt, 8, torch.device("cpu"))
    assert 0.0 <= m["accuracy"] <= 1.0 and math.isfinite(m["loss"])
    # accuracy by hand: sum log-likelihood of each choice after the context
    correct = 0
    with torch.no_grad():
        for it in tt.val_choice_items:
            scores = []
            for c in tt.choices:
                ids = torch.tensor([it.context + c])
                logp = model(ids).logits.log_softmax(-1)[0]
                scores.append(sum(float(logp[len(it.context) - 1 + j, t]) for j, t in enumerate(c)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == it.gold)
    assert m["accuracy"] == pytest.approx(correct / len(tt.val_choice_items))


def test_classification_training_improves_accuracy():
    model, tok, info = quantized_tiny(4, None, seed=1)
    params = trainable_scales(model, info)
    res = train(model, tok, choice_task(), params, cfg(max_steps=25, lr=2e-2, seqlen=64, eval_every=25))
    assert res.metric == "accuracy"
    assert res.final["loss"] < res.initial["loss"]
    assert res.best["accuracy"] >= res.initial["accuracy"]


def test_refuses_stray_trainable_parameter():
    model, tok, info = quantized_tiny(4, None)
    params = trainable_scales(model, info)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(QtoolError, match="model.norm.weight"):
        train(model, tok, lm_task(), params, cfg())
