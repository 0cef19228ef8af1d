"""One process's share of a step when several train together: its micro-batch, its shards under train.fsdp,
and the buffers the collectives hold (measured on CPU with gloo: a 40 MB all-reduce leaves 38 MB resident)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..models.structure import find_block_list

MB = 2**20
FP32 = 4  # bytes: trained and sharded weights, and their gradients, are fp32


def micro_batch_rows(cfg, nproc: int) -> int:
    """Rows one process holds at a time (the largest of its micro-batches)."""
    return math.ceil(cfg.train.batch_size / (nproc * cfg.train.gradient_accumulation_steps))


@dataclass(frozen=True)
class Groups:
    """Parameter counts of the FSDP groups: the root (all outside the blocks) and the largest block."""

    root: int
    root_trainable: int
    block: int
    block_trainable: int
    trainable: int


@dataclass(frozen=True)
class Layout:
    processes: int = 1
    fsdp: bool = False

    def groups(self, prepared: nn.Module) -> Groups | None:
        if self.processes == 1:
            return None
        _, blocks = find_block_list(prepared)
        in_blocks = {id(p) for p in blocks.parameters()}
        outside = [p for p in prepared.parameters() if id(p) not in in_blocks]
        return Groups(sum(p.numel() for p in outside), sum(p.numel() for p in outside if p.requires_grad),
                      max(sum(p.numel() for p in b.parameters()) for b in blocks),
                      max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks),
                      sum(p.numel() for p in prepared.parameters() if p.requires_grad))

    def per_process(self, parts: dict[str, float], groups: Groups | None) -> dict[str, float]:
        """`parts` of a whole-model step (MB) as one process holds them."""
        if groups is None:
            return parts
        out = dict(parts)
        if self.fsdp:
            for key in ("weights_mb", "gradients_mb", "optimizer_mb", "heap_state_mb"):
                out[key] = parts[key] / self.processes
            # the root group stays whole from forward to backward; the next block is gathered while one runs
            out["weights_mb"] += FP32 * (groups.root + 2 * groups.block) / MB
            # a group's gradients are whole until reduce-scattered; its all-gather's flat output lives beside the
            # parameters copied out of it, and the collective keeps a buffer of that size afterwards
            out["collective_buffers_mb"] = FP32 * (max(groups.root_trainable, groups.block_trainable)
                                                   + 2 * max(groups.root, groups.block)) / MB
        else:
            # DDP's reducer copies every gradient into its buckets
            out["collective_buffers_mb"] = FP32 * groups.trainable / MB
        return out
