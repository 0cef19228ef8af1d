"""`train.compile`: the training forward (and with it the backward) through `torch.compile`, or eager.

Meant for models whose steps are launch-bound on a GPU: a small encoder there spends more time launching
kernels than computing (an H200 trained the packaged MiniLM at a fraction of its matmul throughput), and
`reduce-overhead` replays each step as CUDA graphs. On the 2-core CPUs measured here it does not pay
(MiniLM full fine-tuning 1.000× after 28 s of compiling), so the default is eager.

Only training steps go through the compiled module: evaluation, prediction and the precision probe run the
model eagerly, so their numbers do not depend on this setting, and the saved weights are the model's own
(the compiled wrapper holds no parameters of its own, so state dicts keep their keys).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # on CUDA these replay recorded CUDA graphs


class TrainingForward:
    """Calls the model for one training micro-batch; `detached(loss)` gives a loss that outlives the step."""

    def __init__(self, model: nn.Module, mode: str):
        self.mode = mode
        self.compiled = mode != "none"
        # dynamic=None: the first batch width compiles a static graph, a second one a graph with symbolic
        # batch and sequence sizes, so bucketed widths do not recompile again and again
        self._call: Callable = torch.compile(model, mode=mode, dynamic=None) if self.compiled else model

    def __call__(self, **batch) -> torch.Tensor:
        if self.mode in _GRAPH_MODES:
            # several micro-batches run before one optimizer step: each forward starts a new graph replay
            torch.compiler.cudagraph_mark_step_begin()
        return self._call(**batch).loss

    def detached(self, loss: torch.Tensor) -> torch.Tensor:
        # a CUDA graph's outputs live in memory its next replay overwrites; the loop keeps losses until a log point
        return loss.detach().clone() if self.compiled else loss.detach()
