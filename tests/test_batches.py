"""Batch order: every row once per epoch, reproducible, short batches, and no length-ordered sweep."""
from __future__ import annotations

import numpy as np
import pytest

from tunelab.config import TrainConfig
from tunelab.data import Encoded
from tunelab.train.batches import collate, epoch_batches
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


def test_process_shards_are_disjoint_and_cover_the_epoch():
    shards = [epoch_batches(LENGTHS, 16, 5, 0, 8, rank=r, world_size=2) for r in range(2)]
    rows = np.concatenate([np.concatenate(s) for s in shards])
    assert sorted(rows.tolist()) == list(range(1000))


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
