"""Batches: a seeded, length-bucketed order per epoch, and padding to the longest row in each batch.

Bucketing sorts rows by length only inside a random chunk of `bucket_size` batches and then shuffles
the batches of the whole epoch, so batches are short when they can be but arrive in random order. A
length-ordered sweep (what naive grouping does) correlates with labels on review data and wrecks accuracy.
The order is a pure function of (seed, epoch), which makes resuming in the middle of an epoch exact.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import IGNORE_INDEX, Encoded

PAD_MULTIPLE = 8  # matmul kernels prefer sequence lengths that are multiples of 8


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  bucket_size: int = 1) -> list[np.ndarray]:
    """The epoch's global batches (train.batch_size rows each): the same on every process."""
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
    return batches


def loss_units(data: Encoded, rows: np.ndarray) -> int:
    """What the model's loss is a mean over: rows, or label tokens after the one-position shift."""
    if not data.per_token_labels:
        return len(rows)
    return int((data.labels[rows, 1:] != IGNORE_INDEX).sum())


def micro_batches(data: Encoded, rows: np.ndarray, rank: int, world: int,
                  accumulation: int) -> list[tuple[np.ndarray, float]]:
    """This process's share of one global batch, as `accumulation` micro-batches with loss weights.

    Row j of the batch goes to micro-batch j mod (world × accumulation), so each process gets rows of every
    length. A micro-batch's mean loss is weighted by its share of the batch's loss units (times `world`, as
    DDP averages gradients over processes): the summed gradient is then exactly the full batch's, for
    token-averaged losses too. A batch with fewer rows than parts leaves some parts empty; they run the
    first row with weight 0, so every process still takes part in each gradient all-reduce."""
    parts = world * accumulation
    if parts == 1:
        return [(rows, 1.0)]
    total = max(loss_units(data, rows), 1)
    out = []
    for micro in range(accumulation):
        part = rows[micro * world + rank::parts]
        if len(part) == 0:
            out.append((rows[:1], 0.0))
        else:
            out.append((part, loss_units(data, part) * world / total))
    return out


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
