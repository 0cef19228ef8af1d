"""Batch order: every row once per epoch, reproducible, short batches, and no length-ordered sweep."""
from __future__ import annotations

import numpy as np
import pytest

from tunelab.config import TrainConfig
from tunelab.data import IGNORE_INDEX, Encoded
from tunelab.train.batches import collate, epoch_batches, micro_batches
from tunelab.train.loop import total_steps

LENGTHS = np.random.default_rng(0).integers(5, 128, size=1000)


def test_each_row_once_and_reproducible():
    a = epoch_batches(LENGTHS, 16, seed=1, epoch=0, bucket_size=8)
    b = epoch_batches(LENGTHS, 16, seed=1, epoch=0, bucket_size=8)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    c = epoch_batches(LENGTHS, 16, seed=1, epoch=1, bucket_size=8)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_buckets_cut_padding_but_batches_arrive_in_random_length_order():
    def padded(batches):
        return sum(len(b) * LENGTHS[b].max() for b in batches)

    plain = epoch_batches(LENGTHS, 16, seed=3, epoch=0, bucket_size=1)
    bucketed = epoch_batches(LENGTHS, 16, seed=3, epoch=0, bucket_size=16)
    assert padded(bucketed) < 0.75 * padded(plain)
    widths = np.array([LENGTHS[b].max() for b in bucketed])
    # a sweep would make consecutive widths strongly correlated; shuffled batches are not
    assert abs(np.corrcoef(widths[:-1], widths[1:])[0, 1]) < 0.3
    assert abs(np.corrcoef(np.arange(len(widths)), widths)[0, 1]) < 0.3


def test_micro_batches_split_each_global_batch_across_processes_and_steps():
    data = Encoded(np.zeros((1000, 4), dtype=np.int64), LENGTHS, np.zeros(1000, dtype=np.int64))
    for rows in epoch_batches(LENGTHS, 16, 5, 0, 8):
        shares = [micro_batches(data, rows, rank, 2, 2) for rank in range(2)]
        taken = np.concatenate([part for share in shares for part, _ in share])
        assert sorted(taken.tolist()) == sorted(rows.tolist())  # every row once, on exactly one process
        weights = [w for share in shares for _, w in share]
        assert sum(weights) == pytest.approx(2.0)  # mean over processes (DDP) of the sums = 1: the batch mean


def test_micro_batch_weights_follow_label_tokens_for_token_averaged_losses():
    labels = np.full((4, 6), IGNORE_INDEX, dtype=np.int64)
    labels[0, 1:6] = 1  # 5 counted tokens
    labels[1, 1:2] = 1  # 1
    labels[2, 1:3] = 1  # 2
    labels[3, 1:5] = 1  # 4
    data = Encoded(np.zeros((4, 6), dtype=np.int64), np.full(4, 6), labels)
    parts = micro_batches(data, np.arange(4), rank=0, world=1, accumulation=2)
    assert [p.tolist() for p, _ in parts] == [[0, 2], [1, 3]]
    assert [w for _, w in parts] == pytest.approx([7 / 12, 5 / 12])


def test_a_batch_smaller_than_its_parts_runs_weightless_fillers():
    data = Encoded(np.zeros((3, 4), dtype=np.int64), np.array([4, 4, 4]), np.zeros(3, dtype=np.int64))
    parts = micro_batches(data, np.array([7 % 3]), rank=1, world=2, accumulation=1)
    assert [(p.tolist(), w) for p, w in parts] == [([1], 0.0)]


def test_collate_cuts_each_batch_at_its_longest_row_rounded_to_8():
    ids = np.zeros((3, 40), dtype=np.int64)
    data = Encoded(ids, np.array([3, 11, 40]), np.array([0, 1, 0]))
    import torch

    batch = collate(data, np.array([0, 1]), torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 11]


@pytest.mark.parametrize("epochs,max_steps,expected", [(1, None, 63), (2.5, None, 158), (1, 500, 500), (3, 10, 10)])
def test_max_steps_wins_over_epochs(epochs, max_steps, expected):
    assert total_steps(TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=16), 1000) == expected
