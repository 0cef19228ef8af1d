"""The input embedding's gradient on a CPU: only the rows a batch uses are computed, added into a kept buffer.

A dense embedding backward builds a new vocabulary × hidden gradient every step (30522 × 384 fp32, 47 MB,
for the packaged MiniLM, half of its parameters) and fills it with zeros, although a batch of 16 × 72
tokens touches at most 1,152 of its rows. glibc serves a block that large with a fresh mmap and unmaps it
when it is freed, so each step also paid about 12,000 page faults for it. Here the embedding returns a
sparse gradient (`nn.Embedding(sparse=True)`, one row per token), which autograd adds into a dense buffer
that stays allocated and is zeroed (1 ms) before each step. Clipping, AdamW, logging and checkpoints see the
same dense gradient as before, with the same values: the rows are summed in the same token order.

Only on a CPU, in one process, for an `nn.Embedding` whose weight trains (full fine-tuning, LLRD). A CUDA
caching allocator keeps its blocks anyway, and DDP/FSDP reduce dense gradients in buckets or shards.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class KeptEmbeddingGradient:
    """Call `zero()` before each step's first backward, inside `active()`."""

    def __init__(self, embedding: nn.Embedding | None):
        self.embedding = embedding
        self.buffer: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device, processes: int,
                  enabled: bool = True) -> "KeptEmbeddingGradient":
        embedding = input_embedding(model)
        applies = (enabled and device.type == "cpu" and processes == 1 and embedding is not None
                   and embedding.weight.requires_grad and not embedding.sparse)
        return cls(embedding if applies else None)

    @contextlib.contextmanager
    def active(self):
        if self.embedding is None:
            yield self
            return
        self.embedding.sparse = True
        try:
            yield self
        finally:
            self.embedding.sparse = False
            self.buffer = None

    def zero(self) -> None:
        if self.embedding is None:
            return
        weight = self.embedding.weight
        if self.buffer is None:
            self.buffer = torch.zeros_like(weight)
        else:
            self.buffer.zero_()
        weight.grad = self.buffer  # autograd adds each sparse gradient into it in place


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding (transformers' and peft's `get_input_embeddings`), if it is an nn.Embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if getter is not None else None
    except NotImplementedError:
        return None
    return embedding if isinstance(embedding, nn.Embedding) else None
