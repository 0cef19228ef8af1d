"""Batches: a seeded, length-bucketed order per epoch, and padding to the longest row in each batch.

Bucketing sorts rows by length only inside a random chunk of `bucket_size` batches and then shuffles
the batches of the whole epoch, so batches are short when they can be but arrive in random order. A
length-ordered sweep (what naive grouping does) correlates with labels on review data and wrecks accuracy.
The order is a pure function of (seed, epoch), which makes resuming in the middle of an epoch exact.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import Encoded

PAD_MULTIPLE = 8  # matmul kernels prefer sequence lengths that are multiples of 8


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  bucket_size: int = 1, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket_size <= 1:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        chunk = batch_size * bucket_size
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    # Each process takes every world_size-th batch: same order everywhere, disjoint shards.
    return batches[rank::world_size]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(data: Encoded, rows: np.ndarray, device: torch.device,
            pad_multiple: int = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    # Rows are stored already padded, so a batch is a slice cut at its longest row.
    width = int(data.lengths[rows].max())
    width = min(-(-width // pad_multiple) * pad_multiple, data.ids.shape[1])
    mask = torch.from_numpy(np.arange(width)[None, :] < data.lengths[rows][:, None]).long()
    batch = {"input_ids": torch.from_numpy(data.ids[rows, :width]), "attention_mask": mask,
             "labels": torch.from_numpy(data.labels[rows, :width] if data.per_token_labels else data.labels[rows])}
    if data.type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(data.type_ids[rows, :width])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
