"""One optimisation step (loss, backward, optimizer update) captured once as a CUDA graph, then replayed.

Why: ApiQ/OmniQuant calibrate with batch-1 steps on small blocks; for a 135M model one step is
~750 kernels of a few microseconds each, so eager PyTorch spends its time launching them from
Python (measured on an H100: 20.7 ms per SmolLM2 block step, the same as a 7B-shaped block's).
A replayed graph launches the whole step at once.

The pattern is PyTorch's "whole network capture": inputs are copied into static buffers, the graph
writes the gradients it allocated during capture and updates the parameters in place with a
`capturable` optimizer. Capturing needs warm-up iterations (they really run), so the parameters and
the optimizer state are restored afterwards: the first replay starts from exactly the state an eager
loop would start from (AdamW's fresh state is zeros and step 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class GraphedStep:
    """`step(*inputs)` = copy inputs into static buffers, replay loss → backward → (clip) → opt.step();
    returns the static loss tensor (overwritten by the next step: clone it to keep it)."""

    def __init__(self, loss_fn: Callable[..., Tensor], params: Sequence[nn.Parameter], opt: torch.optim.Optimizer,
                 example: Sequence[Tensor], grad_clip: float | None = None, warmup: int = 2) -> None:
        self.static = [t.detach().clone() for t in example]
        self.params = list(params)
        snap = [p.detach().clone() for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # autograd, cuBLAS and the optimizer state get set up outside the capture
                opt.zero_grad(set_to_none=True)
                self._step(loss_fn, opt, grad_clip)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, s in zip(self.params, snap, strict=True):
                p.copy_(s)
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, Tensor):
                        v.zero_()
        opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step(loss_fn, opt, grad_clip)

    def _step(self, loss_fn: Callable[..., Tensor], opt: torch.optim.Optimizer, grad_clip: float | None) -> Tensor:
        loss = loss_fn(*self.static)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        opt.step()
        return loss.detach()

    def step(self, *inputs: Tensor) -> Tensor:
        for buf, t in zip(self.static, inputs, strict=True):
            buf.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.loss


def graphable(params: Sequence[nn.Parameter], enabled: bool = True) -> bool:
    """CUDA graphs only where every parameter lives on a CUDA device (CPU runs stay eager)."""
    return enabled and bool(params) and all(p.is_cuda for p in params)
