"""lm-evaluation-harness integration: the `qtool` model class and the runner behind
`qtool eval --tasks`.

Importing this module imports lm-eval (the `eval` extra) and registers the model under the
name "qtool", so `lm_eval.simple_evaluate(model="qtool", model_args="pretrained=CKPT,...")`
works after `import qtool.eval.harness`. lm-eval 0.4 has no plugin entry point, so its own
`lm_eval` command cannot see third-party models; `python -m qtool.eval.lm_eval_cli ARGS` is
that command with the model registered and qtool's offline tasks on the include path.

Scoring (QtoolLM): requests are tokenized as lm-eval's HF model does (context and
continuation encoded together, then split; trailing spaces of the context move to the
continuation), sorted longest first and run in right-padded batches. Right padding needs no
attention mask for a causal model: no real token attends to a later position. Only the
continuation positions go through the output head (qtool.eval.perplexity.final_hidden),
so the full-vocabulary logits of a batch are never materialised. The model is qtool's
loaded model: on a GPU its QuantLinear layers run qtool's kernels; on the CPU the packed
weights are dequantized once for the run (dense_cache), as `qtool eval` does.
Generation (generate_until) is greedy, one request at a time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qtool.errors import QtoolError
from qtool.eval.perplexity import final_hidden


def _load(pretrained: str, delta: str | None, adapter: str | None):
    """(model, tokenizer, label) of a qtool checkpoint (+ Δs or adapter) or an original model."""
    from qtool.artifact.checkpoint import MANIFEST, load_checkpoint
    from qtool.models.load import load_model

    path = Path(pretrained)
    if not (path / MANIFEST).is_file():
        if delta or adapter:
            raise QtoolError("delta= and adapter= need a qtool checkpoint directory as pretrained=")
        model, tok, _ = load_model(pretrained)
        return model, tok, "original"
    ck = load_checkpoint(path)
    model, tok, info = ck.model, ck.tokenizer, ck.info
    g = "channel" if info["group_size"] is None else info["group_size"]
    label = f"{info['method']} W{info['bits']} g{g}"
    if delta:
        from qtool.artifact.delta import apply_delta

        apply_delta(model, Path(delta), info, checkpoint_dir=path)
        label += f" + Δs {Path(delta).name}"
    if adapter:
        from qtool.methods.lora import attach_adapter

        attach_adapter(model, Path(adapter), info.get("fingerprint"), dropout=0.0)
        label += f" + adapter {Path(adapter).name}"
    return model, tok, label


@register_model("qtool")
class QtoolLM(TemplateLM):
    """An lm-eval model over a qtool-loaded model.

    lm-eval model_args: pretrained=CKPT (qtool checkpoint dir, HF dir, .gguf or built-in
    name), delta=Δs file, adapter=adapter dir, device=auto|cpu|cuda, dtype=auto|float32|
    bfloat16|float16, batch_size=N, max_length=N. Python callers may pass model= and
    tokenizer= instead of pretrained= (the caller then owns device, dtype and caching)."""

    def __init__(self, pretrained: str | None = None, delta: str | None = None, adapter: str | None = None,
                 device: str = "auto", dtype: str = "auto", batch_size: int | str = 8,
                 max_length: int | str | None = None, model=None, tokenizer=None, label: str | None = None,
                 **_ignored) -> None:
        super().__init__()
        from qtool.cli.options import resolve_device, resolve_dtype

        self._stack = contextlib.ExitStack()
        if model is None:
            from qtool.models.builtin import DEFAULT_MODEL
            from qtool.nn.qlinear import dense_cache
            from qtool.nn.replace import cast_float

            dev = resolve_device(str(device))
            dt = resolve_dtype(str(dtype), dev)
            model, tokenizer, label = _load(pretrained or DEFAULT_MODEL, delta, adapter)
            model = cast_float(model, dt).to(dev).eval()
            if dev.type == "cpu":  # no kernels on the CPU: unpack once, not on every call
                self._stack.enter_context(dense_cache(model, dt))
        self.model, self.tokenizer, self.label = model, tokenizer, label or "model"
        self._device = next(model.parameters()).device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise QtoolError(f"batch_size must be ≥ 1, got {batch_size}")
        cfg_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._max_length = int(max_length) if max_length else min(cfg_len, 4096)
        # Models whose tokenizer puts BOS first (Gemma) are scored with it, as lm-eval's HF model does.
        bos = tokenizer.bos_token_id
        self.add_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> QtoolLM:
        # model_args win over lm_eval's own --device/--batch_size (lm-eval passes both).
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> QtoolLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def close(self) -> None:
        self._stack.close()

    # -------------------------------------------------- TemplateLM's hooks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.add_bos else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos if add_special_tokens is None else add_special_tokens
        return self.tokenizer(string, add_special_tokens=special)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -------------------------------------------------- scoring

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], progress: bool = False
                     ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), continuation is the greedy choice) per (context ids,
        continuation ids) pair; contexts are cut from the left to fit max_length."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise QtoolError("an empty continuation cannot be scored")
            whole = (ctx + cont)[-(self.max_length + 1):]
            rows.append((whole[:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        from tqdm import tqdm

        for b0 in tqdm(range(0, len(order), self.batch_size), desc="qtool loglikelihood", disable=not progress):
            idx = order[b0:b0 + self.batch_size]
            L = len(rows[idx[0]][0])
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
            hidden = final_hidden(self.model, ids.to(self._device))
            # The continuation's k tokens are predicted at the last k real positions.
            picked = torch.cat([hidden[j, len(rows[i][0]) - len(rows[i][1]):len(rows[i][0])]
                                for j, i in enumerate(idx)])
            logits = head(picked).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logp = F.log_softmax(logits, dim=-1)
            targets = torch.tensor([t for i in idx for t in rows[i][1]], device=logp.device)
            tok_lp = logp.gather(1, targets[:, None])[:, 0].double().cpu()
            greedy = (logp.argmax(-1) == targets).cpu()
            at = 0
            for i in idx:
                k = len(rows[i][1])
                out[i] = (float(tok_lp[at:at + k].sum()), bool(greedy[at:at + k].all()))
                at += k
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self.score_tokens(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from qtool.nn.qlinear import tile_major_layout

        out = []
        with tile_major_layout(self.model):  # decode-speed layout on CUDA; a no-op on the CPU
            for context, gen_kwargs in [r.args for r in requests]:
                kw = dict(gen_kwargs or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.pop("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - max_new):]
                x = torch.tensor([ids], device=self._device)
                gen = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                          do_sample=False, stop_strings=until or None, tokenizer=self.tokenizer,
                                          pad_token_id=self.tokenizer.pad_token_id or self.eot_token_id)
                text = self.tok_decode(gen[0, len(ids):].tolist())
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
        return out


# ------------------------------------------------------------------ runner


def offline() -> None:
    """lm-eval loads task data through `datasets`: never let it reach a hub."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


METRICS = ("acc", "acc_norm", "exact_match", "perplexity")


def summarize(results: dict) -> list[dict]:
    """One row per task or group: its metrics with standard errors and the sample count."""
    rows = []
    n_samples = results.get("n-samples", {})
    for section in ("groups", "results"):
        for task, metrics in (results.get(section) or {}).items():
            if section == "results" and task in (results.get("groups") or {}):
                continue
            row: dict = {"task": task, "group": section == "groups"}
            for key, value in metrics.items():
                name, _, flt = key.partition(",")
                base = name.removesuffix("_stderr")
                if base in METRICS and isinstance(value, (int, float)):
                    row[name] = float(value)
                    row.setdefault("filter", flt)
            if task in n_samples:
                row["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
            rows.append(row)
    return rows


def run_tasks(lm: QtoolLM, names: list[str], limit: int | None = None, num_fewshot: int | None = None,
              seed: int = 0, max_new_tokens: int | None = None) -> dict:
    """Run lm-eval on the named qtool tasks; {'rows': summarize(...), 'raw': lm-eval's results}.
    `max_new_tokens` replaces generative tasks' own generation budget."""
    offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qtool.eval.lm_tasks import write_tasks

    root = write_tasks(names)
    tm = TaskManager(include_path=str(root), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000,
                                  gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None,
                                  verbosity="ERROR")
    raw = {k: res.get(k) for k in ("results", "groups", "n-samples", "versions", "n-shot")}
    return {"rows": summarize(raw), "raw": raw}
